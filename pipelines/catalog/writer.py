"""Write the demo product catalog: bilingual noisy titles, rendered photos, near-duplicate families.

``make_catalog(out, products, seed)`` writes, deterministically for a seed:
    OUT/products/part-00000.parquet ...   the catalog contract (one row per product), with the
                                          title in English, 汉字 and pinyin and the split
    OUT/products/_images/p0000000.jpg ... with image_mode "files": ``image_uri`` is relative to
                                          products/; the "_" keeps Parquet dataset readers from
                                          listing the images
    OUT/pairs.parquet                     each product's title in English, 汉字 and pinyin, and its
                                          attributes (fine-tuning)
    OUT/queries.parquet                   held-out shopper queries for every `val` and `test` product,
                                          3 languages, with the attributes each query names
    OUT/config.resolved.yaml              the resolved config of the command (CLI runs)
    OUT/manifest.json                     what was written; written last, so its presence means complete
Splits are by family: train / val / test, 70 / 10 / 20 (``pipelines.catalog.plan``). A query's
``kind`` and the attributes it names (null when it does not name one) say which products answer it
(``pipelines.catalog.relevance``), written as the products table writes them.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.catalog.plan import SPLITS, TITLE_LANGS, ProductPlan, plan_catalog
from pipelines.catalog.vocab import BRANDS, COLORS, KIND_BY_KEY
from pipelines.storage import S3Settings, filesystem_for, join

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # bump when the same seed would give different products
ROW_GROUP_SIZE = 128  # rows per Parquet row group: a few MB of images, a sensible Ray read unit
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
QUERY_SPLITS = ("val", "test")  # the held-out splits: shopper queries are written for these

PRODUCTS_SCHEMA_FIELDS = [
    pa.field("product_id", pa.string(), nullable=False),
    pa.field("title", pa.string(), nullable=False),
    pa.field("title_lang", pa.string()),
    # The product's title in each language: the demo's source.title_columns for fine-tuning.
    pa.field("title_en", pa.string()),
    pa.field("title_zh", pa.string()),
    pa.field("title_pinyin", pa.string()),
    pa.field("category", pa.string()),
    pa.field("brand", pa.string()),
    pa.field("price", pa.float64()),
    pa.field("split", pa.string()),
    pa.field("family_id", pa.string()),
    pa.field("differs_by", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("color", pa.string()),
    pa.field("pattern", pa.string()),
    pa.field("material", pa.string()),
    pa.field("model_code", pa.string()),
    pa.field("image_format", pa.string()),
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
]


def products_schema(image_mode: str) -> pa.Schema:
    image = (
        pa.field("image", pa.binary())
        if image_mode == "inline"
        else pa.field("image_uri", pa.string())
    )
    return pa.schema([*PRODUCTS_SCHEMA_FIELDS, image])


PAIRS_SCHEMA = pa.schema(
    [
        ("product_id", pa.string()),
        ("family_id", pa.string()),
        ("split", pa.string()),
        ("title_lang", pa.string()),
        ("title_en", pa.string()),
        ("title_zh", pa.string()),
        ("title_pinyin", pa.string()),
        ("kind", pa.string()),
        ("color", pa.string()),
        ("pattern", pa.string()),
        ("material", pa.string()),
        ("brand", pa.string()),
        ("differs_by", pa.string()),
    ]
)
QUERIES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("product_id", pa.string()),
        ("family_id", pa.string()),
        ("split", pa.string()),
        ("lang", pa.string()),
        ("query", pa.string()),
        pa.field("kind", pa.string(), nullable=False),
        # The product's value when the query names the attribute, else null.
        ("color", pa.string()),
        ("pattern", pa.string()),
        ("material", pa.string()),
        ("brand", pa.string()),
    ]
)


def render_spec(product: ProductPlan):
    from pipelines.catalog.render import RenderSpec

    return RenderSpec(
        kind=product.kind,
        color=COLORS[product.color][0],
        pattern=product.pattern,
        material=product.material,
        brand_text=BRANDS[product.brand].label,
        width=product.width,
        height=product.height,
        layout_seed=product.layout_seed,
    )


def encode_image(im, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=90)
    elif fmt == "PNG":
        im.save(buf, "PNG", compress_level=1)  # speed over size; PNGs are a small share
    else:
        im.save(buf, "WEBP", quality=85, method=0)
    return buf.getvalue()


def render_image(product: ProductPlan) -> bytes:
    from pipelines.catalog.render import render_product

    return encode_image(render_product(render_spec(product)), product.image_format)


def _attributes(product: ProductPlan) -> dict:
    """What the product is, as the products table, pairs.parquet and queries.parquet write it."""
    return {
        "kind": product.kind,
        "color": product.color,
        "pattern": product.pattern,
        "material": product.material,
        "brand": BRANDS[product.brand].en,
    }


def _row(product: ProductPlan) -> dict:
    return {
        "product_id": product.product_id,
        "title": product.title,
        "title_lang": product.title_lang,
        **{f"title_{lang}": product.titles[lang] for lang in TITLE_LANGS},
        "category": KIND_BY_KEY[product.kind].category,
        "price": product.price,
        "split": product.split,
        "family_id": product.family_id,
        "differs_by": product.differs_by,
        **_attributes(product),
        "model_code": product.model_code,
        "image_format": product.image_format,
        "image_width": product.width,
        "image_height": product.height,
    }


@dataclass(frozen=True)
class PartJob:
    index: int
    products: list[ProductPlan]
    products_dir: str  # filesystem path of OUT/products
    out_uri: str  # to rebuild the filesystem in a worker process
    s3: S3Settings
    image_mode: str


def write_part(job: PartJob) -> dict:
    """Render one part's images and write its Parquet file (and image files). Runs in a worker."""
    fs, _ = filesystem_for(job.out_uri, job.s3)
    rows, total_bytes = [], 0
    for product in job.products:
        data = render_image(product)
        total_bytes += len(data)
        row = _row(product)
        if job.image_mode == "inline":
            row["image"] = data
        else:
            name = f"_images/{product.product_id}.{_EXT[product.image_format]}"
            with fs.open_output_stream(join(job.products_dir, name)) as f:
                f.write(data)
            row["image_uri"] = name  # relative to the catalog folder (products/)
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=products_schema(job.image_mode))
    name = f"part-{job.index:05d}.parquet"
    final = join(job.products_dir, name)
    if isinstance(fs, pafs.LocalFileSystem):
        # Write then rename, so a reader never sees half a file under a .parquet name.
        tmp = join(job.products_dir, f".{name}.tmp")
        pq.write_table(table, tmp, filesystem=fs, row_group_size=ROW_GROUP_SIZE)
        fs.move(tmp, final)
    else:  # an S3 PUT is atomic per object
        pq.write_table(table, final, filesystem=fs, row_group_size=ROW_GROUP_SIZE)
    return {"file": name, "rows": len(rows), "image_bytes": total_bytes}


def _side_tables(products: Sequence[ProductPlan]) -> tuple[pa.Table, pa.Table]:
    pairs = pa.Table.from_pylist(
        [
            {
                "product_id": p.product_id,
                "family_id": p.family_id,
                "split": p.split,
                "title_lang": p.title_lang,
                "title_en": p.titles["en"],
                "title_zh": p.titles["zh"],
                "title_pinyin": p.titles["pinyin"],
                **_attributes(p),
                "differs_by": p.differs_by,
            }
            for p in products
        ],
        schema=PAIRS_SCHEMA,
    )
    queries = pa.Table.from_pylist(
        [_query_row(p, lang) for p in products if p.split in QUERY_SPLITS for lang in TITLE_LANGS],
        schema=QUERIES_SCHEMA,
    )
    return pairs, queries


def _query_row(product: ProductPlan, lang: str) -> dict:
    return {
        "query_id": f"q-{product.product_id}-{lang}",
        "product_id": product.product_id,
        "family_id": product.family_id,
        "split": product.split,
        "lang": lang,
        "query": product.queries[lang],
        "kind": product.kind,
        **product.query_attributes,
    }


def _prepare_output(fs: pafs.FileSystem, root: str, overwrite: bool, image_mode: str) -> None:
    products_dir = join(root, "products")
    info = fs.get_file_info(products_dir)
    if info.type != pafs.FileType.NotFound:
        existing = fs.get_file_info(pafs.FileSelector(products_dir, recursive=False))
        if existing and not overwrite:
            raise FileExistsError(
                f"{products_dir} already holds {len(existing)} entries; pass --overwrite to replace the catalog"
            )
        fs.delete_dir_contents(products_dir, missing_dir_ok=True)
    # A stale manifest would vouch for the new, incomplete catalog; a stale config would misdescribe it.
    for name in ("manifest.json", "config.resolved.yaml"):
        if fs.get_file_info(join(root, name)).type != pafs.FileType.NotFound:
            fs.delete_file(join(root, name))
    fs.create_dir(
        join(products_dir, "_images") if image_mode == "files" else products_dir, recursive=True
    )


def make_catalog(
    out: str,
    n_products: int,
    seed: int,
    *,
    image_mode: str = "inline",
    rows_per_file: int = 1000,
    workers: int | None = None,
    s3: S3Settings | None = None,
    overwrite: bool = False,
    resolved_config: str | None = None,
) -> dict:
    """Generate the catalog under ``out`` and return the manifest.

    ``resolved_config`` (YAML text, see ``pipelines.config.dump_config``) is written beside the
    manifest as ``config.resolved.yaml``.
    """
    if image_mode not in ("inline", "files"):
        raise ValueError(f"image_mode must be 'inline' or 'files', got {image_mode!r}")
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
    started = time.perf_counter()
    s3 = s3 or S3Settings()
    fs, root = filesystem_for(out, s3)
    _prepare_output(fs, root, overwrite, image_mode)
    products = plan_catalog(n_products, seed)
    planned = time.perf_counter()
    products_dir = join(root, "products")
    jobs = [
        PartJob(i, products[start : start + rows_per_file], products_dir, out, s3, image_mode)
        for i, start in enumerate(range(0, len(products), rows_per_file))
    ]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    parts: list[dict] = []

    def progress(part: dict) -> None:
        parts.append(part)
        done = sum(p["rows"] for p in parts)
        rate = done / max(time.perf_counter() - planned, 1e-9)
        logger.info("%s written: %d/%d products (%.0f/s)", part["file"], done, len(products), rate)

    if workers == 1:
        for job in jobs:
            progress(write_part(job))
    else:
        # spawn, not fork: callers (tests, Ray drivers) may hold threads that fork would copy broken.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for part in pool.imap_unordered(write_part, jobs, chunksize=1):
                progress(part)
    parts.sort(key=lambda p: p["file"])
    rendered = time.perf_counter()
    pairs, queries = _side_tables(products)
    pq.write_table(pairs, join(root, "pairs.parquet"), filesystem=fs)
    pq.write_table(queries, join(root, "queries.parquet"), filesystem=fs)
    manifest = {
        "generator": "pipelines.make_catalog",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "products": len(products),
        "families": len({p.family_id for p in products}),
        "image_mode": image_mode,
        "rows_per_file": rows_per_file,
        "files": [p["file"] for p in parts],
        "image_bytes": sum(p["image_bytes"] for p in parts),
        "splits": _counts((p.split for p in products), SPLITS),
        "title_langs": dict(Counter(p.title_lang for p in products)),
        "image_formats": dict(Counter(p.image_format for p in products)),
        "differs_by": dict(Counter(p.differs_by or "none" for p in products)),
        "queries": queries.num_rows,
        "workers": workers,
        "seconds": {
            "plan": round(planned - started, 2),
            "render_and_write": round(rendered - planned, 2),
            "total": round(time.perf_counter() - started, 2),
        },
    }
    if resolved_config is not None:
        with fs.open_output_stream(join(root, "config.resolved.yaml")) as f:
            f.write(resolved_config.encode())
    with fs.open_output_stream(join(root, "manifest.json")) as f:
        f.write(json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    return manifest


def _counts(values, keys: Sequence[str]) -> dict[str, int]:
    """How many of each key, zero included, so readers can index any split of a small catalog."""
    counts = Counter(values)
    unknown = set(counts) - set(keys)
    if unknown:
        raise ValueError(f"expected only {list(keys)}, got {sorted(unknown)}")
    return {key: counts[key] for key in keys}


def read_manifest(out: str, s3: S3Settings | None = None) -> dict | None:
    fs, root = filesystem_for(out, s3)
    path = join(root, "manifest.json")
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())
