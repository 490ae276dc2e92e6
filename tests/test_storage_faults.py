"""S3 under faults, through a real fault-injecting proxy in front of the moto server: transient failures are
retried (bounded) without losing or duplicating anything; permanent ones fail fast, clearly, and never
leak the secret key."""

from __future__ import annotations

import logging
import os
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from batchgen.core.errors import (
    EXIT_STORAGE,
    EXIT_TRANSIENT,
    AlreadyExistsError,
    NotFoundError,
    StorageError,
    TransientStorageError,
)
from batchgen.storage import open_storage
from tests._runs import run_cli
from tests.fixtures.faultproxy import FAULTS, FaultProxy

PART = 5 * 1024 * 1024


@pytest.fixture
def proxy_factory(s3_server, monkeypatch):
    """Start a FaultProxy in front of the moto server and point AWS_ENDPOINT_URL at it, with fast backoff."""
    started: list[FaultProxy] = []

    def start(failure_rate: float, seed: int = 1, **options) -> FaultProxy:
        proxy = FaultProxy(s3_server, failure_rate, seed, **options)
        proxy.start()
        started.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("BATCHGEN_S3_BACKOFF_S", "0.002")
        monkeypatch.setenv("BATCHGEN_S3_BACKOFF_MAX_S", "0.05")
        monkeypatch.setenv("BATCHGEN_S3_MAX_ATTEMPTS", "12")
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def test_operations_survive_a_fifth_of_requests_failing(
    proxy_factory, s3_uri, s3_bucket, s3_client, tmp_path, monkeypatch
):
    proxy = proxy_factory(failure_rate=0.2, seed=20240611)
    monkeypatch.setenv("BATCHGEN_S3_MULTIPART_THRESHOLD", str(PART))
    storage = open_storage(s3_uri)

    expected: dict[str, bytes] = {}
    conditional_keys = []
    for i in range(100):
        key = f"run/videos/shard-000000/item-{i:04d}.mp4"
        data = os.urandom(2000 + i)
        conditional = i % 2 == 0
        # A first conditional create must succeed even when its answer is lost and the retry meets our own object.
        storage.put_bytes(key, data, if_absent=conditional, content_type="video/mp4")
        expected[key] = data
        if conditional:
            conditional_keys.append(key)
    for i, key in enumerate(conditional_keys):
        sidecar = key.replace("/videos/", "/meta/").replace(".mp4", ".json")
        storage.put_bytes(sidecar, f'{{"n": {i}}}'.encode(), if_absent=True)
        expected[sidecar] = f'{{"n": {i}}}'.encode()
    # Second creates must lose every time, faults or not.
    for key in conditional_keys:
        with pytest.raises(AlreadyExistsError):
            storage.put_bytes(key, b"impostor", if_absent=True)
    source = tmp_path / "large.bin"
    source.write_bytes(os.urandom(PART + 1000))
    storage.put_file("run/large/0.bin", source, if_absent=True)
    expected["run/large/0.bin"] = source.read_bytes()
    for key in list(expected)[:10]:
        storage.delete(key)
        storage.delete(key)
        del expected[key]

    for key, data in expected.items():
        assert storage.get_bytes(key) == data, key
    storage.get_file("run/large/0.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == expected["run/large/0.bin"]
    for _ in range(5):
        assert [o.key for o in storage.list("run/")] == sorted(expected)
    assert storage.head("run/large/0.bin").size == PART + 1000

    # Ground truth straight from the server, not through the proxy: nothing lost, nothing extra.
    stored = {
        obj["Key"].removeprefix("out/")
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for obj in page.get("Contents", [])
    }
    assert stored == set(expected)
    for key in conditional_keys[10:]:
        assert s3_client.get_object(Bucket=s3_bucket, Key=f"out/{key}")["Body"].read() == expected[key]
    # An upload whose creation answer was lost cannot be found again (S3 has no idempotent create): those,
    # and only those, may remain (a lifecycle rule cleans them up on AWS).
    lost_creations = sum(1 for m, _, q, outcome in proxy.events if (m, q, outcome) == ("POST", "uploads", "drop_after"))
    assert len(s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])) <= lost_creations

    # The faults really happened, at about the rate asked for, and every request was counted.
    assert all(proxy.counts[fault] > 0 for fault in FAULTS), proxy.counts
    assert 0.12 < proxy.faults_injected / proxy.total < 0.28, proxy.counts
    assert storage.request_count == proxy.total
    ambiguous = {(m, p) for m, p, _, outcome in proxy.events if outcome == "drop_after"}
    assert any(("PUT", f"/{s3_bucket}/out/{key}") in ambiguous for key in conditional_keys), (
        "no conditional put had its answer dropped after the write: the ambiguous case went untested"
    )


@pytest.mark.parametrize("fault", ["500", "503", "drop_before", "drop_after"])
def test_retries_are_bounded_then_transient(proxy_factory, s3_uri, monkeypatch, fault):
    proxy = proxy_factory(failure_rate=1.0, faults=(fault,))
    monkeypatch.setenv("BATCHGEN_S3_MAX_ATTEMPTS", "3")
    storage = open_storage(s3_uri)
    with pytest.raises(TransientStorageError) as caught:
        storage.put_bytes("run/x.json", b"{}")
    assert caught.value.exit_code == EXIT_TRANSIENT
    assert "3 attempt(s)" in str(caught.value) and s3_uri in str(caught.value)
    assert proxy.total == 3 == storage.request_count


def test_access_denied_fails_fast_with_a_clear_message(proxy_factory, s3_uri, s3_bucket):
    proxy = proxy_factory(failure_rate=0.0, deny_path_prefix=f"/{s3_bucket}/out/private/")
    storage = open_storage(s3_uri)
    storage.put_bytes("public/ok.json", b"{}")
    for operation in (
        lambda: storage.put_bytes("private/x.json", b"{}"),
        lambda: storage.put_bytes("private/x.json", b"{}", if_absent=True),
        lambda: storage.get_bytes("private/x.json"),
    ):
        before = proxy.total
        with pytest.raises(StorageError) as caught:
            operation()
        assert type(caught.value) is StorageError  # not retryable, not "not found", not "already exists"
        assert caught.value.exit_code == EXIT_STORAGE
        message = str(caught.value)
        assert "access denied" in message and "AccessDenied" in message
        assert f"{s3_uri}/private/x.json" in message
        assert proxy.total - before == 1, "a 403 must not be retried"  # one request: no retry, no backoff


def test_access_denied_on_first_use_fails_before_any_work(proxy_factory, s3_uri, s3_bucket):
    proxy = proxy_factory(failure_rate=0.0, deny_path_prefix=f"/{s3_bucket}")
    storage = open_storage(s3_uri)
    with pytest.raises(StorageError, match=r"check bucket .*access denied \(S3 error AccessDenied\)"):
        list(storage.list("run/meta/"))
    assert proxy.counts == {"403": 1}


def test_missing_bucket_fails_fast(s3_server):
    bucket = f"bg-missing-{uuid.uuid4().hex[:8]}"
    storage = open_storage(f"s3://{bucket}/out")
    with pytest.raises(StorageError, match=rf"bucket '{bucket}' does not exist \(endpoint {s3_server}\)") as caught:
        storage.put_bytes("run/plan/run.json", b"{}", if_absent=True)
    assert caught.value.exit_code == EXIT_STORAGE
    assert storage.request_count == 1


def test_missing_credentials_fail_fast(s3_uri, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probe on a laptop
    with pytest.raises(StorageError, match="no usable AWS credentials"):
        open_storage(s3_uri).put_bytes("x", b"")


def test_secret_key_never_appears_in_errors_or_logs(
    proxy_factory, s3_uri, s3_bucket, s3_credentials, monkeypatch, caplog
):
    secret = s3_credentials["AWS_SECRET_ACCESS_KEY"]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret
    caplog.set_level(logging.DEBUG)
    # botocore's own level too: a CLI call earlier in the session (configure_logging) quiets it to WARNING.
    caplog.set_level(logging.DEBUG, logger="botocore")
    proxy = proxy_factory(failure_rate=0.3, seed=99, deny_path_prefix=f"/{s3_bucket}/out/private/")
    storage = open_storage(s3_uri)

    errors: list[BaseException] = []
    for i in range(20):
        storage.put_bytes(f"run/{i}.json", b"{}", if_absent=True)
        assert storage.get_bytes(f"run/{i}.json") == b"{}"
    list(storage.list("run/"))
    permanent_failures = [
        lambda: storage.put_bytes("private/x.json", b"{}"),
        lambda: storage.get_bytes("run/missing.json"),
        lambda: storage.put_bytes("run/0.json", b"{}", if_absent=True),
        lambda: next(open_storage("s3://bg-missing-bucket-for-secrets/out").list("x")),
    ]
    for failure in permanent_failures:
        with pytest.raises(StorageError) as caught:
            failure()
        errors.append(caught.value)
    monkeypatch.setenv("BATCHGEN_S3_MAX_ATTEMPTS", "2")
    proxy.failure_rate = 1.0
    with pytest.raises(TransientStorageError) as caught:
        open_storage(s3_uri).get_bytes("run/1.json")
    errors.append(caught.value)
    assert [type(e) for e in errors] == [
        StorageError,
        NotFoundError,
        AlreadyExistsError,
        StorageError,
        TransientStorageError,
    ]

    texts = ["".join(traceback.format_exception(e)) for e in errors]
    formatter = logging.Formatter("%(name)s %(message)s")
    texts += [formatter.format(record) for record in caplog.records]
    assert any(record.name.startswith("batchgen.storage") for record in caplog.records), "expected retry logs"
    assert len(caplog.records) > 50  # botocore's debug logging was on too
    leaks = [text for text in texts if secret in text]
    assert not leaks, leaks[0][:500]


# -- S3's 409 answers to racing writes, and slow answers ----------------------------------------------------------


def test_conditional_creates_racing_under_409s_each_have_exactly_one_winner(proxy_factory, s3_uri, s3_client):
    """Four writers race to create the same keys while a third of their conditional PUTs meet 409
    ConditionalRequestConflict: every key is created once, by one writer, whose bytes are stored."""
    proxy = proxy_factory(failure_rate=0.0, seed=409, conflict_rate=0.35)
    keys = [f"run/meta/shard-000000/item-{i:03d}.json" for i in range(30)]
    writers = [open_storage(s3_uri) for _ in range(4)]

    def race(writer: int) -> list[str]:
        won = []
        for key in keys:
            try:
                writers[writer].put_bytes(key, f"writer {writer}".encode(), if_absent=True)
                won.append(key)
            except AlreadyExistsError:
                pass
        return won

    with ThreadPoolExecutor(len(writers)) as pool:
        wins = list(pool.map(race, range(len(writers))))
    winners = {key: writer for writer, won in enumerate(wins) for key in won}
    assert sum(map(len, wins)) == len(keys) == len(winners), "a key was created twice, or not at all"
    bucket, prefix = s3_uri[len("s3://") :].split("/", 1)
    for key, writer in winners.items():
        stored = s3_client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
        assert stored == f"writer {writer}".encode(), key
    assert proxy.counts["409_conflict"] >= 10, proxy.counts


def test_a_conflicting_multipart_completion_starts_a_new_upload(
    proxy_factory, s3_uri, s3_bucket, tmp_path, monkeypatch
):
    """409 ConditionalRequestConflict on CompleteMultipartUpload: AWS says to upload again from
    CreateMultipartUpload; the first upload is aborted, the second completes with the file's bytes."""
    proxy = proxy_factory(failure_rate=0.0)
    monkeypatch.setenv("BATCHGEN_S3_MULTIPART_THRESHOLD", str(PART))
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(PART + 100))
    proxy.inject("POST", "/big.bin", "409_conflict", query_contains="uploadId=")
    storage = open_storage(s3_uri)
    storage.put_file("run/big.bin", source, if_absent=True)
    assert storage.get_bytes("run/big.bin") == source.read_bytes()
    calls = [(m, q.split("=")[0]) for m, p, q, _ in proxy.events if p.endswith("/big.bin") and m in ("POST", "DELETE")]
    assert calls == [("POST", "uploads"), ("POST", "uploadId"), ("DELETE", "uploadId"), ("POST", "uploads"),
                     ("POST", "uploadId")], calls  # fmt: skip
    with pytest.raises(AlreadyExistsError):
        storage.put_file("run/big.bin", source, if_absent=True)


def test_an_aborted_multipart_completion_is_retried_as_it_is(proxy_factory, s3_uri, tmp_path, monkeypatch):
    """409 OperationAborted on CompleteMultipartUpload ("try again"): the same upload is completed again."""
    proxy = proxy_factory(failure_rate=0.0)
    monkeypatch.setenv("BATCHGEN_S3_MULTIPART_THRESHOLD", str(PART))
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(PART + 100))
    proxy.inject("POST", "/big.bin", "409_aborted", times=2, query_contains="uploadId=")
    storage = open_storage(s3_uri)
    storage.put_file("run/big.bin", source, if_absent=True)
    assert storage.get_bytes("run/big.bin") == source.read_bytes()
    outcomes = [(q.split("=")[0], o) for m, p, q, o in proxy.events if p.endswith("/big.bin") and m == "POST"]
    assert outcomes == [("uploads", "forwarded"), ("uploadId", "409_aborted"), ("uploadId", "409_aborted"),
                        ("uploadId", "forwarded")], outcomes  # fmt: skip
    assert proxy.counts["409_aborted"] == 2


def test_stalled_answers_are_retried_after_the_read_timeout(proxy_factory, s3_uri, monkeypatch):
    proxy = proxy_factory(failure_rate=0.0, stall_s=1.5)
    monkeypatch.setenv("BATCHGEN_S3_READ_TIMEOUT_S", "0.3")
    storage = open_storage(s3_uri)
    storage.put_bytes("run/a.json", b'{"a": 1}')
    proxy.inject("GET", "/run/a.json", "stall", times=2)
    assert storage.get_bytes("run/a.json") == b'{"a": 1}'
    assert [o for m, p, _, o in proxy.events if m == "GET" and p.endswith("/run/a.json")] == [
        "stall",
        "stall",
        "forwarded",
    ]


def test_a_slow_live_body_is_read_whole_and_a_stalled_body_is_read_again(proxy_factory, s3_uri, monkeypatch):
    """botocore's read timeout bounds each read, not the whole answer: a body trickling in pieces faster than
    the timeout arrives in one request however long it takes in all; a body that stops for longer is retried."""
    proxy = proxy_factory(failure_rate=0.0, trickle_bytes=256, trickle_delay_s=0.08)
    monkeypatch.setenv("BATCHGEN_S3_READ_TIMEOUT_S", "0.4")
    storage = open_storage(s3_uri)
    data = os.urandom(256 * 10)
    storage.put_bytes("run/v.mp4", data)
    proxy.inject("GET", "/run/v.mp4", "trickle")
    assert storage.get_bytes("run/v.mp4") == data  # 10 pieces, 0.8 s in all: twice the read timeout
    proxy.trickle_delay_s = 1.0
    proxy.inject("GET", "/run/v.mp4", "trickle")
    assert storage.get_bytes("run/v.mp4") == data
    gets = [o for m, p, _, o in proxy.events if m == "GET" and p.endswith("/run/v.mp4")]
    assert gets == ["trickle", "trickle", "forwarded"], gets


def test_read_timeouts_that_persist_end_in_exit_200(proxy_factory, s3_uri, monkeypatch):
    """The real CLI against a store that never answers in time: bounded retries, then exit 200 (transient
    error outlasted the retries: rerun to resume), the message naming the URI and the read timeout."""
    proxy = proxy_factory(failure_rate=1.0, faults=("stall",), stall_s=1.0)
    monkeypatch.setenv("BATCHGEN_S3_READ_TIMEOUT_S", "0.2")
    monkeypatch.setenv("BATCHGEN_S3_MAX_ATTEMPTS", "3")
    result = run_cli("status", f"{s3_uri}/clips-0123456789ab")
    assert result.returncode == EXIT_TRANSIENT, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "ReadTimeoutError persisted after 3 attempt(s)" in last and s3_uri in last, last
    assert proxy.counts == {"stall": 3}, proxy.counts
