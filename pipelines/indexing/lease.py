"""The writer lease: one small JSON object that says who is writing to an index right now.

    <index.uri>/_locks/writer.json   {"kind": "index"|"maintain"|"publish", "run_id", "host", "pid",
                                      "started_at", "renewed_at", "token"}

The index job holds it from its start to its end, renewing it from a daemon thread; maintenance
holds it while it deletes tags, compacts and cleans up. So a cleanup never runs beside a live writer
(whose uncommitted files it could otherwise take for garbage), and two index runs never interleave
their merges and tag moves. A lease nobody renewed for ``maintain.writer_stale_minutes`` belongs to
a dead job and is taken over, with a warning.

Writes are atomic: a temporary file renamed into place on a local disk (a hard link when the lease
is new, so of two starters only one creates it), a single PUT on S3. Each acquirer re-reads the
lease after writing and goes on only if its own token is there; that narrows, but does not close,
the window in which two starters on S3 (or two takers of one stale lease) could both go on: S3 has
no create-if-absent through pyarrow. The nightly job is started by a scheduler, not by many hands
at once; a conditional PUT would close the window if that ever changes.

A lease left by a process that no longer exists on this same host (a job killed with SIGKILL and
rerun here) is taken over at once, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

import pyarrow.fs as pafs

from pipelines.storage import S3Settings, filesystem_for, is_s3, join

logger = logging.getLogger(__name__)

LOCKS_DIR = "_locks"
LEASE_FILE = "writer.json"
Kind = Literal["index", "maintain", "publish"]
KINDS = ("index", "maintain", "publish")


class LeaseHeldError(RuntimeError):
    """Another live writer holds the lease; the message names it. Retryable: the same command
    succeeds once that writer is done (the CLIs exit 3 for it)."""

    def __init__(self, message: str, holder: LeaseRecord):
        super().__init__(f"{message} (retryable: run it again once that writer is done)")
        self.holder = holder


class LeaseLostError(RuntimeError):
    """Our lease was taken over (we were not renewing it) or removed: stop writing."""


@dataclass(frozen=True)
class LeaseRecord:
    """The JSON document of the lease."""

    kind: str  # index | maintain | publish
    run_id: str  # the index run, or the maintenance's own id
    host: str
    pid: int
    started_at: str  # ISO 8601, UTC
    renewed_at: str  # ISO 8601, UTC; the holder rewrites it from a daemon thread
    token: str  # random per acquisition: tells "still mine" from "someone else's"

    def age(self, now: datetime | None = None) -> timedelta:
        """Time since the last renewal."""
        return (now or _now()) - datetime.fromisoformat(self.renewed_at)

    def describe(self) -> str:
        return (
            f"{self.kind} run {self.run_id} on {self.host} (pid {self.pid}), started "
            f"{self.started_at}, last renewed {self.renewed_at}"
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> LeaseRecord:
        try:
            doc = json.loads(text)
            return cls(**{name: doc[name] for name in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"unreadable writer lease {where}: {err}; got {text[:200]!r}") from err


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _process_gone(record: LeaseRecord) -> bool:
    """True when the holder ran on this host and its process no longer exists (a job killed with
    SIGKILL, rerun on the same machine, need not wait ``writer_stale_minutes``). A holder on
    another host, or a pid that exists (perhaps reused), counts as alive: only staleness frees it."""
    if record.host != socket.gethostname() or record.pid == os.getpid():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, not ours to signal
        return False
    return False


def lease_path(index_uri: str) -> str:
    """Where the lease of the index at ``index_uri`` lives (local path or s3:// URI)."""
    return join(str(index_uri).rstrip("/"), LOCKS_DIR, LEASE_FILE)


def renew_interval(stale_after: timedelta) -> float:
    """Seconds between renewals: a third of the stale limit (two missed renewals are fine), at
    most a minute."""
    return max(0.05, min(60.0, stale_after.total_seconds() / 3))


class WriterLease:
    """Acquire / renew / release the writer lease of one index; a context manager that also
    renews it from a daemon thread while the ``with`` block runs.

        with WriterLease(cfg.index.uri, s3, kind="index", run_id=run_id,
                         stale_after=timedelta(minutes=cfg.maintain.writer_stale_minutes)) as lease:
            ...               # lease.check() before a step that must not run after a takeover
    """

    def __init__(
        self,
        index_uri: str,
        s3: S3Settings | None = None,
        *,
        kind: Kind,
        run_id: str,
        stale_after: timedelta,
    ):
        if kind not in KINDS:
            raise ValueError(f"lease kind must be one of {KINDS}, got {kind!r}")
        if stale_after <= timedelta(0):
            raise ValueError(f"stale_after must be positive, got {stale_after}")
        self.uri = lease_path(index_uri)
        self._fs, self._path = filesystem_for(self.uri, s3)
        self._local = not is_s3(index_uri)
        self.kind = kind
        self.run_id = run_id
        self.stale_after = stale_after
        self.record: LeaseRecord | None = None  # ours, while held
        self.took_over: LeaseRecord | None = None  # the stale lease we replaced, if any
        self.lost: Exception | None = None  # set by the renew thread when the lease was lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()  # the renew thread and the owner never write at once

    # ---- the stored document
    def read(self) -> LeaseRecord | None:
        """The lease as stored now, or None when nobody holds it."""
        try:
            with self._fs.open_input_stream(self._path) as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            return None
        except OSError as err:  # pyarrow's S3 raises OSError for a missing key
            if self._fs.get_file_info(self._path).type == pafs.FileType.NotFound:
                return None
            raise err
        return LeaseRecord.from_json(text, self.uri)

    def _write(self, record: LeaseRecord, *, create: bool) -> None:
        data = json.dumps(asdict(record), indent=1).encode("utf-8")
        parent = self._path.rsplit("/", 1)[0]
        self._fs.create_dir(parent, recursive=True)
        if not self._local:  # one PUT: readers see the old object or the new one
            with self._fs.open_output_stream(self._path) as f:
                f.write(data)
            return
        tmp = f"{self._path}.{record.token}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            if create:  # fails if another starter created it since we looked
                os.link(tmp, self._path)
            else:
                os.replace(tmp, self._path)
                return
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # ---- acquire / renew / release
    def acquire(self) -> LeaseRecord:
        """Take the lease: refuse (LeaseHeldError) while another live writer holds it; take over
        one that was not renewed for ``stale_after``, or whose process on this host is gone."""
        if self.record is not None:
            raise RuntimeError(f"lease {self.uri} is already held by this object")
        now = _now()
        current = self.read()
        if current is not None:
            age = current.age(now)
            if _process_gone(current):
                logger.warning(
                    "taking over the writer lease of a dead process (%s; no pid %d on this host)",
                    current.describe(),
                    current.pid,
                )
                self.took_over = current
            elif age < self.stale_after:
                raise LeaseHeldError(
                    f"index is being written by {current.describe()} ({age.total_seconds():.0f}s "
                    f"ago); refusing to start {self.kind} run {self.run_id}. The lease "
                    f"({self.uri}) is taken over once it has not been renewed for "
                    f"{self.stale_after}",
                    current,
                )
            else:
                logger.warning(
                    "taking over a stale writer lease (%s; not renewed for %s, limit %s)",
                    current.describe(),
                    age,
                    self.stale_after,
                )
                self.took_over = current
        stamp = now.isoformat()
        mine = LeaseRecord(
            kind=self.kind,
            run_id=self.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=stamp,
            renewed_at=stamp,
            token=uuid.uuid4().hex,
        )
        try:
            self._write(mine, create=current is None)
        except FileExistsError:
            holder = self.read()
            raise LeaseHeldError(
                f"index writer lease {self.uri} was taken by "
                f"{holder.describe() if holder else 'another writer'} while {self.kind} run "
                f"{self.run_id} was starting; refusing to start",
                holder or mine,
            ) from None
        stored = self.read()
        if stored is None or stored.token != mine.token:  # S3: someone wrote after us
            raise LeaseHeldError(
                f"index writer lease {self.uri} was taken by "
                f"{stored.describe() if stored else 'another writer'} while {self.kind} run "
                f"{self.run_id} was starting; refusing to start",
                stored or mine,
            )
        self.record = mine
        logger.info("writer lease acquired: %s", mine.describe())
        return mine

    def check(self) -> None:
        """Raise LeaseLostError unless the stored lease is still ours (call before a step that
        must not run once another writer has taken over, e.g. moving tags)."""
        if self.lost is not None:
            raise LeaseLostError(f"writer lease {self.uri} was lost: {self.lost}") from self.lost
        if self.record is None:
            raise LeaseLostError(f"writer lease {self.uri} is not held by this object")
        stored = self.read()
        if stored is None or stored.token != self.record.token:
            raise LeaseLostError(
                f"writer lease {self.uri} is no longer ours ({self.record.describe()}): now "
                f"{stored.describe() if stored else 'removed'}"
            )

    def renew(self) -> None:
        """Rewrite ``renewed_at``; LeaseLostError when the lease is no longer ours."""
        with self._io:
            self.check()
            assert self.record is not None
            renewed = LeaseRecord(**{**asdict(self.record), "renewed_at": _now().isoformat()})
            self._write(renewed, create=False)
            self.record = renewed

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self.stop_renewing()
        with self._io:
            if self.record is None:
                return
            try:
                stored = self.read()
                if stored is not None and stored.token == self.record.token:
                    self._fs.delete_file(self._path)
                    logger.info("writer lease released: %s", self.record.describe())
                else:
                    logger.warning(
                        "writer lease %s is no longer ours at release (now %s)",
                        self.uri,
                        stored.describe() if stored else "removed",
                    )
            finally:
                self.record = None

    # ---- renewal thread
    def start_renewing(self, interval: float | None = None) -> None:
        interval = renew_interval(self.stale_after) if interval is None else interval
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._renew_loop, args=(interval,), name="writer-lease", daemon=True
        )
        self._thread.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _renew_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LeaseLostError as err:
                logger.error("%s; the run will stop before its next publishing step", err)
                self.lost = err
                return
            except Exception as err:  # noqa: BLE001 - a failed renewal is retried next interval
                logger.warning("could not renew writer lease %s: %s", self.uri, err)

    def __enter__(self) -> WriterLease:
        self.acquire()
        self.start_renewing()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
