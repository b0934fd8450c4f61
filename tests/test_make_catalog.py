"""The demo catalog generator: determinism, the catalog contract, families, splits, S3."""

from __future__ import annotations

import io
import itertools
import json
import re
from collections import defaultdict

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from blip_ops.decode import decode_image
from pipelines import make_catalog as cli
from pipelines.catalog import writer as mc
from pipelines.catalog.plan import SPLITS, plan_catalog
from pipelines.catalog.titles import to_pinyin
from pipelines.catalog.vocab import BRANDS, COLORS, MATERIALS, PATTERNS
from pipelines.storage import S3Settings, filesystem_for

N = 60
VISIBLE = ("color", "pattern", "material", "brand")
_CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    manifest = mc.make_catalog(str(out), N, seed=11, rows_per_file=25, workers=2)
    return out, manifest


def _products(root) -> list[dict]:
    return sorted(
        ds.dataset(str(root / "products"), format="parquet").to_table().to_pylist(),
        key=lambda r: r["product_id"],
    )


def _visible_diff(a: bytes, b: bytes) -> float:
    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.int16)
    return float((np.abs(x - y).max(axis=-1) > 30).mean())


# ---- the plan (no rendering) -----------------------------------------------------------------
def test_plan_is_deterministic_and_seeded():
    assert plan_catalog(300, 7) == plan_catalog(300, 7)
    assert plan_catalog(300, 7) != plan_catalog(300, 8)
    # A product does not depend on how many come after it.
    assert plan_catalog(100, 7) == plan_catalog(300, 7)[:100]


def test_families_differ_in_exactly_one_visible_attribute():
    products = plan_catalog(1000, 3)
    families = defaultdict(list)
    for p in products:
        families[p.family_id].append(p)
    assert sum(len(f) > 1 for f in families.values()) > 100
    for fam in families.values():
        assert len({p.split for p in fam}) == 1, "a family straddles two splits"
        for a, b in itertools.combinations(fam, 2):
            changed = [attr for attr in VISIBLE if getattr(a, attr) != getattr(b, attr)]
            assert changed == [a.differs_by], (a, b)
            # Same shot: layout, size, format, kind, code.
            for same in (
                "kind",
                "layout_seed",
                "width",
                "height",
                "image_format",
                "model_code",
                "style",
            ):
                assert getattr(a, same) == getattr(b, same)
    axes = {f[0].differs_by for f in families.values() if len(f) > 1}
    assert axes == set(VISIBLE)
    assert {p.split for p in products} == set(SPLITS)


def test_split_languages_and_formats_are_realistic_mixes():
    products = plan_catalog(2000, 5)
    share = lambda key, value: sum(getattr(p, key) == value for p in products) / len(products)  # noqa: E731
    assert 0.15 < share("split", "test") < 0.25
    assert 0.06 < share("split", "val") < 0.14
    assert 0.64 < share("split", "train") < 0.76
    for lang in ("en", "zh", "pinyin"):
        assert share("title_lang", lang) > 0.1
    assert (
        share("image_format", "JPEG") > 0.75
        and share("image_format", "PNG") > 0
        and share("image_format", "WEBP") > 0
    )
    assert all(400 <= p.width <= 1000 and 400 <= p.height <= 1000 for p in products)
    assert len({p.kind for p in products}) >= 30


def test_titles_name_every_visible_attribute_in_each_language():
    for p in plan_catalog(400, 9):
        en, zh, py = " ".join(p.titles["en"].split()), p.titles["zh"], p.titles["pinyin"]
        assert p.color in en.lower() and MATERIALS[p.material][0] in en.lower()
        assert BRANDS[p.brand].en in en and p.model_code in en
        assert (
            COLORS[p.color][1] in zh and MATERIALS[p.material][1] in zh and BRANDS[p.brand].zh in zh
        )
        assert not _CJK.search(py) and py == to_pinyin(zh)
        assert p.title == p.titles[p.title_lang]
        assert len(en.split()) >= 6  # long, noisy listings, not labels


def test_queries_are_short_not_copies_and_name_the_varying_attribute():
    words = {
        "color": lambda p: p.color,
        "material": lambda p: MATERIALS[p.material][0].split()[-1],
        "brand": lambda p: BRANDS[p.brand].en.lower(),
        "pattern": lambda p: PATTERNS[p.pattern][0],
    }
    for p in plan_catalog(400, 9):
        q = p.queries
        assert set(q) == {"en", "zh", "pinyin"}
        assert q["en"] != p.titles["en"].lower() and len(q["en"].split()) <= 8
        assert q["zh"] not in p.titles["zh"] or len(q["zh"]) < len(p.titles["zh"]) / 2
        assert q["pinyin"] == to_pinyin(q["zh"])
        if p.differs_by:
            assert words[p.differs_by](p) in q["en"], (p.differs_by, q["en"])
            assert p.query_attributes[p.differs_by] is not None
        # query_attributes says exactly which attribute words the query holds.
        assert set(p.query_attributes) == set(VISIBLE)
        for attr, word in words.items():
            named = p.query_attributes[attr]
            assert (f" {word(p)} " in f" {q['en']} ") == (named is not None), (attr, q["en"])
        values = {"color": p.color, "pattern": p.pattern, "material": p.material}
        values["brand"] = BRANDS[p.brand].en
        assert all(v is None or v == values[a] for a, v in p.query_attributes.items())


# ---- the written catalog ------------------------------------------------------------------------
def test_catalog_contract_and_schema(catalog):
    root, manifest = catalog
    files = sorted(f.name for f in (root / "products").glob("*.parquet"))
    assert (
        files
        == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
        == manifest["files"]
    )
    schema = ds.dataset(str(root / "products"), format="parquet").schema
    assert schema.remove_metadata() == mc.products_schema("inline")
    rows = _products(root)
    assert len(rows) == N == manifest["products"]
    assert len({r["product_id"] for r in rows}) == N and all(r["product_id"] for r in rows)
    assert all(r["title"].strip() for r in rows)
    for r in rows:
        im = decode_image(r["image"])
        assert im.size == (r["image_width"], r["image_height"])
        assert Image.open(io.BytesIO(r["image"])).format == r["image_format"]
    assert not list((root / "products").glob(".*"))  # no temporary files left


def test_side_files_pairs_queries_manifest(catalog):
    root, manifest = catalog
    rows = {r["product_id"]: r for r in _products(root)}
    pairs_table = pq.read_table(root / "pairs.parquet")
    assert pairs_table.schema.remove_metadata() == mc.PAIRS_SCHEMA
    pairs = pairs_table.to_pylist()
    assert len(pairs) == N
    for pair in pairs:
        row = rows[pair["product_id"]]
        assert row["title"] == pair[f"title_{pair['title_lang']}"]
        for column in ("title_en", "title_zh", "title_pinyin"):  # products/ has them too
            assert row[column] == pair[column], column
        for column in ("split", "family_id", "kind", *VISIBLE, "differs_by"):
            assert pair[column] == row[column], column
    queries_table = pq.read_table(root / "queries.parquet")
    assert queries_table.schema.remove_metadata() == mc.QUERIES_SCHEMA
    queries = queries_table.to_pylist()
    held_out = {pid for pid, r in rows.items() if r["split"] in ("val", "test")}
    assert {r["split"] for r in rows.values()} == set(SPLITS)  # this seed has all three
    assert {q["product_id"] for q in queries} == held_out
    assert len(queries) == 3 * len(held_out) == manifest["queries"]
    named = 0
    for q in queries:
        product = rows[q["product_id"]]
        assert q["split"] == product["split"] and q["kind"] == product["kind"]
        assert q["family_id"] == product["family_id"]
        for attr in VISIBLE:
            assert q[attr] is None or q[attr] == product[attr], (attr, q)
            named += q[attr] is not None
        if product["differs_by"]:
            assert q[product["differs_by"]] == product[product["differs_by"]]
    assert named >= len(queries)  # one or two attributes per query, on average at least one
    assert manifest["splits"] == {s: sum(r["split"] == s for r in rows.values()) for s in SPLITS}
    assert manifest["generator_version"] == mc.GENERATOR_VERSION == 3
    assert json.loads((root / "manifest.json").read_text()) == manifest


def test_near_duplicates_differ_visibly_in_pixels(catalog):
    root, _ = catalog
    families = defaultdict(list)
    for r in _products(root):
        families[r["family_id"]].append(r)
    pairs = [(a, b) for fam in families.values() for a, b in itertools.combinations(fam, 2)]
    assert len(pairs) >= 10
    for a, b in pairs:
        assert _visible_diff(a["image"], b["image"]) >= 0.005, (
            a["product_id"],
            b["product_id"],
            a["differs_by"],
        )


def test_deterministic_across_runs_and_worker_counts(catalog, tmp_path):
    root, _ = catalog
    again = tmp_path / "again"
    mc.make_catalog(str(again), N, seed=11, rows_per_file=25, workers=1)
    assert _products(again) == _products(root)
    other = tmp_path / "other-seed"
    mc.make_catalog(str(other), N, seed=12, rows_per_file=25, workers=1)
    assert _products(other) != _products(root)


def test_files_mode_references_the_same_images(catalog, tmp_path):
    root, _ = catalog
    out = tmp_path / "files"
    mc.make_catalog(str(out), N, seed=11, image_mode="files", rows_per_file=N, workers=1)
    inline = {r["product_id"]: r["image"] for r in _products(root)}
    rows = _products(out)
    assert "image" not in rows[0]
    for r in rows:
        assert not r["image_uri"].startswith("/")  # relative to the catalog folder
        assert (out / "products" / r["image_uri"]).read_bytes() == inline[r["product_id"]]


def test_existing_catalog_is_not_overwritten_silently(catalog, tmp_path):
    out = tmp_path / "twice"
    mc.make_catalog(str(out), 5, seed=1, workers=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        mc.make_catalog(str(out), 5, seed=1, workers=1)
    manifest = mc.make_catalog(str(out), 3, seed=1, workers=1, overwrite=True)
    assert len(_products(out)) == 3 == manifest["products"]


def test_writes_to_s3_compatible_server(s3_server, s3_bucket, catalog):
    root, _ = catalog
    settings = S3Settings(endpoint_url=s3_server, allow_http=True)
    uri = f"s3://{s3_bucket}/catalogs/demo"
    manifest = mc.make_catalog(uri, N, seed=11, rows_per_file=25, workers=2, s3=settings)
    fs, path = filesystem_for(uri, settings)
    table = ds.dataset(f"{path}/products", format="parquet", filesystem=fs).to_table()
    assert sorted(table.to_pylist(), key=lambda r: r["product_id"]) == _products(root)
    assert mc.read_manifest(uri, settings) == manifest


def test_s3_plain_http_needs_allow_http(s3_server, s3_bucket):
    with pytest.raises(ValueError, match="allow_http"):
        filesystem_for(f"s3://{s3_bucket}/x", S3Settings(endpoint_url=s3_server))


def test_cli_summary_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["--out", str(out), "--products", "8", "--seed", "2", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "8 products" in printed and "source.uri" in printed
    from pipelines.config import load_config

    assert load_config(out / "config.resolved.yaml").s3.allow_http is False  # written next to the output
    assert cli.main(["--out", str(out), "--products", "8"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path / "x"), "--products", "0"]) == 2


def test_every_family_pair_of_a_larger_plan_differs_visibly():
    """Rendered straight from the plan (no files), all families of a 250-product catalog."""
    from pipelines.catalog.render import render_product

    families = defaultdict(list)
    for p in plan_catalog(250, 4):
        families[p.family_id].append(p)
    checked = 0
    for fam in families.values():
        images = [np.asarray(render_product(mc.render_spec(p)), dtype=np.int16) for p in fam]
        for (a, x), (b, y) in itertools.combinations(zip(fam, images, strict=True), 2):
            share = float((np.abs(x - y).max(axis=-1) > 30).mean())
            assert share >= 0.005, (a.product_id, b.product_id, a.differs_by, share)
            checked += 1
    assert checked >= 150
