"""The writer lease on S3 with conditional writes, against a real S3-protocol server (moto on
loopback, the suite's ``s3_server``): of two starters exactly one wins, of two takers of one stale
lease exactly one wins, and a writer whose lease was taken over can neither renew (overwrite) nor
release (delete) its successor's lease. The plain lease protocol on S3 and on a local folder is in
``tests/test_maintain.py``.

To decide each race on the server, not on the client, both contenders are held on a barrier after
they have read the lease and before they write it; interleavings within one contender (a takeover
between a check and its PUT) are forced the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import pytest

from pipelines.indexing import lease as lease_module
from pipelines.indexing.lease import LeaseHeldError, LeaseLostError, WriterLease
from pipelines.storage import S3Settings
from tests.conftest import TEST_AWS_ENV

RACES = 20
STALE = timedelta(milliseconds=50)


@pytest.fixture
def s3(s3_server) -> S3Settings:
    return S3Settings(endpoint_url=s3_server, region="us-east-1", allow_http=True)


def _lease(uri: str, s3: S3Settings, run_id: str, stale: timedelta = STALE) -> WriterLease:
    return WriterLease(uri, s3, kind="index", run_id=run_id, stale_after=stale)


def _hold_after_first_read(lease: WriterLease, barrier: threading.Barrier) -> None:
    """Make ``lease`` wait on ``barrier`` right after its first read of the stored lease."""
    read, first = lease._read, [True]

    def read_then_wait():
        got = read()
        if first[0]:
            first[0] = False
            barrier.wait(timeout=10)
        return got

    lease._read = read_then_wait


def _race(*leases: WriterLease) -> list[BaseException | None]:
    """``acquire()`` on each lease in its own thread, all past their first read before any
    writes; the exception each one raised (None: it won)."""
    barrier = threading.Barrier(len(leases))
    results: list[BaseException | None] = [None] * len(leases)

    def take(i: int) -> None:
        try:
            leases[i].acquire()
        except BaseException as err:  # noqa: BLE001 - reported to the test
            results[i] = err

    for lease in leases:
        _hold_after_first_read(lease, barrier)
    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def _one_winner(leases: tuple[WriterLease, ...], results: list) -> WriterLease:
    """Exactly one lease won; every other got the lease-held refusal naming the winner."""
    winners = [lease for lease, err in zip(leases, results, strict=True) if err is None]
    assert len(winners) == 1, results
    winner = winners[0]
    for err in results:
        if err is not None:
            assert isinstance(err, LeaseHeldError), repr(err)
            assert "was taken by" in str(err) and winner.run_id in str(err), err
            assert err.holder == winner.record
    assert winner.read() == winner.record
    return winner


def test_the_test_server_honours_conditional_writes(s3_server, s3_bucket):
    """What the lease relies on, asked of moto directly: each condition fails with 412."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    etag = client.put_object(Bucket=s3_bucket, Key="k", Body=b"1", IfNoneMatch="*")["ETag"]
    failing = [
        lambda: client.put_object(Bucket=s3_bucket, Key="k", Body=b"2", IfNoneMatch="*"),
        lambda: client.put_object(Bucket=s3_bucket, Key="k", Body=b"2", IfMatch='"0"'),
        lambda: client.delete_object(Bucket=s3_bucket, Key="k", IfMatch='"0"'),
    ]
    for request in failing:
        with pytest.raises(ClientError) as info:
            request()
        assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    assert client.get_object(Bucket=s3_bucket, Key="k")["ETag"] == etag  # nothing changed
    newer = client.put_object(Bucket=s3_bucket, Key="k", Body=b"2", IfMatch=etag)["ETag"]
    client.delete_object(Bucket=s3_bucket, Key="k", IfMatch=newer)
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


def test_two_starters_exactly_one_wins(s3, s3_bucket, caplog):
    for i in range(RACES):
        uri = f"s3://{s3_bucket}/index-{i}"
        leases = (_lease(uri, s3, f"r-a{i}"), _lease(uri, s3, f"r-b{i}"))
        _one_winner(leases, _race(*leases)).release()
        assert leases[0].read() is None
    assert "does not honour conditional writes" not in caplog.text


def test_two_takers_of_one_stale_lease_exactly_one_wins(s3, s3_bucket, caplog):
    for i in range(RACES // 2):
        uri = f"s3://{s3_bucket}/index-{i}"
        dead = _lease(uri, s3, f"r-dead{i}")
        stale = dead.acquire()
        time.sleep(STALE.total_seconds() * 1.2)
        leases = (_lease(uri, s3, f"r-a{i}"), _lease(uri, s3, f"r-b{i}"))
        winner = _one_winner(leases, _race(*leases))
        assert winner.took_over == stale
        with pytest.raises(LeaseLostError, match=winner.run_id):
            dead.check()
        winner.release()
    assert "taking over a stale writer lease" in caplog.text


def test_a_writer_whose_lease_was_taken_over_cannot_renew_it(s3, s3_bucket):
    """The takeover lands between the old holder's check and its PUT: only If-Match stops it."""
    uri = f"s3://{s3_bucket}/index"
    old, new = _lease(uri, s3, "r-old"), _lease(uri, s3, "r-new")
    old.acquire()
    check = old.check

    def check_then_taken_over() -> None:
        check()
        time.sleep(STALE.total_seconds() * 1.2)
        new.acquire()

    old.check = check_then_taken_over
    with pytest.raises(LeaseLostError, match="now index run r-new"):
        old.renew()
    assert new.read() == new.record  # not overwritten
    new.renew()
    new.release()


def test_a_writer_whose_lease_was_taken_over_cannot_release_it(s3, s3_bucket, caplog):
    """The takeover lands between the old holder's read (still its own) and its DELETE."""
    uri = f"s3://{s3_bucket}/index"
    old, new = _lease(uri, s3, "r-old"), _lease(uri, s3, "r-new")
    old.acquire()
    read, calls = old._read, []

    def read_then_taken_over():
        got = read()
        if not calls:
            calls.append(got)
            time.sleep(STALE.total_seconds() * 1.2)
            new.acquire()
        return got

    old._read = read_then_taken_over
    old.release()
    assert calls[0][0].run_id == "r-old"  # the release saw its own lease, then lost it
    assert new.read() == new.record  # not deleted
    assert "no longer ours at release (now index run r-new" in caplog.text
    old.release()  # a second release is a no-op
    new.release()
    assert new.read() is None


def test_an_endpoint_that_ignores_conditions_is_named_and_the_lease_still_works(
    s3, s3_bucket, caplog, monkeypatch
):
    """An endpoint that ignores the conditions (as the probe finds them) gets the plain
    requests and the read-back of before, with a warning."""
    monkeypatch.setattr(
        lease_module,
        "_probe",
        lambda client, bucket, key: dict.fromkeys(lease_module._CONDITIONS, "ignored"),
    )
    uri = f"s3://{s3_bucket}/index"
    first = _lease(uri, s3, "r-one", stale=timedelta(minutes=5))
    first.acquire()
    assert "does not honour conditional writes" in caplog.text and s3_bucket in caplog.text
    with pytest.raises(LeaseHeldError, match="is being written by index run r-one"):
        _lease(uri, s3, "r-two").acquire()
    first.renew()
    first.release()
    assert first.read() is None


def test_the_lease_leaves_no_credentials_in_debug_logs(s3, s3_bucket, caplog):
    """botocore's DEBUG trace prints the signed headers; the lease's client redacts the key id."""
    caplog.set_level(logging.DEBUG)
    lease = _lease(f"s3://{s3_bucket}/index", s3, "r-debug")
    lease.acquire()
    lease.renew()
    lease.release()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Credential=<redacted>" in text  # control: the wire trace was captured
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert TEST_AWS_ENV[name] not in text, name
