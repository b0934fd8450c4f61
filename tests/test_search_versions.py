"""The pinned-version state machine of a search replica (``PinnedVersions``), without Ray or Serve:
fake published pointers, fake snapshots and a fake model loader stand in for LanceDB and the model
deployment."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.search.models import ModelMismatchError, ModelRef
from pipelines.search.snapshot import NoPublishedIndex
from pipelines.search.versions import RETIRED_KEPT, PinnedVersions

MODEL_A, MODEL_B = "hf_blip-aaaa", "hf_blip-bbbb"
SETTINGS_A, SETTINGS_B = {"settings": "A"}, {"settings": "B"}


class FakeSnapshot:
    def __init__(self, pointer: dict):
        self.products_table = pointer["products_table"]
        self.version = int(pointer["products_version"])
        self.model_id = pointer["model_id"]
        self.rows = 10 * self.version
        self.model_ref = self.text_settings = None
        self.closed = False

    @property
    def key(self):
        return (self.products_table, self.version)

    def close(self):
        self.closed = True


class FakeMetrics:
    def __init__(self):
        self.versions: list[tuple[int, int]] = []

    def set_version(self, version: int, rows: int) -> None:
        self.versions.append((version, rows))


class World:
    """What the replica sees: the published pointer, which opens fail, which models load."""

    def __init__(self, *, follow_model: bool = False):
        self.pointer: dict | None = None
        self.fail_open: Exception | None = None
        self.fail_lookup: Exception | None = None
        self.fail_load: Exception | None = None
        self.opened: list[FakeSnapshot] = []
        self.loaded: list[tuple] = []
        self.metrics = FakeMetrics()
        self.versions = PinnedVersions(
            published=self.published,
            open_version=self.open_version,
            load_model=self.load_model,
            follow_model=follow_model,
            index_uri="s3://bucket/index",
            model_path="/models/a",
            metrics=self.metrics,
        )

    def publish(self, version: int, model_id: str = MODEL_A, table: str = "products", **extra):
        self.pointer = {
            "products_table": table,
            "products_version": version,
            "model_id": model_id,
            "run_id": f"run-{version}",
            **extra,
        }

    def published(self):
        if self.fail_lookup is not None:
            raise self.fail_lookup
        return None if self.pointer is None else dict(self.pointer)

    def open_version(self, pointer: dict):
        if self.fail_open is not None:
            raise self.fail_open
        snap = FakeSnapshot(pointer)
        self.opened.append(snap)
        return snap

    def load_model(self, ref):
        self.loaded.append(tuple(ref))
        if self.fail_load is not None:
            raise self.fail_load
        return SETTINGS_B

    def start(self):
        self.versions.start(MODEL_A, SETTINGS_A)


def test_start_serves_the_published_version(caplog):
    w = World()
    w.publish(3)
    with caplog.at_level(logging.INFO, logger="pipelines.search.versions"):
        w.start()
    snap = w.versions.snapshot
    assert snap.key == ("products", 3) and snap.model_ref is None and snap.text_settings is SETTINGS_A
    assert w.metrics.versions == [(3, 30)] and w.versions.refused is None
    assert "now serving products version 3 (model hf_blip-aaaa)" in caplog.text
    assert w.versions.refresh() is False and len(w.opened) == 1  # same version: nothing opened


def test_start_with_nothing_published_fails():
    w = World()
    with pytest.raises(NoPublishedIndex, match="no published index at s3://bucket/index"):
        w.start()
    assert w.versions.snapshot is None


def test_refresh_moves_to_a_newly_published_version_and_closes_old_ones_later():
    w = World()
    w.publish(1)
    w.start()
    first = w.versions.snapshot
    w.publish(2)
    assert w.versions.refresh() is True
    assert w.versions.snapshot.version == 2 and w.versions.retired == [first]
    assert not first.closed  # requests that took it at their start may still be running
    for version in range(3, 3 + RETIRED_KEPT):
        w.publish(version)
        assert w.versions.refresh() is True
    assert first.closed and len(w.versions.retired) == RETIRED_KEPT
    assert not any(s.closed for s in w.versions.retired) and not w.versions.snapshot.closed
    assert [v for v, _ in w.metrics.versions] == list(range(1, 3 + RETIRED_KEPT))
    w.publish(2)  # the tag moved back to an older version (a rollback): it is served again
    assert w.versions.refresh() is True and w.versions.snapshot.version == 2


def test_a_failed_open_or_lookup_keeps_the_pinned_version():
    w = World()
    w.publish(1)
    w.start()
    pinned = w.versions.snapshot
    w.publish(2)
    w.fail_open = OSError("lance: table is being written")
    with pytest.raises(OSError, match="being written"):
        w.versions.refresh()
    assert w.versions.snapshot is pinned and w.versions.retired == [] and not pinned.closed
    w.fail_open, w.fail_lookup = None, ConnectionError("s3 unreachable")
    with pytest.raises(ConnectionError):
        w.versions.refresh()
    assert w.versions.snapshot is pinned
    w.fail_lookup = None
    assert w.versions.refresh() is True and w.versions.snapshot.version == 2  # the next try


def test_another_model_is_refused_without_follow_model(caplog):
    w = World(follow_model=False)
    w.publish(1)
    w.start()
    pinned = w.versions.snapshot
    w.publish(2, model_id=MODEL_B)
    with caplog.at_level(logging.ERROR, logger="pipelines.search.versions"):
        assert w.versions.refresh() is False
        assert w.versions.refresh() is False  # the same refusal is logged once
    refusals = [r for r in caplog.records if r.getMessage().startswith("REFUSED")]
    assert len(refusals) == 1
    message = refusals[0].getMessage()
    assert "table products version 2 was encoded by model hf_blip-bbbb" in message
    assert "this service loaded hf_blip-aaaa (/models/a) and serve.follow_model is off" in message
    assert w.versions.snapshot is pinned and w.loaded == [] and len(w.opened) == 1
    assert w.versions.describe_refusal() == {
        "products_table": "products",
        "table_version": 2,
        "model_id": MODEL_B,
        "why": "",
    }
    w.publish(1)  # the tag moved back to the pinned version: the refusal clears
    assert w.versions.refresh() is False and w.versions.describe_refusal() is None


def test_a_refused_version_at_start_fails_the_replica_with_the_reason():
    w = World(follow_model=False)
    w.publish(5, model_id=MODEL_B)
    with pytest.raises(ModelMismatchError, match="REFUSED: published table products version 5"):
        w.start()
    assert w.versions.snapshot is None


def test_follow_model_loads_the_published_model_before_the_switch():
    w = World(follow_model=True)
    w.publish(1)
    w.start()
    w.publish(2, model_id=MODEL_B, model_path="/models/b")
    assert w.versions.refresh() is True
    snap = w.versions.snapshot
    assert w.loaded == [(MODEL_B, "/models/b")]
    assert snap.model_ref == ModelRef(MODEL_B, "/models/b") and snap.text_settings is SETTINGS_B
    w.publish(3)  # back to the configured model: no load, its own settings
    assert w.versions.refresh() is True
    assert w.versions.snapshot.model_ref is None and w.versions.snapshot.text_settings is SETTINGS_A
    assert len(w.loaded) == 1


class WrappedError(Exception):
    """Like a RayTaskError: the replica's own exception as ``cause``."""

    def __init__(self, cause: Exception):
        super().__init__(f"task failed: {cause}")
        self.cause = cause


@pytest.mark.parametrize(
    "error,why",
    [
        (ModelMismatchError("the checkpoint changed since that run"), "the checkpoint changed"),
        (WrappedError(ModelMismatchError("not loadable here")), "not loadable here"),
        (FileNotFoundError("no such checkpoint"), "its model could not be loaded (FileNotFoundError"),
        (WrappedError(TimeoutError("slow")), "its model could not be loaded (TimeoutError: slow)"),
    ],
)
def test_a_model_that_cannot_be_loaded_is_refused(error, why):
    w = World(follow_model=True)
    w.publish(1)
    w.start()
    pinned = w.versions.snapshot
    w.publish(2, model_id=MODEL_B, model_path="/models/b")
    w.fail_load = error
    assert w.versions.refresh() is False
    assert w.versions.snapshot is pinned and len(w.opened) == 1
    assert w.versions.describe_refusal()["why"].startswith(why)
    w.fail_load = None  # loadable on a later check (e.g. the checkpoint restored)
    assert w.versions.refresh() is True and w.versions.refused is None


def test_watch_refreshes_every_period_survives_failures_and_stops_at_shutdown(caplog):
    w = World()
    w.publish(1)
    w.start()
    sleeps: list[float] = []
    steps = iter(
        [
            lambda: w.publish(2),  # picked up at the next check
            lambda: setattr(w, "fail_lookup", ConnectionError("s3 unreachable")),  # logged
            lambda: (setattr(w, "fail_lookup", None), w.publish(3)),
            lambda: setattr(w, "fail_lookup", RuntimeError("cannot schedule after shutdown")),
        ]
    )

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        next(steps)()

    with caplog.at_level(logging.ERROR, logger="pipelines.search.versions"):
        asyncio.run(asyncio.wait_for(w.versions.watch(7.5, sleep=fake_sleep), timeout=30))
    assert sleeps == [7.5] * 4
    assert [v for v, _ in w.metrics.versions] == [1, 2, 3] and w.versions.snapshot.version == 3
    failures = [r for r in caplog.records if "looking for a newly published version" in r.message]
    assert len(failures) == 1 and "s3 unreachable" in caplog.text


def test_versions_module_needs_no_ray():
    code = "import sys, pipelines.search.versions; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
