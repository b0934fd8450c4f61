"""The index job end to end on a real local Ray: accounting, reruns, bad rows, model rollout, readers.

One small catalog and one first indexed run are shared by the whole module; every test that runs the
job again works on a copy of that index (shutil.copytree), so tests do not depend on their order.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.indexing import tables
from pipelines.indexing.validate import REJECT_REASONS, content_hash
from tests.conftest import draw_product, encode_image_bytes, index_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

N_PRODUCTS = 40
HTML = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body></body></html>"


# ---------------------------------------------------------------- helpers
def _run(cfg, **kw) -> dict:
    from pipelines.indexing.job import run_index

    return run_index(cfg, **kw)


def _embed(model, datas: list[bytes]) -> np.ndarray:
    """blip_ops' own embeddings of image bytes. (N, D) float32"""
    from blip_ops import decode_image

    size = model.image_settings.size
    images = [decode_image(d, target_size=size) for d in datas]
    return model.encode_images(model.preprocess(images)).embeddings.numpy()


def _rows_by_id(
    table, columns=("product_id", "title", "content_hash", "image_embedding", "run_id")
):
    rows = table.to_arrow().select(list(columns)).to_pylist()
    return {r["product_id"]: r for r in rows}


def _search(table, queries: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    out = []
    for q in queries:
        r = (
            table.search(q, vector_column_name="image_embedding")
            .distance_type("cosine")
            .select(["product_id", "_distance"])
            .limit(k)
            .to_arrow()
        )
        out.append(list(zip(r["product_id"].to_pylist(), r["_distance"].to_pylist(), strict=True)))
    return out


def _copy_index(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _write_catalog(
    rows: list[dict], schema: pa.Schema, folder: Path, per_file: int | None = None
) -> list[str]:
    """Rows as Parquet files under folder (part-00000.parquet, ...); returns the file names."""
    folder.mkdir(parents=True)
    per_file = per_file or max(1, len(rows))
    names = []
    for i, start in enumerate(range(0, len(rows), per_file)):
        name = f"part-{i:05d}.parquet"
        pq.write_table(
            pa.Table.from_pylist(rows[start : start + per_file], schema=schema), folder / name
        )
        names.append(name)
    return names


def check_accounting(index_uri: str, summary: dict) -> dict:
    """Per-run accounting: in == indexed + unchanged + rejected, one rejects row per rejected input
    row, and the published `runs` row says the same as the summary. Returns the runs row."""
    assert summary["in"] == summary["indexed"] + summary["unchanged"] + summary["rejected"], summary
    assert sum(summary["rejected_by_reason"].values()) == summary["rejected"], summary
    db = tables.connect(index_uri)
    runs = tables.open_tagged(db, tables.RUNS_TABLE)  # what readers see, not the latest version
    assert runs is not None
    rows = [r for r in runs.to_arrow().to_pylist() if r["run_id"] == summary["run_id"]]
    assert len(rows) == 1, f"expected one runs row for {summary['run_id']}, got {rows}"
    row = rows[0]
    assert row["rows_in"] == summary["in"]
    assert row["indexed"] == summary["indexed"]
    assert row["unchanged"] == summary["unchanged"]
    assert row["rejected"] == summary["rejected"]
    assert row["deleted"] == summary["deleted"]
    assert row["rows_in"] == row["indexed"] + row["unchanged"] + row["rejected"]
    assert json.loads(row["rejected_by_reason"]) == summary["rejected_by_reason"]
    assert row["model_id"] == summary["model_id"]
    assert row["products_table"] == summary["products_table"]
    assert row["products_version"] == summary["products_version"]
    assert row["rejects_version"] == summary["rejects_version"]
    pub = tables.published_run(db)
    assert pub["run_id"] == summary["run_id"]
    assert pub["products_table"] == summary["products_table"]
    assert pub["products_version"] == summary["products_version"]
    rejects = tables.open_tagged(db, tables.REJECTS_TABLE)
    assert rejects is not None
    mine = [r for r in rejects.to_arrow().to_pylist() if r["run_id"] == summary["run_id"]]
    assert len(mine) == summary["rejected"]
    assert Counter(r["reason"] for r in mine) == Counter(summary["rejected_by_reason"])
    check_report(index_uri, summary)
    return row


def check_report(index_uri: str, summary: dict) -> None:
    """The run's HTML report and resolved config sit in <index>/_runs/<run_id>/."""
    from pipelines.config import load_config

    if index_uri.startswith("s3://"):
        assert summary["report"] == f"{index_uri}/_runs/{summary['run_id']}/report.html"
        return
    report = Path(summary["report"])
    assert report.is_file() and report.parent == Path(index_uri) / "_runs" / summary["run_id"]
    page = report.read_text()
    assert summary["run_id"] in page and "Throughput over time" in page
    # a chart of rows finished, and one of images/s unless the run encoded nothing
    assert page.count("<svg") == (2 if summary["encoded_this_run"] > 1 else 1) or (
        page.count("<svg") == 1 and "(no batches)" in page
    )
    assert f"<th>rows in</th><td>{summary['in']}</td>" in page
    for reason, n in summary["rejected_by_reason"].items():
        assert f"<td>{reason}</td><td style='text-align:right'>{n:,}</td>" in page
    assert load_config(report.parent / "config.resolved.yaml").index.uri == index_uri


# ---------------------------------------------------------------- shared setup
@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from blip_ops import load_model

    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    from pipelines.catalog.writer import make_catalog

    root = tmp_path_factory.mktemp("catalog")
    make_catalog(str(root), N_PRODUCTS, seed=3, workers=1)
    products = root / "products"
    table = pq.read_table(products)
    return SimpleNamespace(
        uri=str(products), table=table, ids=table.column("product_id").to_pylist()
    )


@pytest.fixture(scope="module")
def base(catalog, tiny_model_dir, ray_local, tmp_path_factory):
    """The first run over the catalog, never mutated: tests copy it."""
    uri = str(tmp_path_factory.mktemp("base") / "lancedb")
    summary = _run(index_config(catalog.uri, uri, tiny_model_dir))
    return SimpleNamespace(uri=uri, summary=summary)


@pytest.fixture(scope="module")
def changed(catalog, base, model, tiny_model_dir, tmp_path_factory):
    """A run over the catalog with 10% of titles and 5% of images changed and 3 products dropped,
    on a copy of the base index, while a reader that opened the published table keeps searching."""
    tmp = tmp_path_factory.mktemp("changed")
    ids = catalog.ids
    title_changed, image_changed, dropped = ids[0:4], ids[4:6], ids[-3:]
    new_images = {
        pid: encode_image_bytes(draw_product(1000 + i, (140, 100)), "JPEG", quality=90)
        for i, pid in enumerate(image_changed)
    }
    rows = []
    for row in catalog.table.to_pylist():
        pid = row["product_id"]
        if pid in dropped:
            continue
        if pid in title_changed:
            row["title"] = row["title"] + " (2025 edition)"
        if pid in image_changed:
            row["image"] = new_images[pid]
        rows.append(row)
    _write_catalog(rows, catalog.table.schema, tmp / "products")
    uri = _copy_index(base.uri, tmp / "lancedb")

    reader = tables.open_published(tables.connect(uri))[0]
    old_rows = _rows_by_id(reader)
    queries = np.concatenate(
        [
            _embed(model, list(new_images.values())),
            np.stack([np.asarray(old_rows[p]["image_embedding"], np.float32) for p in ids[::8]]),
        ]
    )
    before = _search(reader, queries)

    during: list = []
    errors: list = []
    stop = threading.Event()

    def keep_reading() -> None:
        while not stop.is_set():
            try:
                during.append(_search(reader, queries))
            except Exception as err:  # reported by the test, not lost in the thread
                errors.append(err)
                return
            stop.wait(0.05)

    thread = threading.Thread(target=keep_reading, daemon=True)
    thread.start()
    try:
        summary = _run(index_config(str(tmp / "products"), uri, tiny_model_dir))
    finally:
        stop.set()
        thread.join(30)
    return SimpleNamespace(
        uri=uri,
        source=str(tmp / "products"),
        tmp=tmp,
        summary=summary,
        title_changed=title_changed,
        image_changed=image_changed,
        dropped=dropped,
        new_images=new_images,
        rows=rows,
        reader=reader,
        old_rows=old_rows,
        queries=queries,
        before=before,
        during=during,
        reader_errors=errors,
        after_same_reader=_search(reader, queries),
    )


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory):
    from blip_ops.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models2") / "tiny-seed1", seed=1)


# ---------------------------------------------------------------- 1. end to end
def test_first_run_indexes_every_product(base, catalog, model, ray_local):
    s = base.summary
    assert (s["in"], s["indexed"], s["unchanged"], s["rejected"], s["deleted"]) == (
        N_PRODUCTS,
        N_PRODUCTS,
        0,
        0,
        0,
    )
    assert s["encoded_this_run"] == N_PRODUCTS and s["resumed_from_staging"] == 0
    assert s["rejected_by_reason"] == {}
    assert s["model_id"] == model.model_id
    assert s["products_table"] == tables.products_table_name("products", model.model_id)
    assert s["products_rows"] == N_PRODUCTS
    check_accounting(base.uri, s)

    db = tables.connect(base.uri)
    products = tables.open_published(db)[0]
    assert products.version == s["products_version"]
    got = products.to_arrow()
    assert got.num_rows == N_PRODUCTS
    assert sorted(got.column("product_id").to_pylist()) == sorted(catalog.ids)

    src = {r["product_id"]: r for r in catalog.table.to_pylist()}
    ids = got.column("product_id").to_pylist()
    stored = np.stack(got.column("image_embedding").to_numpy(zero_copy_only=False)).astype(
        np.float32
    )
    assert stored.shape == (N_PRODUCTS, model.embedding_dim) and np.isfinite(stored).all()
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    # Images that are decoded at full size whatever the target (PNG, WebP) give exactly blip_ops'
    # embeddings; all images are compared in test_stored_embeddings_equal_blip_ops_embeddings.
    full_size = [i for i, p in enumerate(ids) if src[p]["image_format"] != "JPEG"]
    assert full_size
    np.testing.assert_allclose(
        stored[full_size],
        _embed(model, [src[ids[i]]["image"] for i in full_size]),
        atol=1e-5,
        rtol=0,
    )

    # Each product's stored image embedding finds that product first: exact numpy and LanceDB.
    sims = stored @ stored.T  # (N, N)
    assert [ids[j] for j in sims.argmax(axis=1)] == ids
    for pid, vec in zip(ids, stored, strict=True):
        top = _search(products, vec[None, :], k=1)[0]
        assert top[0][0] == pid, (pid, top)
        assert top[0][1] == pytest.approx(0.0, abs=1e-5)

    size = model.image_settings.size
    for row in got.to_pylist():
        pid = row["product_id"]
        assert row["title"] == src[pid]["title"]
        assert row["title_normalized"] == model.normalize_text(src[pid]["title"])
        assert row["model_id"] == model.model_id
        assert row["run_id"] == s["run_id"]
        assert row["content_hash"] == content_hash(src[pid]["image"], src[pid]["title"])
        assert row["indexed_at"] is not None
        for col in ("category", "price", "brand", "title_lang", "split"):  # configured metadata
            assert row[col] == src[pid][col], (pid, col)
        with Image.open(io.BytesIO(row["model_image"])) as im:
            assert im.format == "JPEG" and im.size == (size, size)
        with Image.open(io.BytesIO(row["thumbnail"])) as th:
            assert th.format == "JPEG"
            assert max(th.size) <= 256
            assert max(th.size) == min(256, max(src[pid]["image_width"], src[pid]["image_height"]))

    tags = db.open_table(s["products_table"]).tags.list()
    assert tags[tables.PUBLISHED]["version"] == s["products_version"]
    assert tags[f"{tables.RUN_TAG_PREFIX}{s['run_id']}"]["version"] == s["products_version"]


def test_stored_embeddings_equal_blip_ops_embeddings(base, catalog, model, ray_local):
    """The indexed embedding of every image is what blip_ops computes for the same bytes (what an
    image query, evaluation and the bench compute), so a product's own photo finds it first."""
    check_accounting(base.uri, base.summary)
    products = tables.open_published(tables.connect(base.uri))[0]
    got = products.to_arrow()
    src = {
        r["product_id"]: r["image"]
        for r in catalog.table.select(["product_id", "image"]).to_pylist()
    }
    ids = got.column("product_id").to_pylist()
    reference = _embed(model, [src[p] for p in ids])
    misses = []
    for pid, vec in zip(ids, reference, strict=True):
        top = _search(products, vec[None, :], k=1)[0]
        if top[0][0] != pid:
            misses.append((pid, top))
    stored = np.stack(got.column("image_embedding").to_numpy(zero_copy_only=False))
    worst = float(np.abs(stored - reference).max())
    assert worst <= 1e-5 and not misses, (
        f"max |stored - blip_ops| = {worst:.3g}; own photo not first: {misses}"
    )


# ---------------------------------------------------------------- 2. rerun, nothing changed
def test_rerun_without_changes_encodes_nothing(base, catalog, tiny_model_dir, ray_local, tmp_path):
    uri = _copy_index(base.uri, tmp_path / "lancedb")
    db = tables.connect(uri)
    before = tables.open_published(db)[0]
    before_rows = _rows_by_id(before)
    runs_before = db.open_table(tables.RUNS_TABLE).count_rows()

    s = _run(index_config(catalog.uri, uri, tiny_model_dir))

    assert s["encoded_this_run"] == 0 and s["indexed"] == 0 and s["resumed_from_staging"] == 0
    assert s["unchanged"] == s["in"] == N_PRODUCTS
    assert s["rejected"] == 0 and s["deleted"] == 0
    check_accounting(uri, s)
    assert s["products_version"] == base.summary["products_version"]
    db = tables.connect(uri)
    after = tables.open_published(db)[0]
    assert after.version == before.version
    assert _rows_by_id(after) == before_rows  # ids, hashes, embeddings, titles, run_ids
    assert db.open_table(tables.RUNS_TABLE).count_rows() == runs_before + 1
    tags = db.open_table(s["products_table"]).tags.list()
    assert tags[f"{tables.RUN_TAG_PREFIX}{s['run_id']}"]["version"] == before.version


# ---------------------------------------------------------------- 3. rerun after changes, deletes
def test_rerun_after_changes_encodes_only_changed_rows(
    changed, base, model, tiny_model_dir, ray_local, tmp_path
):
    s = changed.summary
    n_changed = len(changed.title_changed) + len(changed.image_changed)
    n_in = N_PRODUCTS - len(changed.dropped)
    assert s["in"] == n_in
    assert s["encoded_this_run"] == n_changed
    assert s["indexed"] == n_changed and s["unchanged"] == n_in - n_changed
    assert s["rejected"] == 0 and s["deleted"] == 0
    check_accounting(changed.uri, s)

    products = tables.open_published(tables.connect(changed.uri))[0]
    now = _rows_by_id(
        products,
        (
            "product_id",
            "title",
            "title_normalized",
            "content_hash",
            "image_embedding",
            "run_id",
            "indexed_at",
        ),
    )
    old = changed.old_rows
    assert set(now) == set(old)  # without delete_missing the dropped products stay
    src = {r["product_id"]: r for r in changed.rows}
    new_emb = dict(
        zip(
            changed.image_changed,
            _embed(model, [changed.new_images[p] for p in changed.image_changed]),
            strict=True,
        )
    )
    for pid, row in now.items():
        if pid in changed.title_changed or pid in changed.image_changed:
            assert row["run_id"] == s["run_id"], pid
            assert row["title"] == src[pid]["title"]
            assert row["title_normalized"] == model.normalize_text(src[pid]["title"])
            assert row["content_hash"] == content_hash(src[pid]["image"], src[pid]["title"])
            assert row["content_hash"] != old[pid]["content_hash"]
            if pid in changed.image_changed:
                np.testing.assert_allclose(row["image_embedding"], new_emb[pid], atol=1e-5, rtol=0)
                assert not np.allclose(
                    row["image_embedding"], old[pid]["image_embedding"], atol=1e-4
                )
            else:  # same image, same embedding
                np.testing.assert_allclose(
                    row["image_embedding"], old[pid]["image_embedding"], atol=1e-5
                )
        else:  # unchanged and dropped products: untouched
            assert {k: row[k] for k in old[pid]} == old[pid], pid
            assert row["run_id"] == base.summary["run_id"]

    # A further run with delete_missing removes exactly the dropped products.
    uri = _copy_index(changed.uri, tmp_path / "lancedb")
    d = _run(index_config(changed.source, uri, tiny_model_dir, "index.delete_missing=true"))
    assert d["deleted"] == len(changed.dropped)
    assert (
        d["in"] == n_in
        and d["unchanged"] == n_in
        and d["indexed"] == 0
        and d["encoded_this_run"] == 0
    )
    assert d["products_rows"] == n_in
    check_accounting(uri, d)
    after = _rows_by_id(tables.open_published(tables.connect(uri))[0])
    assert set(after) == set(now) - set(changed.dropped)
    assert {p: after[p]["content_hash"] for p in after} == {
        p: now[p]["content_hash"] for p in after
    }


# ---------------------------------------------------------------- 4. bad rows
def test_bad_rows_are_rejected_with_reasons_and_keep_last_good_row(
    base, catalog, model, tiny_model_dir, ray_local, tmp_path
):
    from tests.test_decode import _handcrafted_png, _truncated_jpeg

    ids = catalog.ids
    src = {r["product_id"]: r for r in catalog.table.to_pylist()}
    meta = {k: src[ids[0]][k] for k in ("title_lang", "category", "brand", "price", "split")}
    rng = np.random.default_rng(0)
    jpeg = encode_image_bytes(draw_product(7), "JPEG")
    big = encode_image_bytes(
        Image.fromarray(rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)), "JPEG", quality=95
    )
    max_bytes = 600_000
    assert len(big) > max_bytes > max(len(src[p]["image"]) for p in ids)

    def row(pid, title, image, **kw):
        return {**meta, "product_id": pid, "title": title, "image": image, "image_uri": None, **kw}

    good_old = [{**src[p], "image_uri": None} for p in ids[2:8]]  # unchanged since the base run
    new_good = {
        "new-good-jpeg": encode_image_bytes(draw_product(21), "JPEG"),
        "new-good-png": encode_image_bytes(draw_product(22), "PNG"),
    }
    # (row, expected reasons): bad rows interleaved with good ones, the duplicates in different files.
    plan = [
        (row(None, "no id", jpeg), {"missing_product_id"}),
        (good_old[0], None),
        (row("", "empty id", jpeg), {"missing_product_id"}),
        (row("dup-1", "first copy", jpeg), {"duplicate_product_id"}),
        (row("new-good-jpeg", "a new lamp", new_good["new-good-jpeg"]), None),
        # was good in the base run; its new row fails validation
        ({**src[ids[1]], "image_uri": None, "title": ""}, {"empty_title"}),
        (row("no-image", "no image at all", None), {"missing_image"}),
        (good_old[1], None),
        (row("zero-bytes", "zero-length image", b""), {"missing_image"}),
        (row("too-big", "a huge photo", big), {"image_too_large"}),
        (good_old[2], None),
        # was good in the base run; its new image fails to decode
        ({**src[ids[0]], "image_uri": None, "image": _truncated_jpeg()}, {"truncated_image"}),
        (row("huge-png", "bomb", _handcrafted_png(20000, 20000)), {"too_many_pixels"}),
        (row("html", "error page", HTML), {"unsupported_format"}),
        (good_old[3], None),
        (
            row("garbage", "jpeg magic, noise", b"\xff\xd8\xff\xe0" + rng.bytes(3000)),
            {"truncated_image", "corrupt_image"},
        ),
        (row("new-good-png", "a new rug", new_good["new-good-png"]), None),
        (good_old[4], None),
        (
            row("dup-1", "second copy", encode_image_bytes(draw_product(8), "JPEG")),
            {"duplicate_product_id"},
        ),
        (good_old[5], None),
    ]
    schema = pa.schema(
        [f.with_nullable(True) for f in catalog.table.schema] + [pa.field("image_uri", pa.string())]
    )
    per_file = 10
    files = _write_catalog([r for r, _ in plan], schema, tmp_path / "products", per_file=per_file)
    assert len(files) == 2
    expected = {
        (files[i // per_file], i % per_file): (r["product_id"], reasons)
        for i, (r, reasons) in enumerate(plan)
        if reasons is not None
    }

    uri = _copy_index(base.uri, tmp_path / "lancedb")
    s = _run(
        index_config(
            str(tmp_path / "products"), uri, tiny_model_dir, f"source.max_image_bytes={max_bytes}",
            "index.max_reject_fraction=1.0",  # most of its rows are bad on purpose
        )
    )  # fmt: skip

    n_bad = len(expected)
    assert s["in"] == len(plan)
    assert s["rejected"] == n_bad
    assert s["indexed"] == len(new_good) and s["encoded_this_run"] == len(new_good)
    assert s["unchanged"] == len(good_old)
    check_accounting(uri, s)

    rejects = tables.open_tagged(tables.connect(uri), tables.REJECTS_TABLE).to_arrow().to_pylist()
    mine = [r for r in rejects if r["run_id"] == s["run_id"]]
    got = {}
    for r in mine:
        assert r["source_file"] is not None and r["row_number"] is not None, r
        assert Path(r["source_file"]).parent == tmp_path / "products", r
        key = (Path(r["source_file"]).name, r["row_number"])
        assert key not in got, f"two rejects rows for {key}"
        got[key] = r
    assert set(got) == set(expected)
    for key, (pid, reasons) in expected.items():
        r = got[key]
        assert r["product_id"] == pid, (key, r)
        assert r["reason"] in reasons, (key, pid, r["reason"], r["detail"])
        assert r["stage"] == ("validate" if r["reason"] in REJECT_REASONS else "decode"), r
        assert r["detail"], r
    garbage_reason = next(r["reason"] for r in mine if r["product_id"] == "garbage")
    assert s["rejected_by_reason"] == dict(
        Counter(
            {
                "missing_product_id": 2,
                "duplicate_product_id": 2,
                "empty_title": 1,
                "missing_image": 2,
                "image_too_large": 1,
                "truncated_image": 1,
                "too_many_pixels": 1,
                "unsupported_format": 1,
            }
        )
        + Counter({garbage_reason: 1})
    )

    old = _rows_by_id(tables.open_published(tables.connect(base.uri))[0])
    now = _rows_by_id(tables.open_published(tables.connect(uri))[0])
    assert set(now) == set(old) | set(new_good)  # nothing bad got in, nothing was deleted
    for pid in ids[:2]:  # their new rows were rejected: the last good row stays, untouched
        assert now[pid] == old[pid], pid
    ref = _embed(model, list(new_good.values()))
    for pid, vec in zip(new_good, ref, strict=True):
        np.testing.assert_allclose(now[pid]["image_embedding"], vec, atol=1e-5, rtol=0)
        assert now[pid]["run_id"] == s["run_id"]


# ---------------------------------------------------------------- 5. model rollout
def test_model_change_writes_a_shadow_table_and_switches_only_on_publish(
    base, catalog, model, second_model_dir, ray_local, tmp_path, monkeypatch
):
    from blip_ops import load_model

    model2 = load_model(second_model_dir, device="cpu")
    assert model2.model_id != model.model_id
    uri = _copy_index(base.uri, tmp_path / "lancedb")
    old_name = base.summary["products_table"]
    new_name = tables.products_table_name("products", model2.model_id)
    assert new_name != old_name

    db = tables.connect(uri)
    pointer = tables.published_run(db)
    assert pointer["products_table"] == old_name and pointer["model_id"] == model.model_id
    reader = tables.open_published(db)[0]
    old_rows = _rows_by_id(reader)
    queries = np.stack(
        [np.asarray(old_rows[p]["image_embedding"], np.float32) for p in catalog.ids[::5]]
    )
    old_results = _search(reader, queries)
    cfg2 = index_config(catalog.uri, uri, second_model_dir)

    # The run dies after merging into the new table and writing its runs row, at its first tag.
    real_move_tag = tables.move_tag
    calls = []

    def move_tag_dies_first(table, tag, version):
        calls.append(tag)
        if len(calls) == 1:
            raise RuntimeError("simulated crash before publishing")
        return real_move_tag(table, tag, version)

    with monkeypatch.context() as m:
        m.setattr(tables, "move_tag", move_tag_dies_first)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _run(cfg2, run_id="model2-crashed")
    assert calls == [f"{tables.RUN_TAG_PREFIX}model2-crashed"]  # run-<id> is the first tag moved
    db = tables.connect(uri)
    assert new_name in tables.table_names(db)  # the merge happened...
    assert db.open_table(new_name).count_rows() == N_PRODUCTS
    assert tables.open_tagged(db, new_name) is None  # ...but nothing was published
    assert tables.published_run(db) == pointer
    fresh = tables.open_published(db)[0]
    assert fresh.name == old_name and fresh.version == reader.version
    assert _rows_by_id(fresh) == old_rows
    assert _search(reader, queries) == old_results
    assert _search(fresh, queries) == old_results

    # The rerun publishes the new table (reusing what the dead run had staged).
    s = _run(cfg2, run_id="model2-ok")
    assert s["model_id"] == model2.model_id and s["products_table"] == new_name
    assert s["in"] == N_PRODUCTS and s["indexed"] == N_PRODUCTS and s["rejected"] == 0
    # Nothing is encoded twice: the dead run had staged every row.
    assert s["resumed_from_staging"] == N_PRODUCTS and s["encoded_this_run"] == 0
    check_accounting(uri, s)
    db = tables.connect(uri)
    pub = tables.published_run(db)
    assert pub["products_table"] == new_name and pub["model_id"] == model2.model_id
    new = tables.open_published(db)[0]
    got = new.to_arrow()
    assert sorted(got.column("product_id").to_pylist()) == sorted(catalog.ids)
    assert set(got.column("model_id").to_pylist()) == {model2.model_id}
    src = {r["product_id"]: r for r in catalog.table.to_pylist()}
    stored = np.stack(got.column("image_embedding").to_numpy(zero_copy_only=False))
    ids = got.column("product_id").to_pylist()
    old_emb = np.stack([old_rows[p]["image_embedding"] for p in ids])
    assert np.abs(stored - old_emb).max(axis=1).min() > 1e-3  # every row is in the new space
    # (JPEGs: see test_stored_embeddings_equal_blip_ops_embeddings)
    full_size = [i for i, p in enumerate(ids) if src[p]["image_format"] != "JPEG"]
    np.testing.assert_allclose(
        stored[full_size],
        _embed(model2, [src[ids[i]]["image"] for i in full_size]),
        atol=1e-5,
        rtol=0,
    )

    # The old table is intact and still opens at its own published tag (rollback is a tag move).
    old_tagged = tables.open_tagged(db, old_name)
    assert old_tagged.version == base.summary["products_version"]
    assert _rows_by_id(old_tagged) == old_rows
    assert _search(reader, queries) == old_results


# ---------------------------------------------------------------- 6. readers pin a version
def test_open_reader_keeps_its_version_while_a_run_publishes(changed, base, ray_local):
    assert not changed.reader_errors, changed.reader_errors
    assert changed.summary["encoded_this_run"] > 0
    check_accounting(changed.uri, changed.summary)
    assert len(changed.during) >= 3, (
        f"the reader searched only {len(changed.during)} times during the run"
    )
    for results in changed.during:
        assert results == changed.before  # same ids, same scores, every time
    assert changed.after_same_reader == changed.before
    assert changed.reader.version == base.summary["products_version"]
    assert _rows_by_id(changed.reader) == changed.old_rows

    reopened = tables.open_published(tables.connect(changed.uri))[0]
    assert (
        reopened.version == changed.summary["products_version"] > base.summary["products_version"]
    )
    now = _rows_by_id(reopened)
    for pid in changed.title_changed:
        assert now[pid]["title"].endswith("(2025 edition)")
        assert changed.old_rows[pid]["title"] != now[pid]["title"]
    new_results = _search(reopened, changed.queries)
    assert new_results != changed.before
    for i, pid in enumerate(changed.image_changed):  # the new photos now find their products
        assert new_results[i][0][0] == pid
        assert new_results[i][0][1] == pytest.approx(0.0, abs=1e-5)
        assert changed.before[i][0][1] > 1e-5


def test_referenced_images_index_like_inline_ones(base, tiny_model_dir, ray_local, tmp_path):
    """image_uri rows (relative to the catalog folder) give the same rows as inline images; a
    reference to a missing file is a rejected row with a reason, not a failed job."""
    from pipelines.catalog.writer import make_catalog

    root = tmp_path / "files-catalog"
    make_catalog(str(root), N_PRODUCTS, seed=3, workers=1, image_mode="files")
    products = root / "products"
    uris = pq.read_table(products).select(["product_id", "image_uri"]).to_pylist()
    gone = uris[7]
    (products / gone["image_uri"]).unlink()
    uri = str(tmp_path / "lancedb")
    s = _run(index_config(str(products), uri, tiny_model_dir))
    assert (s["in"], s["indexed"], s["rejected"]) == (N_PRODUCTS, N_PRODUCTS - 1, 1)
    assert s["rejected_by_reason"] == {"image_unreadable": 1}
    check_accounting(uri, s)
    rejects = tables.open_tagged(tables.connect(uri), tables.REJECTS_TABLE).to_arrow().to_pylist()
    assert [(r["product_id"], r["stage"]) for r in rejects] == [(gone["product_id"], "decode")]
    got = _rows_by_id(
        tables.open_published(tables.connect(uri))[0], ("product_id", "image_embedding")
    )
    want = _rows_by_id(
        tables.open_published(tables.connect(base.uri))[0], ("product_id", "image_embedding")
    )
    assert set(got) == set(want) - {gone["product_id"]}
    for pid, row in got.items():
        np.testing.assert_allclose(row["image_embedding"], want[pid]["image_embedding"], atol=1e-6)
