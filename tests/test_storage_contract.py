"""One contract, both backends: every test here runs against a folder and against a moto S3 server over HTTP
(the ``storage`` / ``storage_factory`` / ``storage_uri`` fixtures are parametrised "file" and "s3")."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from batchgen.core.errors import AlreadyExistsError, ChangedError, InputError, NotFoundError, StorageError
from batchgen.storage import LocalStorage, open_storage
from batchgen.storage.local import TEMP_PREFIX
from batchgen.storage.s3 import S3Storage, make_client

# Keys chosen so that naive orderings disagree with byte order: '/' (0x2f) sorts before '-', '0', 'B' and
# 'b' sorts after 'B'; "run/a" must not swallow "run/a-b" or "run/ab" when listing "run/a/".
KEYS = ["run/a/2.json", "run/a/10.json", "run/a-b/x", "run/ab", "run/B/z", "run/a/sub/deep.mp4", "other/q"]


def test_put_get_roundtrip_and_overwrite(storage):
    storage.put_bytes("run/meta/shard-000000/item.json", b'{"a": 1}', content_type="application/json")
    assert storage.get_bytes("run/meta/shard-000000/item.json") == b'{"a": 1}'
    storage.put_bytes("run/meta/shard-000000/item.json", b"second")
    assert storage.get_bytes("run/meta/shard-000000/item.json") == b"second"
    storage.put_bytes("empty", b"")
    assert storage.get_bytes("empty") == b""
    assert storage.head("empty").size == 0


def test_missing_object_is_not_found_naming_the_key(storage, tmp_path):
    with pytest.raises(NotFoundError, match="run/missing.json"):
        storage.get_bytes("run/missing.json")
    dest = tmp_path / "dl" / "missing.json"
    with pytest.raises(NotFoundError, match="run/missing.json"):
        storage.get_file("run/missing.json", dest)
    assert not dest.exists()
    assert storage.head("run/missing.json") is None
    assert not storage.exists("run/missing.json")


def test_head_reports_size_and_ignores_folders(storage):
    storage.put_bytes("run/a/b.bin", b"12345")
    info = storage.head("run/a/b.bin")
    assert (info.key, info.size) == ("run/a/b.bin", 5)
    assert storage.exists("run/a/b.bin")
    # "run/a" is only a prefix of an object, not an object.
    assert storage.head("run/a") is None
    with pytest.raises(NotFoundError):
        storage.get_bytes("run/a")


def test_list_is_in_key_order_and_respects_prefixes(storage):
    shuffled = KEYS[:]
    random.Random(7).shuffle(shuffled)
    for key in shuffled:
        storage.put_bytes(key, key.encode())

    listed = list(storage.list(""))
    assert [o.key for o in listed] == sorted(KEYS)
    assert all(o.size == len(o.key) for o in listed)

    cases = {
        "run/a/": ["run/a/10.json", "run/a/2.json", "run/a/sub/deep.mp4"],
        "run/a": ["run/a-b/x", "run/a/10.json", "run/a/2.json", "run/a/sub/deep.mp4", "run/ab"],
        "run/a/1": ["run/a/10.json"],
        "run/B": ["run/B/z"],
        "run/c": [],
        "nothing/": [],
        "other/q": ["other/q"],
    }
    for prefix, expected in cases.items():
        assert [o.key for o in storage.list(prefix)] == expected, prefix


def test_list_start_after_gives_the_keys_that_sort_after_it(storage):
    for key in KEYS:
        storage.put_bytes(key, key.encode())
    everything = [o.key for o in storage.list("run/")]
    cases = {
        None: everything,
        "run/a/10.json": [k for k in everything if k > "run/a/10.json"],
        "run/a/2": [k for k in everything if k > "run/a/2"],  # not itself a key
        "run/": everything,
        "run/zzz": [],
    }
    for start_after, expected in cases.items():
        assert [o.key for o in storage.list("run/", start_after=start_after)] == expected, start_after
    # Disjoint ranges listed separately cover the prefix exactly once.
    bounds = [everything[1], everything[3]]
    pieces = []
    for start_after, last in zip([None, *bounds], [*bounds, None], strict=True):
        pieces += [o.key for o in storage.list("run/", start_after=start_after) if last is None or o.key <= last]
    assert pieces == everything


def test_storage_root_isolates_sibling_roots(storage_uri):
    # "<root>-sibling" shares the root's string prefix; its objects must not leak into the root's listings.
    root = open_storage(storage_uri)
    sibling = open_storage(storage_uri + "-sibling")
    nested = open_storage(storage_uri + "/nested")
    sibling.put_bytes("x", b"s")
    nested.put_bytes("y", b"n")
    root.put_bytes("z", b"r")
    assert [o.key for o in root.list("")] == ["nested/y", "z"]
    assert [o.key for o in sibling.list("")] == ["x"]
    assert root.get_bytes("nested/y") == b"n"


def test_if_absent_creates_once_and_keeps_the_first_content(storage):
    storage.put_bytes("run/videos/s/a.mp4", b"first", if_absent=True)
    with pytest.raises(AlreadyExistsError, match="run/videos/s/a.mp4"):
        storage.put_bytes("run/videos/s/a.mp4", b"second", if_absent=True)
    assert storage.get_bytes("run/videos/s/a.mp4") == b"first"
    # A plain put still overwrites.
    storage.put_bytes("run/videos/s/a.mp4", b"third")
    assert storage.get_bytes("run/videos/s/a.mp4") == b"third"


def race_conditional_puts(instances, key: str) -> dict[int, str]:
    """Every instance puts its own content to ``key`` with if_absent, released at the same instant."""
    barrier = threading.Barrier(len(instances))

    def write(i: int) -> str:
        barrier.wait()
        try:
            instances[i].put_bytes(key, f"writer-{i}".encode(), if_absent=True)
            return "won"
        except AlreadyExistsError:
            return "lost"

    with ThreadPoolExecutor(len(instances)) as pool:
        return dict(enumerate(pool.map(write, range(len(instances)))))


def test_if_absent_race_has_exactly_one_winner(storage_factory):
    # Separate Storage instances (separate clients/connections), as separate workers would have.
    instances = [storage_factory() for _ in range(6)]
    for round_number in range(5):
        key = f"race/{round_number}.json"
        outcomes = race_conditional_puts(instances, key)
        winners = [i for i, outcome in outcomes.items() if outcome == "won"]
        assert len(winners) == 1, (key, outcomes)
        assert instances[0].get_bytes(key) == f"writer-{winners[0]}".encode()


@pytest.mark.parametrize("size", [0, 1, 300_000])
def test_put_file_and_get_file_roundtrip(storage, tmp_path, size):
    data = os.urandom(size)
    source = tmp_path / "src.bin"
    source.write_bytes(data)
    storage.put_file("run/files/blob.bin", source, if_absent=True)
    with pytest.raises(AlreadyExistsError):
        storage.put_file("run/files/blob.bin", source, if_absent=True)

    dest = tmp_path / "downloads" / "blob.bin"
    storage.get_file("run/files/blob.bin", dest)
    assert dest.read_bytes() == data
    # Overwriting an existing download replaces it whole and leaves no temporary file behind.
    dest.write_bytes(b"stale")
    storage.get_file("run/files/blob.bin", dest)
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["blob.bin"]


def test_put_file_large_uses_multipart_on_s3(storage_uri, tmp_path, monkeypatch):
    # Lower the threshold instead of uploading a huge file: 5 MiB + 1 byte -> two parts (5 MiB is S3's floor).
    monkeypatch.setenv("BATCHGEN_S3_MULTIPART_THRESHOLD", str(1024 * 1024))
    monkeypatch.setenv("BATCHGEN_S3_PART_SIZE", str(5 * 1024 * 1024))
    storage = open_storage(storage_uri)
    data = os.urandom(5 * 1024 * 1024 + 1)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    storage.put_file("run/big.bin", source, if_absent=True)
    with pytest.raises(AlreadyExistsError):
        storage.put_file("run/big.bin", source, if_absent=True)
    assert storage.head("run/big.bin").size == len(data)
    assert storage.get_bytes("run/big.bin") == data
    if isinstance(storage, S3Storage):
        assert storage.head("run/big.bin").etag.endswith("-2"), "expected a two-part upload"


def test_delete_is_idempotent(storage):
    storage.put_bytes("run/errors/s/a.json", b"x")
    storage.delete("run/errors/s/a.json")
    storage.delete("run/errors/s/a.json")
    storage.delete("run/never/existed.json")
    assert storage.head("run/errors/s/a.json") is None
    assert list(storage.list("run/errors/")) == []
    # A deleted key can be conditionally created again.
    storage.put_bytes("run/errors/s/a.json", b"y", if_absent=True)
    assert storage.get_bytes("run/errors/s/a.json") == b"y"


def test_url_names_the_object(storage):
    storage.put_bytes("run/videos/s/a.mp4", b"video")
    url = storage.url("run/videos/s/a.mp4")
    assert url == storage.uri + "/run/videos/s/a.mp4"
    if isinstance(storage, LocalStorage):
        assert url.startswith("file:///")
        assert Path(urlsplit(url).path).read_bytes() == b"video"
    else:
        assert url.startswith("s3://")
    # The storage's own URI opens the same storage again.
    assert open_storage(storage.uri).get_bytes("run/videos/s/a.mp4") == b"video"


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "../escape", "a//b", "a/", "./a", "a\\b"])
def test_invalid_keys_are_rejected(storage, key):
    with pytest.raises(StorageError, match="key"):
        storage.put_bytes(key, b"x")
    with pytest.raises(StorageError, match="key"):
        storage.get_bytes(key)


# -- backend specifics ----------------------------------------------------------------------------------------


def test_local_leftover_temp_files_are_invisible(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put_bytes("run/meta/s/a.json", b"{}")
    # What a writer killed mid-put leaves behind: never listed, never mistaken for the object.
    (tmp_path / "run/meta/s" / f"{TEMP_PREFIX}b.json.123").write_bytes(b"partial")
    assert [o.key for o in storage.list("run/")] == ["run/meta/s/a.json"]
    assert storage.head("run/meta/s/b.json") is None
    storage.put_bytes("run/meta/s/b.json", b"whole", if_absent=True)
    assert storage.get_bytes("run/meta/s/b.json") == b"whole"


def test_local_conditional_replace_removes_its_lock_and_a_killed_holders(tmp_path):
    """Issue 19 item 4: the lock beside an object replaced with ``if_match`` goes with its holder; one left by a
    holder killed with SIGKILL is listed as a leftover until the next conditional writer takes and removes it."""
    storage = LocalStorage(tmp_path)
    etag = storage.put_bytes("run/index/index.parquet", b"one", if_absent=True)
    etag = storage.put_bytes("run/index/index.parquet", b"two", if_match=etag)
    assert os.listdir(tmp_path / "run/index") == ["index.parquet"]

    lock = tmp_path / "run/index" / f"{TEMP_PREFIX}lock-index.parquet"
    killed = subprocess.run(
        [sys.executable, "-c", "import os, sys; from pathlib import Path; from batchgen.storage.local import _exclusive\n"
         "with _exclusive(Path(sys.argv[1])): os.kill(os.getpid(), 9)", str(lock)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=60,
    )  # fmt: skip
    assert killed.returncode == -9 and lock.exists()
    assert storage.leftovers("run/") == [f"run/index/{lock.name}"]
    storage.put_bytes("run/index/index.parquet", b"three", if_match=etag)
    assert not lock.exists() and storage.leftovers("run/") == []


def test_local_conditional_replace_admits_one_writer_per_version(tmp_path):
    """Removing the lock file on release keeps replacements exclusive: of all writers that read one version, one
    replaces it; the others see ChangedError."""
    storage = LocalStorage(tmp_path)
    storage.put_bytes("run/index/index.parquet", b"0", if_absent=True)
    winners: list[str] = []

    def writer(index: int) -> None:
        for round_ in range(30):
            base = storage.head("run/index/index.parquet").etag
            try:
                storage.put_bytes("run/index/index.parquet", f"{index}-{round_}".encode(), if_match=base)
                winners.append(base)
            except ChangedError:
                pass

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(writer, range(8)))
    assert winners and len(winners) == len(set(winners))  # never two winners on one version
    assert os.listdir(tmp_path / "run/index") == ["index.parquet"]


def test_s3_lists_past_one_page(s3_bucket):
    # 1001 keys: exactly two list pages, fetched lazily.
    # The server runs in this process: arrange the keys in its backend directly (1001 HTTP puts cost seconds).
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    keys = [f"out/run/meta/shard-000000/{i:05d}.json" for i in range(1001)]
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for key in reversed(keys):
        backend.put_object(s3_bucket, key, b"{}")
    storage = open_storage(f"s3://{s3_bucket}/out")
    storage.exists("warm-up")  # pays the one-off bucket check
    before = storage.request_count
    listed = [o.key for o in storage.list("run/meta/shard-000000/")]
    assert listed == [k.removeprefix("out/") for k in keys]
    assert storage.request_count - before == 2


def test_s3_request_count_counts_wire_requests(s3_uri):
    storage = open_storage(s3_uri)
    assert storage.request_count == 0
    storage.put_bytes("a", b"1")  # bucket check + put
    assert storage.request_count == 2
    storage.get_bytes("a")
    storage.head("a")
    storage.delete("a")
    assert storage.request_count == 5


def test_s3_timestamps_are_parsed_without_dateutil_and_stay_timezone_aware(s3_uri):
    from datetime import datetime, timezone

    from botocore.utils import parse_timestamp

    from batchgen.storage.s3 import _parse_timestamp

    assert _parse_timestamp("2026-11-26T06:03:07.000Z") == datetime(2026, 11, 26, 6, 3, 7, tzinfo=timezone.utc)
    # HTTP-date headers and zone-less strings are not ISO 8601 with a zone: botocore's parser still reads them.
    assert _parse_timestamp("Thu, 26 Nov 2026 06:03:07 GMT") == datetime(2026, 11, 26, 6, 3, 7, tzinfo=timezone.utc)
    assert _parse_timestamp("2026-11-26T06:03:07") == parse_timestamp("2026-11-26T06:03:07")
    storage = open_storage(s3_uri)
    storage.put_bytes("stamped", b"1")
    listed = storage._client.list_objects_v2(Bucket=storage.bucket, Prefix=storage._root)["Contents"]
    assert all(obj["LastModified"].tzinfo is not None for obj in listed)


def test_s3_multipart_completion_is_conditional(s3_bucket, s3_client, tmp_path):
    # Another writer creates the object while our parts are uploading: completing must lose, not overwrite,
    # and our upload must be aborted.
    client = make_client()
    storage = S3Storage(s3_bucket, "out", client=client, multipart_threshold=1024, part_size=5 * 1024 * 1024)

    def rival_writes_first(**_):
        s3_client.put_object(Bucket=s3_bucket, Key="out/race.bin", Body=b"rival")

    client.meta.events.register_first("before-call.s3.CompleteMultipartUpload", rival_writes_first)
    source = tmp_path / "ours.bin"
    source.write_bytes(os.urandom(6 * 1024 * 1024))
    with pytest.raises(AlreadyExistsError, match="out/race.bin"):
        storage.put_file("race.bin", source, if_absent=True)
    assert s3_client.get_object(Bucket=s3_bucket, Key="out/race.bin")["Body"].read() == b"rival"
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


@pytest.mark.parametrize(
    ("uri", "backend", "expected_uri"),
    [
        ("s3://bucket/some/prefix/", S3Storage, "s3://bucket/some/prefix"),
        ("s3://bucket", S3Storage, "s3://bucket"),
        ("file:///tmp/batchgen-out", LocalStorage, "file:///tmp/batchgen-out"),
        ("file://localhost/tmp/a%20b", LocalStorage, "file:///tmp/a%20b"),
        ("/tmp/plain", LocalStorage, "file:///tmp/plain"),
    ],
)
def test_open_storage_picks_the_backend(uri, backend, expected_uri):
    storage = open_storage(uri)
    assert isinstance(storage, backend)
    assert storage.uri == expected_uri


def test_open_storage_relative_path_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_storage("out/dir").uri == (tmp_path / "out/dir").as_uri()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty"),
        ("gs://bucket/x", "unsupported storage scheme 'gs'"),
        ("http://host/x", "unsupported storage scheme 'http'"),
        ("file://otherhost/x", "local path"),
        ("s3:///no-bucket", "s3://bucket"),
    ],
)
def test_open_storage_rejects_bad_uris(uri, message):
    with pytest.raises(InputError, match=message):
        open_storage(uri)


def test_copy_creates_once_and_leaves_the_source(storage):
    storage.put_bytes("run1/videos/a.mp4", b"video bytes")
    storage.copy("run1/videos/a.mp4", "run2/videos/b.mp4")
    assert storage.get_bytes("run2/videos/b.mp4") == b"video bytes"
    with pytest.raises(AlreadyExistsError, match="run2/videos/b.mp4"):
        storage.copy("run1/videos/a.mp4", "run2/videos/b.mp4")
    with pytest.raises(NotFoundError, match="run1/videos/missing.mp4"):
        storage.copy("run1/videos/missing.mp4", "run2/videos/c.mp4")
    assert not storage.exists("run2/videos/c.mp4")
    storage.delete("run2/videos/b.mp4")  # removing the copy never touches the source
    assert storage.get_bytes("run1/videos/a.mp4") == b"video bytes"
