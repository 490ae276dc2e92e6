"""Crash safety and storage faults: a worker process SIGKILLed (a real kill -9) at each point of the commit
protocol, then the same ``batchgen run`` again; and a whole run through a proxy that fails ~20% of S3 requests.
Afterwards every item exists exactly once, every sidecar's sha256 matches its video, nothing is orphaned."""

from __future__ import annotations

import json
import signal

import pytest

from batchgen.core import layout
from batchgen.core.plan import load_plan
from batchgen.storage import open_storage
from tests._runs import SMALL_SHAPE, assert_exactly_once, keys_under, run_cli, tiny_run_args, write_manifest
from tests.fixtures.faultproxy import FaultProxy
from tests.test_e2e import run_id_of

pytestmark = pytest.mark.slow

SMALL = [arg for key, value in SMALL_SHAPE.items() for arg in (f"--{key.replace('_', '-')}", str(value))]

CRASHES = [
    # (fault point, target, what storage holds right after the kill). The run-level marker only needs every
    # item done, so a crash while writing shard stats still leaves a complete run: stats are a cache, progress
    # comes from the sidecars, so the rerun has nothing to do and writes no stats.
    ("generate", "item-1", {"done": {"item-0"}, "orphans": set(), "stats": False, "success": False, "rerun": True}),
    (
        "after_video",
        "item-1",
        {"done": {"item-0"}, "orphans": {"item-1"}, "stats": False, "success": False, "rerun": True},
    ),
    (
        "during_stats",
        "shard-000000",
        {"done": {"item-0", "item-1", "item-2"}, "orphans": set(), "stats": False, "success": True, "rerun": False},
    ),
]


@pytest.mark.parametrize("point,target,after_kill", CRASHES, ids=[c[0] for c in CRASHES])
def test_kill_9_then_rerun(point, target, after_kill, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "prompts.parquet", 3)
    args = ["run", str(manifest), "--output", str(out), *tiny_run_args(tiny_model_dir), *SMALL, "--shard-size", "3"]

    crashed = run_cli(*args, env={"BATCHGEN_FAULT": f"{point}:{target}"})
    assert crashed.returncode == 128 + signal.SIGKILL, crashed.stderr[-3000:]
    assert "killed by signal 9" in crashed.stderr
    storage = open_storage(str(out))
    run_id = run_id_of(crashed.stdout)
    shard = "shard-000000"
    metas = {layout.item_id_from_key(k) for k in keys_under(storage, layout.sidecars_prefix(run_id, shard))}
    videos = {layout.item_id_from_key(k) for k in keys_under(storage, layout.videos_prefix(run_id, shard))}
    assert metas == after_kill["done"]
    assert videos - metas == after_kill["orphans"]
    assert storage.exists(layout.stats_key(run_id, shard)) == after_kill["stats"]
    assert storage.exists(layout.success_key(run_id)) == after_kill["success"]

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    sidecars = assert_exactly_once(storage, load_plan(storage, run_id))
    assert {i for i, s in sidecars.items() if s["adopted"]} == after_kill["orphans"]
    assert storage.exists(layout.stats_key(run_id, shard)) == after_kill["rerun"]
    if after_kill["rerun"]:
        stats = json.loads(storage.get_bytes(layout.stats_key(run_id, shard)))
        assert (stats["done"], stats["failed"], stats["adopted"]) == (3, 0, len(after_kill["orphans"]))
    else:
        assert "Nothing to generate" in rerun.stdout + rerun.stderr
    assert storage.exists(layout.success_key(run_id))


def test_run_through_failing_s3_proxy(s3_server, s3_uri, tmp_path, tiny_model_dir):
    manifest = write_manifest(tmp_path / "prompts.parquet", 4)
    with FaultProxy(s3_server, failure_rate=0.2, seed=20) as proxy:
        result = run_cli(
            "run", str(manifest), "--output", s3_uri, *tiny_run_args(tiny_model_dir), *SMALL, "--shard-size", "2",
            env={"AWS_ENDPOINT_URL": proxy.url},
        )  # fmt: skip
        injected = proxy.faults_injected
    assert result.returncode == 0, result.stderr[-3000:]
    assert injected >= 5, proxy.counts
    storage = open_storage(s3_uri)  # straight to the server, not through the proxy
    run_id = run_id_of(result.stdout)
    assert_exactly_once(storage, load_plan(storage, run_id))
    assert storage.exists(layout.success_key(run_id))
