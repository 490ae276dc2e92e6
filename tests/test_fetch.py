"""The weights init container (`python -m batchgen.launch.k8s.fetch SRC DEST`) against a real S3 endpoint."""

import subprocess
import sys

from batchgen.models.common.weights import fingerprint_model_dir
from batchgen.storage import open_storage


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
