"""Retrieval evaluation: Recall@1/5/10 both ways, ITC alone and ITC→ITM over the top k_test.

    python -m pipelines.evaluate --config FILE [key=value ...] [--model PATH] --out results.json
        [--catalog DIR | --karpathy ANNOTATION.json --images DIR] [--k-test 16 32 ...]
        [--split test] [--texts queries|titles] [--batch-size N] [--token-cache-mb MB]

Inputs:
- ``--catalog DIR`` (default: the folder above ``source.uri``): the demo catalog that
  ``pipelines.make_catalog`` writes. The products of ``--split`` (``test``: never trained on) are
  the pool; the held-out shopper queries of ``DIR/queries.parquet`` (English, 汉字, pinyin) are the
  texts, so the figures come per query language too. Images inline (``image``) or by ``image_uri``
  (relative to ``DIR/products``, absolute, or ``s3://``). ``--texts titles`` uses the products'
  own titles (``DIR/pairs.parquet``, one per language) instead of the shopper queries; with
  ``--split train`` that measures how well a fine-tuned model fits what it was trained on.
- ``--karpathy ANNOTATION.json --images DIR``: the Karpathy-split test/val annotation BLIP and
  ALBEF publish for COCO and Flickr30K (a JSON list of ``{"image": "relative/path.jpg",
  "caption": [...]}``), images under DIR. Captions get BLIP's ``pre_caption`` (lowercase, its
  punctuation stripped, 30 words) and images are decoded at full size, as BLIP's evaluation does,
  so real checkpoints reproduce the paper's tables (BLIP uses k_test 256 on COCO, 128 on Flickr).

Outputs: ``--out`` (JSON: every figure, model_id, inputs, k_test), ``<stem>.md`` (tables) and
``<stem>_recall_vs_k_test.png`` beside it, plus ``<stem>.config.resolved.yaml``. The re-rank is
``blip_ops.rerank.combine_scores``, the search service's rule.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from pipelines.config import AppConfig, add_config_arguments, cli_config, write_resolved_config

logger = logging.getLogger(__name__)

DEFAULT_K_TEST = (1, 4, 16, 32, 64, 128, 256)
KARPATHY_MAX_WORDS = 30  # BLIP's retrieval datasets truncate captions to 30 words
_BLIP_PUNCT_RE = re.compile(r"([.!\"()*#:;~])")
_SPACES_RE = re.compile(r"\s{2,}")


class EvalInputError(ValueError):
    """The evaluation inputs are missing or malformed; the message says which and why."""


# --------------------------------------------------------------------------- inputs


class LazyImages(Sequence):
    """Images decoded on access (``loaders[i]()`` gives the bytes), so only tokens stay in memory."""

    def __init__(
        self,
        ids: list[str],
        loaders: list[Callable[[], bytes]],
        *,
        target_size: int | None,
        max_bytes: int | None = None,
    ):
        self.ids = ids
        self.loaders = loaders
        self.target_size = target_size  # JPEG draft decoding towards this size; None = full size
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.loaders)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        from blip_ops.decode import ImageDecodeError, decode_image

        try:
            data = self.loaders[i]()
            return decode_image(data, target_size=self.target_size, max_bytes=self.max_bytes)
        except (OSError, ImageDecodeError) as err:
            reason = getattr(err, "reason", type(err).__name__)
            raise EvalInputError(
                f"image of {self.ids[i]!r} cannot be used ({reason}): {err}"
            ) from err


@dataclass
class EvalData:
    product_ids: list[str]  # (P,) image / product ids
    images: LazyImages  # (P,)
    texts: list[str]  # (T,)
    text_product: np.ndarray  # (T,) index into product_ids
    languages: list[str] | None  # (T,) language of each text, when known
    inputs: dict = field(default_factory=dict)  # what was read, for the JSON


def pre_caption(caption: str, max_words: int = KARPATHY_MAX_WORDS) -> str:
    """BLIP's caption cleaning for its retrieval datasets (``data/utils.py``)."""
    caption = _BLIP_PUNCT_RE.sub(" ", caption.lower())
    caption = _SPACES_RE.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def _read_file(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def load_karpathy(
    annotation: str | Path, images_dir: str | Path, *, clean: bool = True
) -> EvalData:
    """A Karpathy-split annotation (``[{"image": path, "caption": [..] | str}, ...]``).

    Entries naming the same image are merged (BLIP's train files have one caption per entry).
    """
    annotation, images_dir = Path(annotation), Path(images_dir)
    if not annotation.is_file():
        raise EvalInputError(f"Karpathy annotation file {annotation} does not exist")
    if not images_dir.is_dir():
        raise EvalInputError(f"image folder {images_dir} does not exist (--images)")
    try:
        entries = json.loads(annotation.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{annotation} is not a JSON file: {err}") from err
    if not isinstance(entries, list) or not entries:
        raise EvalInputError(
            f"{annotation}: expected a non-empty JSON list of {{'image', 'caption'}} entries, "
            f"got {type(entries).__name__}"
        )
    captions: dict[str, list[str]] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise EvalInputError(
                f"{annotation}: entry {n} needs 'image' and 'caption', got {str(entry)[:120]}"
            )
        caps = entry["caption"]
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise EvalInputError(
                f"{annotation}: entry {n} caption must be a string or a list of strings"
            )
        captions.setdefault(str(entry["image"]), []).extend(caps)
    ids = list(captions)
    paths = [images_dir / PurePosixPath(i) for i in ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EvalInputError(
            f"{len(missing)} of {len(paths)} images of {annotation.name} are missing under "
            f"{images_dir}, e.g. {missing[:3]}"
        )
    texts, text_product = [], []
    for i, image_id in enumerate(ids):
        for c in captions[image_id]:
            texts.append(pre_caption(c) if clean else c)
            text_product.append(i)
    return EvalData(
        product_ids=ids,
        # Full-size decoding (no JPEG draft), as BLIP's evaluation transform sees the images.
        images=LazyImages(ids, [_read_file(p) for p in paths], target_size=None),
        texts=texts,
        text_product=np.asarray(text_product, dtype=np.int64),
        languages=None,
        inputs={
            "kind": "karpathy",
            "annotation": str(annotation.resolve()),
            "images": str(images_dir.resolve()),
            "pre_caption": clean,
        },
    )


TEXT_SOURCES = ("queries", "titles")
_TITLE_COLUMNS = {"en": "title_en", "zh": "title_zh", "pinyin": "title_pinyin"}


def _catalog_titles(pairs_file: str, fs) -> list[dict]:
    """pairs.parquet as query-shaped rows: one ``{product_id, lang, query}`` per title language."""
    import pyarrow.parquet as pq

    table = pq.read_table(pairs_file, filesystem=fs)
    missing = {"product_id", *_TITLE_COLUMNS.values()} - set(table.column_names)
    if missing:
        raise EvalInputError(f"{pairs_file}: missing columns {sorted(missing)}")
    return [
        {"product_id": row["product_id"], "lang": lang, "query": row[column]}
        for row in table.to_pylist()
        for lang, column in _TITLE_COLUMNS.items()
        if row[column]
    ]


def load_catalog(
    root: str, split: str, cfg: AppConfig, *, target_size: int | None, texts: str = "queries"
) -> EvalData:
    """The demo catalog's held-out queries (or the products' titles) over the products of ``split``."""
    if texts not in TEXT_SOURCES:
        raise EvalInputError(f"texts must be one of {TEXT_SOURCES}, got {texts!r}")
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from pipelines.storage import S3Settings, filesystem_for, is_s3, join

    s3 = S3Settings.from_config(cfg.s3)
    fs, base = filesystem_for(root, s3)
    products_dir = join(base, "products")
    queries_file = join(base, "queries.parquet" if texts == "queries" else "pairs.parquet")
    from pyarrow.fs import FileType

    if fs.get_file_info(products_dir).type != FileType.Directory:
        raise EvalInputError(
            f"catalog {root} has no products/ folder (expected what pipelines.make_catalog "
            "writes: products/*.parquet and queries.parquet)"
        )
    if fs.get_file_info(queries_file).type != FileType.File:
        what = "the held-out queries" if texts == "queries" else "the product titles"
        raise EvalInputError(f"catalog {root} has no {queries_file.rsplit('/', 1)[-1]} ({what})")
    cols = cfg.source.columns
    dataset = pads.dataset(products_dir, format="parquet", filesystem=fs)
    names = set(dataset.schema.names)
    if "split" not in names:
        raise EvalInputError(f"{products_dir}: no 'split' column, so no held-out products")
    wanted = [c for c in (cols.product_id, cols.image, cols.image_uri) if c in names]
    if cols.product_id not in names or len(wanted) < 2:
        raise EvalInputError(
            f"{products_dir}: expected columns {cols.product_id!r} and {cols.image!r} or "
            f"{cols.image_uri!r}, got {sorted(names)}"
        )
    table = dataset.to_table(columns=wanted, filter=pads.field("split") == split)
    if table.num_rows == 0:
        splits = sorted(
            set(dataset.to_table(columns=["split"]).column("split").to_pylist()) - {None}
        )
        raise EvalInputError(f"catalog {root} has no products in split {split!r}; splits: {splits}")
    rows = sorted(table.to_pylist(), key=lambda r: r[cols.product_id])
    ids = [r[cols.product_id] for r in rows]
    if len(set(ids)) != len(ids):
        raise EvalInputError(f"catalog {root}: duplicate product ids in split {split!r}")

    def loader(row: dict) -> Callable[[], bytes]:
        data = row.get(cols.image)
        if data:
            return lambda: data
        uri = row.get(cols.image_uri)
        if not uri:
            raise EvalInputError(
                f"product {row[cols.product_id]!r} has neither image nor image_uri"
            )
        if not is_s3(uri) and not uri.startswith("/"):
            file_fs, path = fs, join(products_dir, uri)  # relative to products/, local or S3
        else:
            file_fs, path = filesystem_for(uri, s3)

        def read() -> bytes:
            with file_fs.open_input_stream(path) as f:
                return f.read()

        return read

    if texts == "queries":
        queries = pq.read_table(queries_file, filesystem=fs).to_pylist()
    else:
        queries = _catalog_titles(queries_file, fs)
    index_of = {pid: i for i, pid in enumerate(ids)}
    kept = [q for q in queries if q["product_id"] in index_of]
    if not kept:
        raise EvalInputError(
            f"none of the {len(queries)} queries of {queries_file} is for a product of split "
            f"{split!r} ({len(ids)} products)"
        )
    if len(kept) < len(queries):
        logger.info(
            "ignored %d queries for products outside split %r", len(queries) - len(kept), split
        )
    return EvalData(
        product_ids=ids,
        images=LazyImages(
            ids,
            [loader(r) for r in rows],
            target_size=target_size,
            max_bytes=cfg.source.max_image_bytes,
        ),  # fmt: skip
        texts=[q["query"] for q in kept],
        text_product=np.asarray([index_of[q["product_id"]] for q in kept], dtype=np.int64),
        languages=[q["lang"] for q in kept],
        inputs={
            "kind": "catalog",
            "catalog": root if is_s3(root) else base,
            "split": split,
            "texts": texts,
            "products": len(ids),
            "queries": len(kept),
        },
    )


# --------------------------------------------------------------------------- outputs

_DIR_SHORT = {"text_to_product": "text→product", "product_to_text": "product→text"}


def _fmt(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _rows(metrics: dict) -> list[tuple[str, dict]]:
    rows = [("ITC", metrics["itc"])]
    rows += [(f"ITC→ITM k_test={k}", fig) for k, fig in metrics.get("itm", {}).items()]
    return rows


def _table_cells(fig: dict) -> list[str]:
    cells = [_fmt(v) for d in ("text_to_product", "product_to_text") for v in fig[d].values()]
    return [*cells, _fmt(fig["mean"])]


def markdown_report(results: dict) -> str:
    m = results["metrics"]
    names = list(m["itc"]["text_to_product"])
    head = [f"T→P {n}" for n in names] + [f"P→T {n}" for n in names] + ["mean"]
    lines = [
        f"# Retrieval evaluation: {results['model']}",
        "",
        f"- model_id: `{results['model_id']}`",
        f"- inputs: {json.dumps(results['inputs'], ensure_ascii=False)}",
        f"- products (images): {m['counts']['products']}, texts: {m['counts']['texts']}, "
        f"products with texts: {m['counts']['products_with_texts']}",
        "- T→P: text→product (image retrieval, IR); P→T: product→text (text retrieval, TR; a "
        "hit when any of the product's texts is in the top K). Recall in %.",
        f"- ITC→ITM: top k_test by cosine re-scored with ITM logit + ITC cosine ({m['itm_pairs']} "
        "pairs scored)",
        "",
        "| method | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    lines += [f"| {name} | " + " | ".join(_table_cells(fig)) + " |" for name, fig in _rows(m)]
    if m.get("by_lang"):
        k = str(max(m["k_test"])) if m.get("k_test") else None
        lines += ["", f"## Per query language (ITC, and ITC→ITM at k_test={k})" if k else
                  "## Per query language (ITC)", ""]  # fmt: skip
        lines += ["| language | texts | method | " + " | ".join(head) + " |",
                  "|---|---:|---|" + "---:|" * len(head)]  # fmt: skip
        for lang, block in m["by_lang"].items():
            n = block["counts"]["texts"]
            lines.append(f"| {lang} | {n} | ITC | " + " | ".join(_table_cells(block["itc"])) + " |")
            if k:
                lines.append(
                    f"| {lang} | {n} | ITC→ITM | "
                    + " | ".join(_table_cells(block["itm"][k]))
                    + " |"
                )
    return "\n".join(lines) + "\n"


_COLORS = {"R@1": (214, 39, 40), "R@5": (31, 119, 180), "R@10": (44, 160, 44)}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _dashed(draw, points, color, width=2, dash=8) -> None:
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        length = max(1.0, ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5)
        steps = int(length // dash)
        for s in range(0, steps + 1, 2):
            a, b = s / (steps + 1), min(1.0, (s + 1) / (steps + 1))
            draw.line(
                [(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                fill=color, width=width,
            )  # fmt: skip


def plot_recall_vs_k_test(series: dict, out: Path, title: str) -> Path:
    """Recall vs k_test with PIL (no plotting dependency): the x axis is categorical, ITC first."""
    from PIL import Image, ImageDraw

    w, h = 900, 560
    left, right, top, bottom = 70, 190, 50, 70
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    font, small = _font(15), _font(12)
    xs_labels = ["ITC", *[str(k) for k in series["k_test"]]]
    n = len(xs_labels)
    pw, ph = w - left - right, h - top - bottom

    def x_at(i: int) -> float:
        return left + (pw * (i + 0.5) / n)

    def y_at(v: float) -> float:
        return top + ph * (1.0 - v)

    d.text((left, 15), title, fill="black", font=font)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in range(0, 11, 2):
        y = y_at(t / 10)
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        d.text((left - 40, y - 7), f"{t / 10:.1f}", fill="black", font=small)
    for i, label in enumerate(xs_labels):
        d.line([(x_at(i), top + ph), (x_at(i), top + ph + 5)], fill="black")
        d.text((x_at(i) - 4 * len(label), top + ph + 10), label, fill="black", font=small)
    d.text((left + pw / 2 - 90, h - 28), "k_test (ITC->ITM re-rank depth)", fill="black", font=font)
    d.text((8, top - 22), "recall", fill="black", font=font)

    legend_y = top
    for direction, style in (("text_to_product", "solid"), ("product_to_text", "dashed")):
        for name, values in series[direction].items():
            ys = [series["itc"][direction][name], *values]
            pts = [(x_at(i), y_at(v)) for i, v in enumerate(ys) if v is not None]
            color = _COLORS.get(name, (90, 90, 90))
            if style == "solid":
                d.line(pts, fill=color, width=2)
            else:
                _dashed(d, pts, color)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            lx = left + pw + 15
            if style == "solid":
                d.line([(lx, legend_y + 8), (lx + 30, legend_y + 8)], fill=color, width=2)
            else:
                _dashed(d, [(lx, legend_y + 8), (lx + 30, legend_y + 8)], color, dash=6)
            label = f"{_DIR_SHORT[direction]} {name}".replace("→", "->")  # PIL's font has no arrow
            d.text((lx + 36, legend_y), label, fill="black", font=small)
            legend_y += 20
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    return out


def print_summary(results: dict) -> None:
    m = results["metrics"]
    inputs = results["inputs"]
    where = (
        f"catalog {inputs['catalog']} (split {inputs['split']})"
        if inputs["kind"] == "catalog"
        else f"Karpathy annotation {inputs['annotation']}"
    )
    print(f"\nmodel {results['model']} ({results['model_id']})")
    print(f"{where}: {m['counts']['products']} products, {m['counts']['texts']} texts")
    names = list(m["itc"]["text_to_product"])
    print(f"\n{'recall %':<22}" + f"{'text→product':^21}" + f"{'product→text':^21}")
    print(f"{'method':<22}" + "".join(f"{n:>7}" for n in names * 2) + f"{'mean':>7}")
    for name, fig in _rows(m):
        print(f"{name:<22}" + "".join(f"{c:>7}" for c in _table_cells(fig)))
    if m.get("by_lang"):
        k = str(max(m["k_test"])) if m.get("k_test") else None
        print(
            f"\nper query language (ITC{f' | ITC→ITM k_test={k}' if k else ''}), text→product R@1/5/10:"
        )
        for lang, block in m["by_lang"].items():
            line = "/".join(_fmt(v) for v in block["itc"]["text_to_product"].values())
            if k:
                line += "  |  " + "/".join(
                    _fmt(v) for v in block["itm"][k]["text_to_product"].values()
                )
            print(f"  {lang:<8}{block['counts']['texts']:>5} texts  {line}")
    s = m["seconds"]
    print(
        f"\n{m['itm_pairs']} ITM pairs; {s['total']:.1f}s (images {s['embed_images']:.1f}s, "
        f"texts {s['embed_texts']:.1f}s, rank + re-rank {s['rank']:.1f}s)"
    )
    print("wrote " + ", ".join(results["outputs"].values()))


# --------------------------------------------------------------------------- command


def run_evaluation(
    cfg: AppConfig,
    out: Path,
    *,
    catalog: str | None = None,
    karpathy: str | None = None,
    images_dir: str | None = None,
    k_test: Sequence[int] = DEFAULT_K_TEST,
    split: str = "test",
    texts: str = "queries",
    batch_size: int | None = None,
    token_cache_mb: float = 2048,
) -> dict:
    from blip_ops import load_model
    from blip_ops.evaluate import evaluate_model, recall_vs_k_test
    from pipelines.runtime.inputs import ensure_model

    started = time.perf_counter()
    if karpathy is not None and images_dir is None:
        raise EvalInputError(
            "--karpathy needs --images DIR (the folder its image paths are relative to)"
        )
    if karpathy is None:
        catalog = catalog or _default_catalog(cfg)
    # Inputs first: a wrong path should fail before a model loads.
    if karpathy is not None:
        data = load_karpathy(karpathy, images_dir)
    else:
        data = load_catalog(catalog, split, cfg, target_size=None, texts=texts)
    model = load_model(
        ensure_model(cfg.model.name_or_path), device=cfg.model.device, dtype=cfg.model.dtype,
        attention=cfg.model.attention,
    )  # fmt: skip
    if karpathy is None:
        # Catalog images are decoded as the index job decodes them (JPEG drafted to model size).
        data.images.target_size = model.image_settings.size
    n_cands = max(len(data.product_ids), len(data.texts))
    ks = sorted({min(int(k), n_cands) for k in k_test})
    metrics = evaluate_model(
        model, data.images, data.texts, data.text_product, languages=data.languages, k_test=ks,
        batch_size=batch_size or cfg.encode.batch_size, token_cache_mb=token_cache_mb,
    )  # fmt: skip
    stem = out.with_suffix("")
    outputs = {
        "json": str(out),
        "markdown": str(stem.with_suffix(".md")),
        "plot": str(stem.parent / f"{stem.name}_recall_vs_k_test.png"),
        "config": str(stem.parent / f"{stem.name}.config.resolved.yaml"),
    }
    results = {
        "model": cfg.model.name_or_path,
        "model_id": model.model_id,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "inputs": data.inputs,
        "k_test": ks,
        "k_test_requested": [int(k) for k in k_test],
        "metrics": metrics,
        "recall_vs_k_test": recall_vs_k_test(metrics) if ks else None,
        "outputs": outputs,
        "seconds": round(time.perf_counter() - started, 2),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(outputs["markdown"]).write_text(markdown_report(results), encoding="utf-8")
    if ks:
        plot_recall_vs_k_test(
            results["recall_vs_k_test"], Path(outputs["plot"]),
            f"{results['model_id']}: recall vs k_test ({data.inputs['kind']}; ITC = no re-rank)",
        )  # fmt: skip
    else:
        del outputs["plot"]
    write_resolved_config(cfg, out.parent, name=Path(outputs["config"]).name)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return results


def _default_catalog(cfg: AppConfig) -> str:
    uri = cfg.source.uri.rstrip("/")
    if not uri.endswith("/products"):
        raise EvalInputError(
            f"no --catalog or --karpathy given and source.uri {cfg.source.uri!r} is not a "
            "catalog's products/ folder"
        )
    return uri.removesuffix("/products")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="results JSON (md and png beside it)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--catalog", help="demo catalog folder (default: the folder above source.uri)"
    )
    source.add_argument("--karpathy", metavar="ANNOTATION.json", help="Karpathy-split annotation")
    parser.add_argument("--images", help="image folder of --karpathy")
    parser.add_argument(
        "--k-test", type=int, nargs="+", default=list(DEFAULT_K_TEST),
        help="ITC→ITM re-rank depths (BLIP: 256 COCO, 128 Flickr30K); clipped to the pool size",
    )  # fmt: skip
    parser.add_argument("--split", default="test", help="catalog split whose products are the pool")
    parser.add_argument(
        "--texts", choices=TEXT_SOURCES, default="queries",
        help="catalog texts: held-out shopper queries, or the products' own titles (pairs.parquet)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=None, help="default: encode.batch_size")
    parser.add_argument(
        "--token-cache-mb", type=float, default=2048,
        help="ITM image tokens kept between queries (evicted ones are recomputed)",
    )  # fmt: skip
    add_config_arguments(parser, ("model",))
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("blip_ops.evaluate").setLevel(logging.INFO)
    if any(k < 1 for k in args.k_test):
        print(f"error: --k-test values must be >= 1, got {args.k_test}", file=sys.stderr)
        return 2
    if args.images and not args.karpathy:
        print("error: --images goes with --karpathy", file=sys.stderr)
        return 2
    cfg = cli_config(args)
    if cfg is None:
        return 2
    from blip_ops.hub import ModelUnavailableError

    try:
        results = run_evaluation(
            cfg, args.out.expanduser().absolute(), catalog=args.catalog, karpathy=args.karpathy,
            images_dir=args.images, k_test=args.k_test, split=args.split, texts=args.texts,
            batch_size=args.batch_size, token_cache_mb=args.token_cache_mb,
        )  # fmt: skip
    except (ModelUnavailableError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
