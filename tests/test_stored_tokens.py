"""ITM image tokens stored at index time (``index.store_itm_tokens``).

The encoder stores the tokens its own vision pass made (float16, so within float16 rounding of a
recompute from the same pixels); a changed product gets new tokens in the run that re-encodes it,
while a setting change alone re-encodes nothing; the re-rank reads them instead of running the
vision tower and ranks as the recompute path does; exports leave them out unless asked.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.decode import decode_image
from blip_ops.token_cache import StoredTokens, pack_tokens, stored_nbytes, token_shape
from pipelines.indexing import staging, tables
from pipelines.indexing.stages import (
    DETAIL,
    PEAK_RSS,
    REASON,
    ROW_NUMBER,
    SOURCE_FILE,
    STATUS,
    stores_itm_tokens,
)
from pipelines.search.scorer import ItmJob, QueryScorer
from tests.conftest import draw_product, encode_image_bytes, index_config
from tests.test_encode_batch import _batch, _encoder

F16 = {"rtol": 2e-3, "atol": 1e-4}  # float16 keeps 11 significant bits


def _tokens(row: dict) -> np.ndarray | None:
    if row["itm_tokens"] is None:
        return None
    return StoredTokens(row["itm_tokens"], tuple(row["itm_tokens_shape"])).tensor().numpy()


def _recomputed(model, blobs: list[bytes]) -> np.ndarray:
    """The tiny model's tokens of image bytes, decoded as the index job decodes them. (B, N, H)"""
    size = model.image_settings.size
    images = [decode_image(b, target_size=size) for b in blobs]
    return model.encode_images(model.preprocess(images), return_tokens=True).tokens.numpy()


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    return [encode_image_bytes(draw_product(i, (90 + 20 * i, 80))) for i in range(4)]


# ---- the encoder stage, no Ray ------------------------------------------------------------------
def test_stored_tokens_equal_recomputed_ones(tiny_model_dir, blobs):
    enc = _encoder(tiny_model_dir)  # stores tokens: the tiny model's 65x32 = 4160 bytes
    out = enc(_batch([*blobs, b"not an image"])).to_pylist()
    want = _recomputed(enc.model, blobs)
    assert token_shape(enc.model) == want.shape[1:] == (65, 32)
    for row, tokens in zip(out, want, strict=False):
        assert row["itm_tokens_shape"] == [65, 32]
        assert len(row["itm_tokens"]) == stored_nbytes((65, 32)) == 4160
        np.testing.assert_allclose(_tokens(row), tokens, **F16)
    assert out[-1][STATUS] == "rejected" and out[-1]["itm_tokens"] is None
    assert stores_itm_tokens("auto", (50, 384), 65536)  # the compact model: 38 KB, stored
    assert not stores_itm_tokens("auto", (577, 768), 65536)  # BLIP-base: 886 KB, recomputed


@pytest.mark.parametrize(
    ("mode", "limit", "stored"),
    [("never", 65536, False), ("auto", 4159, False), ("auto", 4160, True), ("always", 1, True)],
)
def test_the_setting_decides_what_is_stored(tiny_model_dir, blobs, mode, limit, stored):
    assert stores_itm_tokens(mode, (65, 32), limit) is stored
    decided = stores_itm_tokens(mode, token_shape(_encoder(tiny_model_dir).model), limit)
    enc = _encoder(tiny_model_dir, store_itm_tokens=decided)  # as the driver passes it
    out = enc(_batch(blobs[:2]))
    assert out.column(tables.ITM_TOKENS).null_count == (0 if stored else 2)
    assert out.column(tables.ITM_TOKENS_SHAPE).null_count == (0 if stored else 2)


def test_bad_settings_and_tokens_are_refused(tiny_model_dir):
    import torch

    with pytest.raises(ValueError, match="got 'sometimes'"):
        stores_itm_tokens("sometimes", (65, 32), 65536)
    with pytest.raises(ValueError, match="take 8 bytes, got 6"):
        StoredTokens(b"\0" * 6, (2, 2))
    overflow = torch.tensor([[[1.0, 7e4]], [[1.0, 2.0]]])  # past float16's largest, 65504
    assert [p is None for p in pack_tokens(overflow)] == [True, False]


# ---- staging and merge into a table written before the token columns ---------------------------
def _old_schema() -> pa.Schema:
    full = tables.products_schema(4)
    return pa.schema(
        [f for f in full if f.name not in (tables.ITM_TOKENS, tables.ITM_TOKENS_SHAPE)]
    )


def _rows(ids: list[str], schema: pa.Schema, tokens: bytes | None = None) -> pa.Table:
    n = len(ids)
    cols = {
        "product_id": ids,
        "title": ids,
        "title_normalized": ids,
        "image_embedding": [[1.0, 0.0, 0.0, 0.0]] * n,
        "model_image": [b"jpg"] * n,
        "thumbnail": [b"th"] * n,
        "content_hash": [f"h-{p}" for p in ids],
        "model_id": ["m"] * n,
        "indexed_at": [None] * n,
        "run_id": ["old"] * n,
        tables.ITM_TOKENS: [tokens] * n,
        tables.ITM_TOKENS_SHAPE: [[2, 2] if tokens else None] * n,
    }
    return pa.table({f.name: cols[f.name] for f in schema}, schema=schema)


def test_merge_gives_older_tables_the_token_columns(tmp_path):
    import lance

    products_uri, staging_uri = str(tmp_path / "products.lance"), str(tmp_path / "staging.lance")
    lance.write_dataset(_rows(["a", "b"], _old_schema()), products_uri)
    lance.write_dataset(_rows(["z"], _old_schema()), staging_uri)  # an interrupted older run's
    tokens = np.arange(4, dtype="<f2").tobytes()
    batch = _rows(["b"], tables.products_schema(4), tokens).drop_columns(["run_id"])
    for name, value in {STATUS: "indexed", REASON: None, DETAIL: None, SOURCE_FILE: "f",
                        ROW_NUMBER: 0, PEAK_RSS: 1.0}.items():  # fmt: skip
        batch = batch.append_column(name, pa.array([value]))
    # The run's committer, made before its staging tasks write to the older dataset, adds them.
    committer = staging.StagingCommitter(staging_uri, tables.products_schema(4), exists=True)
    out = staging.write_staged_rows(
        batch, uri=staging_uri, schema=tables.products_schema(4), run_id="new"
    )
    committer.add(out.column(staging.FRAGMENTS).drop_null().to_pylist())
    committer.commit()

    version, written, _ = staging.merge_staged(products_uri, staging_uri, {"b": "h-b"})
    rows = {r["product_id"]: r for r in lance.dataset(products_uri).to_table().to_pylist()}
    assert written == 1 and version is not None
    assert rows["a"][tables.ITM_TOKENS] is None and rows["a"][tables.ITM_TOKENS_SHAPE] is None
    assert rows["b"][tables.ITM_TOKENS] == tokens and rows["b"][tables.ITM_TOKENS_SHAPE] == [2, 2]
    assert rows["b"]["run_id"] == "new"


# ---- the index job: tokens follow the content hash ----------------------------------------------
def _catalog(folder: Path, rows: list[dict], schema: pa.Schema) -> str:
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-00000.parquet")
    return str(folder)


def _published_rows(uri: str) -> dict[str, dict]:
    table = tables.open_published(tables.connect(uri))[0]
    return {r["product_id"]: r for r in table.to_arrow().to_pylist()}


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_tokens_follow_the_content_hash(tiny_model_dir, tiny_model, ray_local, tmp_path, caplog):
    from pipelines.catalog.writer import make_catalog
    from pipelines.indexing.job import run_index

    make_catalog(str(tmp_path / "cat"), 6, seed=5, workers=1)
    source = pq.read_table(tmp_path / "cat" / "products")
    rows = source.to_pylist()
    uri = str(tmp_path / "db")

    # 1. never: no tokens.
    first = run_index(index_config(tmp_path / "cat" / "products", uri, tiny_model_dir,
                                   "index.store_itm_tokens=never"))  # fmt: skip
    assert first["indexed"] == 6
    assert all(r["itm_tokens"] is None for r in _published_rows(uri).values())

    # 2. auto, one image changed: only that row is encoded, and it gets tokens; the setting change
    # alone re-encodes nothing (logged).
    changed = rows[0]["product_id"]
    rows[0]["image"] = encode_image_bytes(draw_product(900, (130, 100)))
    caplog.set_level(logging.INFO, logger="pipelines.indexing.stages")
    second = run_index(index_config(_catalog(tmp_path / "v2", rows, source.schema), uri,
                                     tiny_model_dir))  # fmt: skip
    assert (second["indexed"], second["unchanged"]) == (1, 5)
    assert "6 published rows have no stored ITM tokens" in caplog.text
    now = _published_rows(uri)
    assert [p for p, r in now.items() if r["itm_tokens"] is not None] == [changed]
    np.testing.assert_allclose(
        _tokens(now[changed]), _recomputed(tiny_model, [rows[0]["image"]])[0], **F16
    )

    # 3. its image changes again: new tokens, in the run that made its new embedding.
    rows[0]["image"] = encode_image_bytes(draw_product(901, (100, 130)))
    third = run_index(index_config(_catalog(tmp_path / "v3", rows, source.schema), uri,
                                   tiny_model_dir))  # fmt: skip
    assert third["indexed"] == 1
    after = _published_rows(uri)[changed]
    assert (
        after["run_id"] == third["run_id"] and after["content_hash"] != now[changed]["content_hash"]
    )
    assert after["itm_tokens"] != now[changed]["itm_tokens"]
    np.testing.assert_allclose(
        _tokens(after), _recomputed(tiny_model, [rows[0]["image"]])[0], **F16
    )


# ---- the re-rank ---------------------------------------------------------------------------------
def test_mixed_jobs_score_like_stored_tokens(tiny_model, blobs):
    """Candidates with stored tokens and without in one batch of jobs (a product stored in one job,
    sent as an image in the other): the logits of all-stored tokens, and vision passes only for
    the candidates nobody stored."""
    from pipelines.indexing.derivatives import model_resolution_jpeg

    size = tiny_model.image_settings.size
    jpegs = [model_resolution_jpeg(decode_image(b, target_size=size), size) for b in blobs]
    keys = tuple(f"p{i}:h{i}" for i in range(len(blobs)))
    reference = QueryScorer(tiny_model, decode_threads=1)
    tokens = reference.image_tokens(keys, jpegs)  # the recompute path, from the JPEGs
    stored = tuple(StoredTokens(d, tuple(tokens.shape[1:])) for d in pack_tokens(tokens))
    mid = tiny_model.model_id
    want = reference.itm(
        [
            ItmJob("red shoe", keys, (None,) * 4, stored, mid),
            ItmJob("blue lamp", keys[1:], (None,) * 3, stored[1:], mid),
        ]
    )

    scorer = QueryScorer(tiny_model, decode_threads=1)
    got = scorer.itm(
        [
            ItmJob("red shoe", keys, (None, None, *jpegs[2:]), (*stored[:2], None, None), mid),
            ItmJob("blue lamp", keys[1:], tuple(jpegs[1:])),
        ]
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-3)
    assert (scorer.stored_used, scorer.cache.misses) == (2, 2)  # p0 and p1 stored; p2, p3 encoded
    with pytest.raises(ValueError, match="of model other sent to the scorer of model"):
        scorer.itm([ItmJob("x", keys[:1], (None,), stored[:1], "other")])
    with pytest.raises(ValueError, match="neither stored tokens nor a model image"):
        scorer.itm([ItmJob("x", keys[:2], (None, None), (stored[0], None), mid)])


def _search(snap, scorer, text: str, serve) -> dict:
    from pipelines.search.engine import LocalScorer, search
    from pipelines.search.request import Limits, parse_search

    query = parse_search({"text": text}, Limits.from_config(serve))
    return asyncio.run(search(query, snap, LocalScorer(scorer)))


def test_a_query_from_stored_tokens_ranks_like_the_recompute_path(search_index, tiny_model):
    """The session index stores the tiny model's tokens (auto). The same queries through the
    recompute path, fed the very pixels the index job encoded (lossless PNGs in place of the
    stored JPEGs, whose loss would otherwise move the tiny random model's logits by up to 0.1):
    the same ranking, scores within float16 rounding, and no vision pass on the stored path."""
    import io

    from blip_ops import load_model
    from pipelines.search.snapshot import open_snapshot

    cfg, root = search_index
    run = tables.published_run(tables.connect(cfg.index.uri))
    model = tiny_model
    if model.model_id != run["model_id"]:  # another module republished with another checkpoint
        model = load_model(run["model_path"], device="cpu", dtype="float32")
    snap = open_snapshot(cfg.index.uri, pointer=run)
    assert snap.stored_tokens == snap.rows

    catalog = pq.read_table(root / "catalog" / "products", columns=["product_id", "title", "image"])
    size = model.image_settings.size
    lossless = {}
    for pid, data in zip(
        catalog["product_id"].to_pylist(), catalog["image"].to_pylist(), strict=True
    ):
        (pixels,) = model.resize([decode_image(data, target_size=size)])
        buf = io.BytesIO()
        pixels.save(buf, "PNG")
        lossless[pid] = buf.getvalue()

    stored_scorer, recompute_scorer = QueryScorer(model), QueryScorer(model)
    for text in catalog["title"].to_pylist()[:6]:
        stored = _search(snap, stored_scorer, text, cfg.serve)
        snap.stored_tokens = 0  # as a table without tokens: JPEG (here PNG) per candidate
        snap.model_images = lambda ids: [
            lossless[r["product_id"]] for r in snap._take(ids, ["product_id"])
        ]
        try:
            recomputed = _search(snap, recompute_scorer, text, cfg.serve)
        finally:
            del snap.model_images
            snap.stored_tokens = snap.rows
        assert stored["reranked"] == recomputed["reranked"] > 0
        pairs = list(zip(stored["results"], recomputed["results"], strict=True))
        assert [a["product_id"] for a, _ in pairs] == [b["product_id"] for _, b in pairs], text
        for a, b in pairs:
            assert a["score"] == pytest.approx(b["score"], abs=3e-3)
    assert stored_scorer.stored_used > 0 and len(stored_scorer.cache) == 0  # no vision pass
    assert recompute_scorer.cache.misses > 0


# ---- exports -------------------------------------------------------------------------------------
def test_exports_leave_tokens_out_unless_asked(search_index, tmp_path):
    from tests.test_export import cli, duck

    cfg, _ = search_index
    token_cols = {tables.ITM_TOKENS, tables.ITM_TOKENS_SHAPE}
    assert cli(cfg, "--what", "products", "--out", str(tmp_path / "plain")) == 0
    assert not token_cols & set(duck(tmp_path / "plain").column_names)

    assert cli(cfg, "--what", "products", "--out", str(tmp_path / "tok"), "--with-itm-tokens") == 0
    got = duck(tmp_path / "tok")
    assert token_cols <= set(got.column_names)
    table = tables.open_published(tables.connect(cfg.index.uri))[0].to_arrow()
    want = dict(
        zip(table["product_id"].to_pylist(), table[tables.ITM_TOKENS].to_pylist(), strict=True)
    )
    have = dict(zip(got["product_id"].to_pylist(), got[tables.ITM_TOKENS].to_pylist(), strict=True))
    assert have == want and all(v is not None for v in have.values())

    out = tmp_path / "named"
    assert (
        cli(cfg, "--what", "products", "--out", str(out), "--columns", "product_id,itm_tokens") == 0
    )
    assert duck(out).column_names == ["product_id", "itm_tokens"]
    assert cli(cfg, "--what", "runs", "--out", str(tmp_path / "r"), "--with-itm-tokens") == 2


def test_snapshot_warm_up_runs_one_query_s_reads(search_index):
    """The ingress warms a version before serving it: one ANN search of ``candidates`` rows and
    the re-rank inputs (here stored tokens) of the first ``rerank_k``."""
    from pipelines.search.snapshot import open_snapshot

    cfg, _ = search_index
    snap = open_snapshot(cfg.index.uri, pointer=tables.published_run(tables.connect(cfg.index.uri)))
    seen: dict[str, list] = {"candidates": [], "rerank_inputs": []}
    candidates, rerank_inputs = snap.candidates, snap.rerank_inputs

    def record_candidates(vector, n, where=None):
        seen["candidates"].append((np.linalg.norm(vector), n, where))
        return candidates(vector, n, where)

    def record_rerank_inputs(row_ids):
        out = rerank_inputs(row_ids)
        seen["rerank_inputs"].append((list(row_ids), out))
        return out

    snap.candidates, snap.rerank_inputs = record_candidates, record_rerank_inputs
    assert snap.warm_up(50, 16) > 0
    ((norm, n, where),) = seen["candidates"]
    assert norm == pytest.approx(1.0, abs=1e-5) and n == 50 and where is None
    ((row_ids, (images, tokens)),) = seen["rerank_inputs"]
    assert len(row_ids) == 16 and len(set(row_ids)) == 16
    assert all(t is not None for t in tokens) and images == [None] * 16  # tokens, no JPEG
