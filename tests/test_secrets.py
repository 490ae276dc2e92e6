"""Credentials in the environment never reach a log line, a sidecar, the plan, stats or the index, including
with debug logging and on the access-denied path."""

from __future__ import annotations

import pytest

from batchgen.storage import open_storage
from tests._runs import SMALL_SHAPE, keys_under, run_cli, tiny_run_args, write_manifest
from tests.fixtures.faultproxy import FaultProxy

pytestmark = pytest.mark.slow

SMALL = [arg for key, value in SMALL_SHAPE.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secret_key_appears_nowhere(
    log_format, s3_server, s3_uri, s3_bucket, s3_credentials, tmp_path, tiny_model_dir, monkeypatch
):
    secret = s3_credentials["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("BATCHGEN_LOG_FORMAT", log_format)  # the CLI and its worker processes inherit it
    manifest = write_manifest(tmp_path / "prompts.parquet", 2)
    outputs = []
    run = run_cli(
        "-vv", "run", str(manifest), "--output", s3_uri, *tiny_run_args(tiny_model_dir), *SMALL, "--workers", "1"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    outputs.append(run)
    outputs.append(run_cli("-vv", "status", s3_uri))
    outputs.append(run_cli("-vv", "index", s3_uri))
    with FaultProxy(s3_server, failure_rate=0.0, seed=0, deny_path_prefix=f"/{s3_bucket}/") as proxy:
        denied = run_cli("-vv", "status", s3_uri, env={"AWS_ENDPOINT_URL": proxy.url})
    assert denied.returncode == 3, denied.stderr[-2000:]  # permanent storage error, fails fast
    assert "AccessDenied" in denied.stderr or "access denied" in denied.stderr.lower()
    outputs.append(denied)

    for result in outputs:
        assert secret not in result.stdout and secret not in result.stderr
    assert len(outputs[0].stderr) > 1000  # debug logging really was on: there was something to leak into
    first_line = outputs[0].stderr.splitlines()[0]
    assert first_line.startswith("{") == (log_format == "json"), first_line  # the format really was in force

    storage = open_storage(s3_uri)
    objects = keys_under(storage, "")
    assert any(k.endswith(".mp4") for k in objects) and any("/meta/" in k for k in objects)
    for key in objects:
        assert secret.encode() not in storage.get_bytes(key), key
