"""The writer lease: one small JSON object that says who is writing to an index right now.

    <index.uri>/_locks/writer.json   {"kind": "index"|"maintain"|"publish", "run_id", "host", "pid",
                                      "started_at", "renewed_at", "token"}

The index job holds it from its start to its end, renewing it from a daemon thread; maintenance
holds it while it deletes tags, compacts and cleans up. So a cleanup never runs beside a live writer
(whose uncommitted files it could otherwise take for garbage), and two index runs never interleave
their merges and tag moves. A lease nobody renewed for ``maintain.writer_stale_minutes`` belongs to
a dead job and is taken over, with a warning.

On S3 the writes are conditional, through boto3 (pyarrow's S3 filesystem cannot send the
conditions): the lease is created with ``If-None-Match: *``, so of two starters exactly one creates
it; it is renewed, taken over (when stale) and released with ``If-Match: <ETag>`` of the version the
writer last read, so of two takers of one stale lease only one wins, and a writer whose lease was
taken over can neither overwrite nor delete its successor's. An S3-compatible endpoint that does not
honour a condition is found once per bucket by a probe on a scratch object and named in a warning;
that part then falls back to a plain request. On a local disk a temporary file is renamed into place
(a hard link when the lease is new, so of two starters only one creates it). Each acquirer re-reads
the lease after writing and goes on only if its own token is there, which still narrows the window
where a condition is not honoured (or a writer of an older release PUTs plainly).

A lease left by a process that no longer exists on this same host (a job killed with SIGKILL and
rerun here) is taken over at once, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Literal
from urllib.parse import urlparse

import pyarrow.fs as pafs
from botocore.exceptions import ClientError

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

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, text: str, where: str) -> LeaseRecord:
        try:
            doc = json.loads(text)
            return cls(**{name: doc[name] for name in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"unreadable writer lease {where}: {err}; got {text[:200]!r}") from err


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _describe(record: LeaseRecord | None) -> str:
    return record.describe() if record else "removed"


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


# ---- S3: conditional requests through boto3 --------------------------------------------------
_SIGNING_SECRETS = (
    (re.compile(r"(Credential=)[^/\s,'\"]+"), r"\1<redacted>"),
    (re.compile(r"(x-amz-security-token'?:\s*b?'?)[^'\s,]+", re.IGNORECASE), r"\1<redacted>"),
)
_BOGUS_ETAG = '"00000000000000000000000000000000"'  # no object has it: a probe's If-Match fails
_CONDITIONS = ("PutObject If-None-Match: *", "PutObject If-Match", "DeleteObject If-Match")


class _RedactSigning(logging.Filter):
    """botocore's DEBUG wire trace prints each request's signed headers, which name the access key
    id (and a session token): the project's logs never carry credentials."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = original = record.getMessage()
        for pattern, repl in _SIGNING_SECRETS:
            text = pattern.sub(repl, text)
        if text != original:
            record.msg, record.args = text, ()
        return True


_REDACT_SIGNING = _RedactSigning()


@lru_cache(maxsize=8)
def _client(settings: S3Settings):
    """One boto3 S3 client per endpoint (thread-safe; building one takes a tenth of a second).
    Credentials come from the standard AWS chain, as for pyarrow and LanceDB."""
    import boto3
    from botocore.config import Config

    for name in ("botocore.endpoint", "botocore.auth"):
        logging.getLogger(name).addFilter(_REDACT_SIGNING)  # a no-op when already there
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        config=Config(retries={"total_max_attempts": settings.max_attempts, "mode": "standard"}),
    )


def _error(err: ClientError) -> tuple[str, int]:
    """(error code, HTTP status) of a failed S3 request."""
    return (
        str(err.response.get("Error", {}).get("Code", "")),
        int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)),
    )


def _condition_failed(err: ClientError) -> bool:
    """412: the ETag condition failed; 409: a concurrent conditional write won; NoSuchKey: the
    object an If-Match named is gone."""
    code, status = _error(err)
    return status in (409, 412) or code == "NoSuchKey"


def _outcome(request) -> str:
    """How the endpoint answered a request whose condition must fail."""
    try:
        request()
    except ClientError as err:
        code, status = _error(err)
        return "honoured" if status == 412 else f"rejected ({code or status})"
    return "ignored (the request succeeded)"


def _probe(client, bucket: str, key: str) -> dict[str, str]:
    """Try each condition the lease uses on the scratch object ``key``, in a way that must fail
    (412) on an endpoint that honours it; the object is deleted afterwards."""
    client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    trials = (
        lambda: client.put_object(Bucket=bucket, Key=key, Body=b"{}", IfNoneMatch="*"),
        lambda: client.put_object(Bucket=bucket, Key=key, Body=b"{}", IfMatch=_BOGUS_ETAG),
        lambda: client.delete_object(Bucket=bucket, Key=key, IfMatch=_BOGUS_ETAG),
    )
    try:
        return {name: _outcome(trial) for name, trial in zip(_CONDITIONS, trials, strict=True)}
    finally:
        client.delete_object(Bucket=bucket, Key=key)


@dataclass(frozen=True)
class _Honoured:
    """Which conditional requests an endpoint honours; a request leaves out the others."""

    create: bool  # PutObject If-None-Match: *
    replace: bool  # PutObject If-Match: <ETag>
    delete: bool  # DeleteObject If-Match: <ETag>


_HONOURED: dict[tuple[S3Settings, str], _Honoured] = {}
_HONOURED_LOCK = threading.Lock()


def _honoured(settings: S3Settings, bucket: str, scratch_key: str) -> _Honoured:
    """What the endpoint honours for ``bucket``, probed once per process (a warning names what
    it does not: there the lease narrows, but does not close, the race between two writers)."""
    with _HONOURED_LOCK:
        if (settings, bucket) in _HONOURED:
            return _HONOURED[(settings, bucket)]
        outcomes = _probe(_client(settings), bucket, scratch_key)
        found = _Honoured(*(outcomes[name] == "honoured" for name in _CONDITIONS))
        _HONOURED[(settings, bucket)] = found
    missing = {name: outcome for name, outcome in outcomes.items() if outcome != "honoured"}
    if missing:
        logger.warning(
            "the S3 endpoint %s does not honour conditional writes for bucket %s (%s): the writer "
            "lease uses plain requests there and a read-back, which narrows but does not close "
            "the race between two writers starting at once",
            settings.endpoint_url or "(AWS default)",
            bucket,
            "; ".join(f"{name}: {outcome}" for name, outcome in missing.items()),
        )
    return found


class _Conflict(Exception):
    """A conditional request failed: the lease changed since it was read. ``stored`` is what is
    there now (None: nothing)."""

    def __init__(self, stored: LeaseRecord | None = None):
        super().__init__(_describe(stored))
        self.stored = stored


class _S3Object:
    """The lease object on S3. pyarrow's S3 filesystem cannot send If-None-Match / If-Match, so
    the lease alone talks to S3 through boto3."""

    def __init__(self, uri: str, s3: S3Settings | None):
        parsed = urlparse(uri)
        self.bucket, self.key = parsed.netloc, parsed.path.lstrip("/")
        self.settings = (s3 or S3Settings()).resolved()

    def honoured(self) -> _Honoured:
        scratch = f"{self.key.rsplit('/', 1)[0]}/conditional-probe.{uuid.uuid4().hex}"
        return _honoured(self.settings, self.bucket, scratch)

    def get(self) -> tuple[bytes, str | None] | None:
        """(content, ETag), or None when there is no lease."""
        try:
            got = _client(self.settings).get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if _error(err)[0] == "NoSuchKey":
                return None
            raise
        return got["Body"].read(), got.get("ETag")

    def put(self, data: bytes, *, create: bool = False, etag: str | None = None) -> str | None:
        """Store ``data``: only if there is no lease (``create``), or only if the stored version
        is ``etag``; returns the new ETag. _Conflict when the condition failed."""
        honoured, condition = self.honoured(), {}
        if create and honoured.create:
            condition["IfNoneMatch"] = "*"
        if etag and honoured.replace:
            condition["IfMatch"] = etag
        try:
            put = _client(self.settings).put_object(
                Bucket=self.bucket, Key=self.key, Body=data, **condition
            )
        except ClientError as err:
            if condition and _condition_failed(err):
                raise _Conflict() from err
            raise
        return put.get("ETag")

    def delete(self, etag: str | None) -> None:
        """Delete the lease, only if the stored version is ``etag``; _Conflict when it is not."""
        condition = {"IfMatch": etag} if etag and self.honoured().delete else {}
        try:
            _client(self.settings).delete_object(Bucket=self.bucket, Key=self.key, **condition)
        except ClientError as err:
            if condition and _condition_failed(err):
                raise _Conflict() from err
            raise


# ---- the lease ---------------------------------------------------------------------------------
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
        self._s3 = _S3Object(self.uri, s3) if is_s3(index_uri) else None
        self._fs, self._path = filesystem_for(self.uri) if self._s3 is None else (None, "")
        self.kind = kind
        self.run_id = run_id
        self.stale_after = stale_after
        self.record: LeaseRecord | None = None  # ours, while held
        self.took_over: LeaseRecord | None = None  # the stale lease we replaced, if any
        self.lost: Exception | None = None  # set by the renew thread when the lease was lost
        self._etag: str | None = None  # S3: the version of ours last written, for If-Match
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()  # the renew thread and the owner never write at once

    # ---- the stored document
    def read(self) -> LeaseRecord | None:
        """The lease as stored now, or None when nobody holds it."""
        return self._read()[0]

    def _read(self) -> tuple[LeaseRecord | None, str | None]:
        """The stored lease and, on S3, its ETag."""
        if self._s3 is not None:
            got = self._s3.get()
            if got is None:
                return None, None
            return LeaseRecord.from_json(got[0].decode("utf-8"), self.uri), got[1]
        try:
            with self._fs.open_input_stream(self._path) as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            return None, None
        except OSError as err:  # pyarrow raises OSError for some missing files
            if self._fs.get_file_info(self._path).type == pafs.FileType.NotFound:
                return None, None
            raise err
        return LeaseRecord.from_json(text, self.uri), None

    def _write_local(self, record: LeaseRecord, *, create: bool) -> None:
        self._fs.create_dir(self._path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{self._path}.{record.token}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(record.encode())
            f.flush()
            os.fsync(f.fileno())
        try:
            if create:  # fails if another starter created it since we looked
                os.link(tmp, self._path)
            else:
                os.replace(tmp, self._path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _put_s3(
        self, record: LeaseRecord, *, create: bool = False, etag: str | None = None
    ) -> str | None:
        """PUT ``record`` under its condition and return its ETag. _Conflict (with what is stored)
        when the condition failed, unless what is stored is ``record``: then the client retried a
        PUT that had succeeded but whose answer was lost."""
        assert self._s3 is not None
        try:
            return self._s3.put(record.encode(), create=create, etag=etag)
        except _Conflict:
            stored, stored_etag = self._read()
            if stored == record:
                return stored_etag
            raise _Conflict(stored) from None

    # ---- acquire / renew / release
    def acquire(self) -> LeaseRecord:
        """Take the lease: refuse (LeaseHeldError) while another live writer holds it; take over
        one that was not renewed for ``stale_after``, or whose process on this host is gone."""
        if self.record is not None:
            raise RuntimeError(f"lease {self.uri} is already held by this object")
        now = _now()
        current, etag = self._read()
        if current is not None:
            self._judge(current, now)
        mine = self._new_record(now)
        try:
            if self._s3 is None:
                self._write_local(mine, create=current is None)
            else:  # create-only, or only over the very version judged stale
                self._etag = self._put_s3(mine, create=current is None, etag=etag)
        except FileExistsError:
            raise self._taken(self.read(), mine) from None
        except _Conflict as err:
            raise self._taken(err.stored, mine) from None
        stored, stored_etag = self._read()
        if stored is None or stored.token != mine.token:  # a plain write can be overwritten
            raise self._taken(stored, mine)
        self._etag = stored_etag
        self.record = mine
        logger.info("writer lease acquired: %s", mine.describe())
        return mine

    def _judge(self, current: LeaseRecord, now: datetime) -> None:
        """Refuse (LeaseHeldError) beside the live holder ``current``; else note the takeover."""
        age = current.age(now)
        if _process_gone(current):
            logger.warning(
                "taking over the writer lease of a dead process (%s; no pid %d on this host)",
                current.describe(),
                current.pid,
            )
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

    def _new_record(self, now: datetime) -> LeaseRecord:
        stamp = now.isoformat()
        return LeaseRecord(
            kind=self.kind,
            run_id=self.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=stamp,
            renewed_at=stamp,
            token=uuid.uuid4().hex,
        )

    def _taken(self, holder: LeaseRecord | None, mine: LeaseRecord) -> LeaseHeldError:
        """The refusal of a starter that lost the race to ``holder``."""
        return LeaseHeldError(
            f"index writer lease {self.uri} was taken by "
            f"{holder.describe() if holder else 'another writer'} while {self.kind} run "
            f"{self.run_id} was starting; refusing to start",
            holder or mine,
        )

    def check(self) -> None:
        """Raise LeaseLostError unless the stored lease is still ours (call before a step that
        must not run once another writer has taken over, e.g. moving tags)."""
        if self.lost is not None:
            raise LeaseLostError(f"writer lease {self.uri} was lost: {self.lost}") from self.lost
        if self.record is None:
            raise LeaseLostError(f"writer lease {self.uri} is not held by this object")
        stored = self.read()
        if stored is None or stored.token != self.record.token:
            raise self._lost(stored)

    def _lost(self, stored: LeaseRecord | None) -> LeaseLostError:
        assert self.record is not None
        return LeaseLostError(
            f"writer lease {self.uri} is no longer ours ({self.record.describe()}): now "
            f"{_describe(stored)}"
        )

    def renew(self) -> None:
        """Rewrite ``renewed_at``; LeaseLostError when the lease is no longer ours."""
        with self._io:
            self.check()
            assert self.record is not None
            renewed = replace(self.record, renewed_at=_now().isoformat())
            if self._s3 is None:
                self._write_local(renewed, create=False)
            else:  # If-Match: a takeover since check() makes this PUT fail, not overwrite it
                try:
                    self._etag = self._put_s3(renewed, etag=self._etag)
                except _Conflict as err:
                    raise self._lost(err.stored) from None
            self.record = renewed

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self.stop_renewing()
        with self._io:
            if self.record is None:
                return
            try:
                stored, etag = self._read()
                if stored is not None and stored.token == self.record.token:
                    self._delete(etag)
                else:
                    self._not_ours_at_release(stored)
            finally:
                self.record = None
                self._etag = None

    def _delete(self, etag: str | None) -> None:
        """Delete our lease; on S3 only the version read as ours (If-Match), so a takeover in
        between leaves the new holder's lease in place."""
        assert self.record is not None
        if self._s3 is None:
            self._fs.delete_file(self._path)
        else:
            try:
                self._s3.delete(etag)
            except _Conflict:
                self._not_ours_at_release(self.read())
                return
        logger.info("writer lease released: %s", self.record.describe())

    def _not_ours_at_release(self, stored: LeaseRecord | None) -> None:
        logger.warning(
            "writer lease %s is no longer ours at release (now %s)", self.uri, _describe(stored)
        )

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
