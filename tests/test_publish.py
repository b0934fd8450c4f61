"""Model rollout and rollback: index with model A, roll out model B (an index run with a new
model_id), roll back to A with ``pipelines.publish``, all while a real Ray Serve service answers
queries over HTTP. Then the publish command on its own: forward and back, its refusals, and a
rollback to an older run of the same model followed by a nightly run.

The module builds one small index (48 products) in its own folder; the session's Serve instance
(``search_url``) hosts this module's application at ``/rollout``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.indexing import tables
from tests.conftest import SEARCH_LIGHT, index_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

N = 48
QUERIES = ["sofa", "table lamp", "red chair", "沙发", "shafa", "wooden desk"]


@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
    from blip_ops.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("rollout-model-b") / "b", seed=7)


@pytest.fixture(scope="module")
def rollout(tmp_path_factory, tiny_model_dir, model_b, ray_local):
    """A catalog indexed with model A (run "a1"); configs for A and B on the same index."""
    from pipelines.catalog.writer import make_catalog
    from pipelines.indexing.job import run_index

    root = tmp_path_factory.mktemp("rollout")
    make_catalog(str(root / "catalog"), N, seed=11, workers=1)
    source, uri = root / "catalog" / "products", root / "db"
    cfg_a = index_config(source, uri, tiny_model_dir, *SEARCH_LIGHT)
    cfg_b = index_config(source, uri, model_b, *SEARCH_LIGHT)
    assert run_index(cfg_a, run_id="a1")["indexed"] == N
    return cfg_a, cfg_b, root


def _pub(cfg) -> dict:
    return tables.published_run(tables.connect(cfg.index.uri))


def _publish_cli(cfg, to: str, *extra: str) -> int:
    from pipelines.publish import main

    return main(
        ["--index-uri", cfg.index.uri, f"model.name_or_path={cfg.model.name_or_path}", "--to", to]
        + list(extra)
    )


def _results(client: httpx.Client) -> dict[str, list[tuple[str, float, float | None]]]:
    out = {}
    for q in QUERIES:
        r = client.post("/search", json={"text": q, "k": 10, "candidates": N, "rerank_k": 8})
        assert r.status_code == 200, r.text
        out[q] = [(x["product_id"], x["score"], x["itm_score"]) for x in r.json()["results"]]
    return out


def _same(got: dict, want: dict, tol: float = 1e-5) -> None:
    for q in QUERIES:
        assert [g[0] for g in got[q]] == [w[0] for w in want[q]], q
        for (_, gs, gi), (_, ws, wi) in zip(got[q], want[q], strict=True):
            assert abs(gs - ws) < tol and (gi is None) == (wi is None), q
            assert gi is None or abs(gi - wi) < tol, q


def _wait_for_model(client: httpx.Client, model_id: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = client.get("/healthz").json()
        if health["model_id"] == model_id:
            return health
        time.sleep(0.2)
    raise AssertionError(f"the service never switched to {model_id}: {health}")


# ----------------------------------------------------------------------------- the service
def test_serve_follows_rollout_and_rollback(rollout, search_url, model_b, capsys):
    """A -> (index run with B) -> publish back to A, under client load: every request succeeds,
    each answer comes wholly from one version, and after the rollback the answers equal the ones
    before the rollout."""
    from ray import serve

    from blip_ops import load_model
    from pipelines.indexing.job import run_index
    from pipelines.serve_search import build_app

    cfg_a, cfg_b, _ = rollout
    id_a = _pub(cfg_a)["model_id"]
    id_b = load_model(model_b, device="cpu").model_id
    assert id_a != id_b
    serve.run(build_app(cfg_a), name="rollout", route_prefix="/rollout")
    url = f"{search_url}/rollout"
    stop = threading.Event()
    seen: list[tuple[int, str | None, int | None]] = []
    errors: list[str] = []

    def load():
        with httpx.Client(base_url=url, timeout=60) as c:
            i = 0
            while not stop.is_set():
                i += 1
                body = {"text": QUERIES[i % len(QUERIES)], "candidates": N, "rerank_k": 8}
                try:
                    r = c.post("/search", json=body)
                except httpx.HTTPError as err:  # a dropped connection counts as a failure
                    errors.append(repr(err))
                    continue
                data = r.json() if r.status_code == 200 else {}
                seen.append((r.status_code, data.get("model_id"), data.get("table_version")))

    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/healthz").json()["model_id"] == id_a
            before = _results(client)
            threads = [threading.Thread(target=load) for _ in range(2)]
            for t in threads:
                t.start()
            try:
                # Roll out B: a nightly run whose config names the new checkpoint.
                s = run_index(cfg_b, run_id="b1")
                assert s["model_id"] == id_b and s["indexed"] == N
                health = _wait_for_model(client, id_b)
                assert health["products_table"] == s["products_table"]
                assert health["status"] == "ok"
                during = _results(client)
                assert during != before  # another model ranks and scores differently
                # Roll back to A: one command, no index run.
                assert _publish_cli(cfg_a, "run-a1") == 0
                assert "-> run a1" in capsys.readouterr().out
                _wait_for_model(client, id_a)
                time.sleep(1.0)  # keep the load on after the switch back
            finally:
                stop.set()
                for t in threads:
                    t.join()
            after = _results(client)
    finally:
        serve.delete("rollout")
    _same(after, before)
    assert not errors, errors[:3]
    codes = Counter(code for code, _, _ in seen)
    assert set(codes) == {200}, codes
    models = Counter(m for _, m, _ in seen)
    assert models[id_a] and models[id_b], models  # the load ran across both switches


# ----------------------------------------------------------------------------- the command
@pytest.fixture
def with_b(rollout):
    """Runs a1 (model A) and b1 (model B) exist, whatever ran before."""
    from pipelines.indexing.job import run_index

    cfg_a, cfg_b, root = rollout
    if tables.find_run(tables.connect(cfg_a.index.uri), "b1") is None:
        run_index(cfg_b, run_id="b1")
    return rollout


def test_publish_moves_every_table_forward_and_back(with_b, capsys):
    cfg_a, cfg_b, _ = with_b
    db = tables.connect(cfg_a.index.uri)
    a1, b1 = tables.find_run(db, "a1"), tables.find_run(db, "b1")
    for to, run in (("run-b1", b1), ("a1", a1), ("run-b1", b1)):
        assert _publish_cli(cfg_a, to) == 0
        out = capsys.readouterr().out
        assert f"-> run {run['run_id']} (model {run['model_id']}" in out
        pub = _pub(cfg_a)
        assert pub["run_id"] == run["run_id"] and pub["model_id"] == run["model_id"]
        assert pub["model_path"] == run["model_path"]
        products = tables.open_published(tables.connect(cfg_a.index.uri))[0]
        assert (products.name, products.version) == (run["products_table"], run["products_version"])
        rejects = tables.open_tagged(tables.connect(cfg_a.index.uri), tables.REJECTS_TABLE)
        assert rejects.version == run["rejects_version"]
    # Publishing B while the config names A: the summary says the next run would undo it.
    assert "the next index run publishes that model again" in out
    assert _publish_cli(cfg_b, "run-b1") == 0  # the config names B's checkpoint: no note
    assert "note:" not in capsys.readouterr().out


def test_publish_refusals(with_b, capsys):
    from pipelines.publish import main

    cfg_a, _, _ = with_b
    before = _pub(cfg_a)
    assert _publish_cli(cfg_a, "run-nope") == 2
    err = capsys.readouterr().err
    assert "no run 'nope'" in err and "b1" in err and "a1" in err
    assert _publish_cli(cfg_a, "run-a1", "--tag", "run-b1") == 2
    assert "run-* tags belong to their runs" in capsys.readouterr().err
    # A run that wrote its runs row but died before its tags never completed.
    db = tables.connect(cfg_a.index.uri)
    dead = {**tables.find_run(db, "b1"), "run_id": "dead"}
    tables.append(
        db, tables.RUNS_TABLE, tables.RUNS_SCHEMA, pa.Table.from_pylist([dead], tables.RUNS_SCHEMA)
    )
    assert _publish_cli(cfg_a, "run-dead") == 2
    assert "never completed" in capsys.readouterr().err
    assert _pub(cfg_a) == before  # nothing moved
    # A live writer (an index run or a maintenance) holds the index: refused, retryable (exit 3).
    from datetime import timedelta

    from pipelines.indexing.lease import WriterLease

    with WriterLease(cfg_a.index.uri, kind="index", run_id="busy", stale_after=timedelta(hours=1)):
        assert _publish_cli(cfg_a, "run-b1" if before["run_id"] == "a1" else "run-a1") == 3
        assert "busy" in capsys.readouterr().err
    assert _pub(cfg_a) == before
    assert main(["--index-uri", cfg_a.index.uri, "--list"]) == 0
    listed = capsys.readouterr().out
    assert f"* run-{before['run_id']}" in listed and "run-dead" in listed


def test_rollback_within_one_model_then_a_nightly_run(with_b):
    """Roll back to an older run of the same model, then run the nightly job: it builds on the
    published rows, not on the rows of the run that was rolled back."""
    from pipelines.indexing.job import run_index

    cfg_a, _, root = with_b
    assert _publish_cli(cfg_a, "run-a1") == 0
    db = tables.connect(cfg_a.index.uri)
    products_a = tables.find_run(db, "a1")["products_table"]
    part = sorted((root / "catalog" / "products").glob("*.parquet"))[0]
    original = pq.read_table(part)
    titles = original.column("title").to_pylist()
    try:
        bad = [f"{t} BAD" if i % 4 == 0 else t for i, t in enumerate(titles)]
        pq.write_table(
            original.set_column(original.schema.get_field_index("title"), "title", [bad]), part
        )
        s = run_index(cfg_a, run_id="a2-bad")
        assert s["indexed"] == len(titles[::4])
        assert _publish_cli(cfg_a, "run-a1") == 0
        published = tables.open_published(tables.connect(cfg_a.index.uri))[0]
        assert not any(t.endswith(" BAD") for t in published.to_arrow().column("title").to_pylist())
    finally:
        pq.write_table(original, part)
    # The restored catalog equals run a1's: nothing to encode, and the published titles are a1's.
    s = run_index(cfg_a, run_id="a3")
    assert s["indexed"] == 0 and s["unchanged"] == N and s["products_table"] == products_a
    published = tables.open_published(tables.connect(cfg_a.index.uri))[0]
    got = dict(
        zip(*published.to_arrow().select(["product_id", "title"]).to_pydict().values(), strict=True)
    )
    want = dict(zip(original.column("product_id").to_pylist(), titles, strict=True))
    assert {p: got[p] for p in want} == want
