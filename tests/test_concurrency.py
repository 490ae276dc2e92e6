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

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["s3", "folder"])
def test_two_workers_on_one_shard(backend, request, tmp_path, tiny_model_dir, tiny_config):
    uri = request.getfixturevalue("s3_uri") if backend == "s3" else str(tmp_path / "out")
    storage = open_storage(uri)
    plan = make_plan(write_manifest(tmp_path / "p.parquet", 4), tiny_run_config(tiny_config, shard_size=4), storage)
    command = [
        sys.executable, "-m", "batchgen", "worker", "--output", uri, "--run-id", plan.run_id, "--shards", "0",
        "--model-dir", str(tiny_model_dir),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    workers = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [w.communicate(timeout=240)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors

    sidecars = assert_exactly_once(storage, plan)
    assert len(sidecars) == 4
    # Whoever lost a race adopted the winner's bytes instead of writing a second copy, so the sidecar always
    # describes the stored video (checked above); no item is described twice.
    assert len({s["video_key"] for s in sidecars.values()}) == 4
    if all("0 already done" in e for e in errors):
        # Both scans saw every item pending, so both tried every item: each sidecar race has exactly one loser.
        assert sum(e.count("already committed by another worker") for e in errors) == 4
