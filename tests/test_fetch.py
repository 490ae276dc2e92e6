"""The weights init container (`python -m batchgen.launch.k8s.fetch SRC DEST`) against a real S3 endpoint."""

import os
import subprocess
import sys
import time

import pytest

from batchgen.core.errors import EXIT_BAD_INPUT, EXIT_STORAGE, EXIT_TRANSIENT
from batchgen.models.common.weights import fingerprint_model_dir
from batchgen.storage import open_storage
from batchgen.storage.local import TEMP_PREFIX
from tests.fixtures.faultproxy import FaultProxy


def _upload_tree(local_dir, uri):
    storage = open_storage(uri)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    for path in files:
        storage.put_file(path.relative_to(local_dir).as_posix(), path)
    return files


def _run_fetch(src, dest):
    return subprocess.run(
        [sys.executable, "-m", "batchgen.launch.k8s.fetch", src, str(dest)], capture_output=True, text=True, timeout=120
    )


def test_fetch_copies_the_model_then_skips_what_is_present(tiny_model_dir, s3_uri, tmp_path):
    files = _upload_tree(tiny_model_dir, s3_uri + "/mochi")
    dest = tmp_path / "models"

    first = _run_fetch(s3_uri + "/mochi", dest)
    assert first.returncode == 0, first.stderr
    assert f"{len(files)} file(s) fetched, 0 already present" in first.stderr
    for path in files:
        assert (dest / path.relative_to(tiny_model_dir)).read_bytes() == path.read_bytes()
    assert fingerprint_model_dir(dest) == fingerprint_model_dir(tiny_model_dir)

    # A restarted init container: one file lost mid-download is fetched again, the rest are kept.
    victim = dest / "transformer" / "config.json"
    victim.write_bytes(victim.read_bytes()[:10])
    second = _run_fetch(s3_uri + "/mochi", dest)
    assert second.returncode == 0, second.stderr
    assert f"1 file(s) fetched, {len(files) - 1} already present" in second.stderr
    assert victim.read_bytes() == (tiny_model_dir / "transformer" / "config.json").read_bytes()


def test_fetch_of_an_empty_source_fails_with_the_storage_exit_code(s3_uri, tmp_path):
    result = _run_fetch(s3_uri + "/nothing-here", tmp_path / "models")
    assert result.returncode == 3
    assert "no model files found" in result.stderr


def test_fetch_refuses_more_concurrent_ranges_than_pooled_connections(s3_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_S3_DOWNLOAD_CONCURRENCY", "33")
    result = _run_fetch(s3_uri + "/model", tmp_path / "models")
    assert result.returncode == EXIT_BAD_INPUT
    assert "BATCHGEN_S3_DOWNLOAD_CONCURRENCY" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "models").exists()


# -- large files: ranged downloads through a fault proxy --------------------------------------------------------

PART = 5 * 1024 * 1024  # S3's smallest part: an 11 MiB file is three ranges
WEIGHTS = "weights/model-00001-of-00001.safetensors"


@pytest.fixture
def ranged(s3_server, s3_uri, tmp_path, monkeypatch):
    """A model of a config and an 11 MiB weight file, fetched through a fault proxy in three ranged GETs."""
    with FaultProxy(s3_server, 0.0, seed=20) as proxy:
        for name, value in (
            ("AWS_ENDPOINT_URL", proxy.url),
            ("BATCHGEN_S3_MULTIPART_THRESHOLD", str(PART)),
            ("BATCHGEN_S3_PART_SIZE", str(PART)),
            ("BATCHGEN_S3_MAX_ATTEMPTS", "3"),
            ("BATCHGEN_S3_BACKOFF_S", "0.002"),
            ("BATCHGEN_S3_BACKOFF_MAX_S", "0.02"),
        ):
            monkeypatch.setenv(name, value)
        source = tmp_path / "source"
        (source / "weights").mkdir(parents=True)
        (source / "config.json").write_text('{"layers": 2}')
        (source / WEIGHTS).write_bytes(os.urandom(2 * PART + 1024 * 1024))
        _upload_tree(source, s3_uri + "/model")
        proxy.events.clear()
        yield proxy, s3_uri + "/model", source


def _weight_requests(proxy) -> list[str]:
    return [method for method, path, _, _ in proxy.events if path.endswith(WEIGHTS)]


def _leftovers(dest) -> list[str]:
    return [p.name for p in dest.rglob(f"{TEMP_PREFIX}*")]


def test_a_large_file_is_fetched_in_ranges_whose_bytes_equal_the_source(ranged, tmp_path):
    proxy, uri, source = ranged
    dest = tmp_path / "models"
    result = _run_fetch(uri, dest)
    assert result.returncode == 0, result.stderr
    assert "2 file(s) fetched, 0 already present" in result.stderr
    assert (dest / WEIGHTS).read_bytes() == (source / WEIGHTS).read_bytes()
    # A whole-object GET whose answer gives the size and ETag (its body dropped), then one GET per 5 MiB range.
    assert _weight_requests(proxy) == ["GET"] * 4
    assert _leftovers(dest) == []


@pytest.mark.parametrize(("fault", "exit_code", "hits"), [("404", EXIT_STORAGE, 1), ("500", EXIT_TRANSIENT, 3)])
def test_a_failed_range_leaves_no_file_then_a_rerun_completes(ranged, tmp_path, s3_credentials, fault, exit_code, hits):
    proxy, uri, source = ranged
    dest = tmp_path / "models"
    # The second range fails; a 500 every time it is asked for (3 attempts of the whole file), a 404 once.
    proxy.inject("GET", WEIGHTS, fault, times=hits, range_contains=f"bytes={PART}-")
    failed = _run_fetch(uri, dest)
    assert failed.returncode == exit_code, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert WEIGHTS in last, last
    assert s3_credentials["AWS_SECRET_ACCESS_KEY"] not in failed.stderr
    assert proxy.counts[fault] == hits
    assert not (dest / WEIGHTS).exists()
    assert _leftovers(dest) == []

    rerun = _run_fetch(uri, dest)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 file(s) fetched, 1 already present" in rerun.stderr
    assert (dest / WEIGHTS).read_bytes() == (source / WEIGHTS).read_bytes()


def test_a_fetch_killed_mid_download_leaves_no_file_and_the_rerun_cleans_up_and_completes(ranged, tmp_path):
    proxy, uri, source = ranged
    dest = tmp_path / "models"
    # The second range trickles in, so the process is surely mid-file when it is killed.
    proxy.inject("GET", WEIGHTS, "trickle", range_contains=f"bytes={PART}-")
    fetch = subprocess.Popen([sys.executable, "-m", "batchgen.launch.k8s.fetch", uri, str(dest)])
    try:
        deadline = time.monotonic() + 60
        while proxy.counts["trickle"] == 0 or not _leftovers(dest):
            assert time.monotonic() < deadline, "the download never started"
            assert fetch.poll() is None, "fetch ended before it was killed"
            time.sleep(0.05)
    finally:
        fetch.kill()
        fetch.wait()
    assert not (dest / WEIGHTS).exists()
    assert len(_leftovers(dest)) == 1

    rerun = _run_fetch(uri, dest)
    assert rerun.returncode == 0, rerun.stderr
    assert "removed 1 partial download(s)" in rerun.stderr
    assert (dest / WEIGHTS).read_bytes() == (source / WEIGHTS).read_bytes()
    assert _leftovers(dest) == []
