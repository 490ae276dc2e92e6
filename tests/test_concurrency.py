"""Two worker processes given the same shard at the same time: each item is committed exactly once (the
conditional creates of video and sidecar decide every race), on S3 and on the folder backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from batchgen.core.plan import make_plan
from batchgen.storage import open_storage
from tests._runs import assert_exactly_once, tiny_run_config, write_manifest
from tests.fixtures.faultproxy import FaultProxy

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["s3", "folder"])
def test_two_workers_on_one_shard(backend, request, tmp_path, tiny_model_dir, tiny_config):
    uri = request.getfixturevalue("s3_uri") if backend == "s3" else str(tmp_path / "out")
    storage = open_storage(uri)
    plan = make_plan(write_manifest(tmp_path / "p.parquet", 4), tiny_run_config(tiny_config, shard_size=4), storage)
    errors = _race(uri, plan.run_id, tiny_model_dir, {})
    _assert_each_item_once(storage, plan, errors)


def test_two_workers_racing_under_409_conflicts(s3_server, s3_uri, tmp_path, tiny_model_dir, tiny_config):
    """As on real S3, a conditional write racing another is sometimes answered 409 ConditionalRequestConflict
    (moto never does): a quarter of the workers' conditional writes get one, and each item is still committed
    exactly once. The first two sidecar creates are always answered 409: how many conditional writes the race
    makes varies from run to run, so the draw alone may leave too few conflicts to prove anything."""
    storage = open_storage(s3_uri)
    plan = make_plan(write_manifest(tmp_path / "p.parquet", 4), tiny_run_config(tiny_config, shard_size=4), storage)
    with FaultProxy(s3_server, 0.0, seed=409, conflict_rate=0.25) as proxy:
        proxy.inject("PUT", f"/{plan.run_id}/meta/", "409_conflict", times=2)
        env = {"AWS_ENDPOINT_URL": proxy.url, "BATCHGEN_S3_BACKOFF_S": "0.01", "BATCHGEN_S3_BACKOFF_MAX_S": "0.1"}
        errors = _race(s3_uri, plan.run_id, tiny_model_dir, env)
    assert proxy.counts["409_conflict"] >= 2, proxy.counts
    _assert_each_item_once(storage, plan, errors)


def _race(uri: str, run_id: str, model_dir, env: dict[str, str]) -> list[str]:
    """Two worker processes on shard 0 at once; their stderr."""
    command = [
        sys.executable, "-m", "batchgen", "worker", "--output", uri, "--run-id", run_id, "--shards", "0",
        "--model-dir", str(model_dir),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env}
    workers = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [w.communicate(timeout=240)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    return errors


def _assert_each_item_once(storage, plan, errors: list[str]) -> None:

    sidecars = assert_exactly_once(storage, plan)
    assert len(sidecars) == 4
    # Whoever lost a race adopted the winner's bytes instead of writing a second copy, so the sidecar always
    # describes the stored video (checked above); no item is described twice.
    assert len({s["video_key"] for s in sidecars.values()}) == 4
    if all("0 already done" in e for e in errors):
        # Both scans saw every item pending, so both tried every item: each sidecar race has exactly one loser.
        assert sum(e.count("already committed by another worker") for e in errors) == 4
