"""Cost estimates (batchgen.dataset.estimate) and rate/ETA (batchgen.dataset.eta): figures traced to their sources."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchgen.core import layout
from batchgen.core.config import RunConfig
from batchgen.core.errors import InputError
from batchgen.core.item import ShapeGroup
from batchgen.core.plan import RunPlan
from batchgen.core.progress import RunProgress, ShardProgress
from batchgen.dataset.estimate import H200, choose_profile, dit_flops, estimate_plan, own_timings, profile_from_bench
from batchgen.dataset.eta import commit_times, recent_rate, run_rate
from batchgen.storage import open_storage
from tests.test_index import sidecar

ROOT = Path(__file__).resolve().parents[1]
H200_RESULTS = ROOT / "bench" / "results" / "gpu-nvidia-h200.json"


def make_plan(shapes: list[tuple[int, int, int, int]], *, steps: int = 64, guidance: float = 4.5) -> RunPlan:
    config = RunConfig().with_overrides({"generation": {"num_inference_steps": steps, "guidance_scale": guidance}})
    groups = tuple(ShapeGroup(f, h, w, n, ("x",)) for f, h, w, n in shapes)
    rows = sum(n for *_, n in shapes)
    return RunPlan("r-0", "r", "m.parquet", "d", rows, config, 64, ["shard-000000"], "f", "0", "now", groups)


def test_the_built_in_h200_table_is_the_measured_benchmark():
    measured = profile_from_bench(H200_RESULTS)
    assert measured.forward_s == H200.forward_s
    assert (measured.decode_s, measured.decode_voxels, measured.text_encode_s) == (
        H200.decode_s,
        H200.decode_voxels,
        H200.text_encode_s,
    )
    assert "NVIDIA H200" in measured.source


def test_measured_shape_uses_the_figure_and_other_shapes_are_flop_scaled():
    plan = make_plan([(163, 480, 848, 10), (85, 480, 848, 4)])
    estimate = estimate_plan(plan, gpus=8, group_size=1)
    full, mid = estimate.shapes
    assert full.tokens == 44520 and full.forward_s == pytest.approx(3.7963)
    assert "measured at 44520 tokens" in full.source
    mid_tokens = 15 * 30 * 53
    assert mid.tokens == mid_tokens
    # 85 frames (15 latent frames) is nearest to the 49-frame point (14310 tokens).
    assert mid.forward_s == pytest.approx(0.7835 * dit_flops(mid_tokens) / dit_flops(14310))
    assert "FLOP-scaled from 14310 tokens" in mid.source
    assert estimate.forwards == 14 * 64 * 2
    assert estimate.forwards_source.startswith("run defaults: 128 per item; this plan predates per-row counts")
    assert full.item_wall_s == pytest.approx(128 * 3.7963 + 7.89 + 0.0224)
    expected_wall = (10 * full.item_wall_s + 4 * mid.item_wall_s) / 8
    assert estimate.wall_s == pytest.approx(expected_wall)
    assert estimate.gpu_hours == pytest.approx(8 * expected_wall / 3600)


def test_layout_gpu_type_and_guidance_change_the_figures():
    plan = make_plan([(163, 480, 848, 16)], guidance=1.0)
    one = estimate_plan(plan, gpus=16, group_size=1)
    assert one.forwards == 16 * 64  # no unconditional pass without guidance
    split = estimate_plan(plan, gpus=16, group_size=8)
    item = split.shapes[0]
    assert item.item_wall_s == pytest.approx(64 * 3.7963 / 8 + 7.89 + 0.0224)
    assert split.wall_s == pytest.approx(16 * item.item_wall_s / 2)
    a100 = estimate_plan(plan, gpus=16, group_size=1, profile=choose_profile(312.0, None))
    assert a100.shapes[0].forward_s == pytest.approx(3.7963 * 989.4 / 312.0)
    assert "989.4/312 TFLOP/s" in a100.shapes[0].source
    few = estimate_plan(make_plan([(163, 480, 848, 2)]), gpus=8, group_size=1)
    assert few.wall_s == pytest.approx(few.shapes[0].item_wall_s)  # an item never splits across groups


def test_bad_estimate_inputs_are_named(tmp_path):
    with pytest.raises(InputError, match="at least one group"):
        estimate_plan(make_plan([(163, 480, 848, 1)]), gpus=4, group_size=8)
    bad = tmp_path / "gpu-x.json"
    bad.write_text(json.dumps({"sections": {"transformer_forward": {}}}))
    with pytest.raises(InputError, match=r"gpu-x.json: not a bench/gpu.py results file.*'runs'"):
        profile_from_bench(bad)
    with pytest.raises(InputError, match="not found"):
        profile_from_bench(tmp_path / "missing.json")
    with pytest.raises(InputError, match="alternatives"):
        choose_profile(300.0, str(H200_RESULTS))
    with pytest.raises(InputError, match="must be positive"):
        choose_profile(0.0, None)


def _write_sidecar(storage, run_id: str, shard: str, item: str, *, denoise: float, world: int, mtime: float | None):
    sidecar = {
        "id": item, "num_frames": 163, "height": 480, "width": 848, "num_inference_steps": 64, "guidance_scale": 4.5,
        "timings": {"text_encode": 0.5, "denoise": denoise, "decode": 8.0, "encode_mp4": 1.0, "upload": 0.1},
        "parallel": {"world_size": world, "dp_size": 1},
    }  # fmt: skip
    key = layout.sidecar_key(run_id, shard, item)
    storage.put_bytes(key, json.dumps(sidecar).encode())
    if mtime is not None:
        os.utime(Path(storage.root) / key, (mtime, mtime))


def test_the_runs_own_sidecars_replace_the_table(tmp_path):
    storage = open_storage(str(tmp_path / "out"))
    for index in range(3):
        # 8 GPUs x 60 s of denoising = 480 GPU-s for 128 full-size forwards.
        _write_sidecar(storage, "r-0", "shard-000000", f"i{index}", denoise=60.0, world=8, mtime=None)
    storage.put_bytes(layout.sidecar_key("r-0", "shard-000000", "adopted"), b'{"timings": {}}')
    own = own_timings(storage, "r-0")
    assert own.items == 3
    assert own.denoise_s_per_pflop == pytest.approx(480 / (128 * dit_flops(44520) / 1e15))
    estimate = estimate_plan(make_plan([(163, 480, 848, 5)]), gpus=8, group_size=8, own=own)
    shape = estimate.shapes[0]
    assert shape.forward_s == pytest.approx(480 / 128)
    assert shape.item_wall_s == pytest.approx(60.0 + 8.0 + 0.5)
    assert shape.source == "run sidecars (3 items), FLOP-scaled"


def test_rate_and_eta_from_sidecar_times(tmp_path):
    assert recent_rate([100.0, 200.0, 900.0, 1000.0], 9, window_s=600, now=1000.0).items_per_hour == 36 * 2 / 6
    young = recent_rate([940.0, 970.0, 1000.0], 3, window_s=600, now=1000.0)
    assert young.span_s == 60 and young.eta_s == pytest.approx(60.0)
    stalled = recent_rate([1.0], 4, window_s=60, now=1000.0)
    assert stalled.eta_s is None and stalled.describe().endswith("ETA none (nothing committed in the window)")
    assert recent_rate([], 4).describe() == "no item committed yet; no ETA"

    storage = open_storage(str(tmp_path / "out"))
    now = time.time()
    for index, age in enumerate((3000, 500, 300, 100)):
        _write_sidecar(storage, "r-0", "shard-000000", f"i{index}", denoise=1.0, world=1, mtime=now - age)
    times = commit_times(storage, "r-0")
    assert sorted(times["shard-000000"]) == pytest.approx([now - 3000, now - 500, now - 300, now - 100], abs=1)
    # The progress a scan of this run would give: 10 planned items, the 4 above done.
    shard = ShardProgress("shard-000000", total=10, done_ids={f"i{index}" for index in range(4)})
    rate = run_rate(times, RunProgress("r-0", {"shard-000000": shard}), window_s=600)
    assert rate.committed == 3 and rate.pending == 6
    assert rate.eta_s == pytest.approx(6 / (3 / 600), rel=0.01)


def test_s3_listing_reports_modified_times(s3_uri):
    storage = open_storage(s3_uri)
    storage.put_bytes("a/b.json", b"{}")
    (info,) = list(storage.list("a/"))
    assert info.modified is not None and abs(info.modified - time.time()) < 120


def cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batchgen", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_plan_and_submit_dry_run_print_the_estimate(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "m.parquet"
    rows = {"prompt": ["a", "b", "c"], "num_frames": [163, 163, 49], "num_inference_steps": [64, 10, 64]}
    pq.write_table(pa.table({**rows, "guidance_scale": [4.5, 1.0, 4.5]}), manifest)
    out = str(tmp_path / "out")
    planned = cli("plan", str(manifest), "-o", out, "--gpus", "4")
    assert planned.returncode == 0, planned.stderr
    # Rows override steps and guidance: 128 + 10 (no unconditional pass) + 128.
    assert "3 items, 266 denoising forwards (per row: steps, x 2 with guidance)" in planned.stdout
    item_s = 69 * 3.7963 + 7.89 + 0.0224  # the 163-frame rows average 69 forwards
    assert f"163x480x848: 2 items, 44520 tokens, 3.8 s/forward, decode 7.89 s, {item_s:.4g} s/item" in planned.stdout
    assert "[H200 measured at 14310 tokens]" in planned.stdout
    assert "on 4 GPU(s) (4 group(s) of 1" in planned.stdout
    as_json = json.loads(cli("plan", str(manifest), "-o", out, "--json").stdout)
    assert as_json["estimate"]["denoising_forwards"] == 266

    dry = cli(
        "submit", str(manifest), "--output", out, "--dry-run", "--image", "x", "--nodes", "1", "--gpus-per-node", "4",
        "--num-heads", "24", "--ulysses-degree", "2", "--cfg-degree", "2", "--max-jobs", "2", "--gpu-tflops", "494.7", "--kubeconfig", str(tmp_path / "none"),
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "no job created (2 job(s) of 4 GPU(s) at once)" in dry.stdout
    assert "on 8 GPU(s) (2 group(s) of 4" in dry.stdout
    assert "7.59 s/forward" in dry.stdout  # 3.7963 x 989.4 / 494.7


def test_status_shows_rate_and_eta_per_run_and_per_job(kube, tmp_path):
    """``batchgen status`` (a real process) over a planned run with jobs in the API emulator: two shards, one job
    each, no operator (the jobs stay unfinished); shard 0 has three recent commits, shard 1 none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchgen.core.plan import load_shard_items
    from batchgen.core.plan import make_plan as plan_manifest
    from batchgen.launch.k8s.controller import RunController
    from batchgen.launch.k8s.names import job_name
    from batchgen.launch.k8s.settings import LaunchSettings

    manifest = tmp_path / "clips.parquet"
    pq.write_table(pa.table({"prompt": [f"a fox {i}" for i in range(8)]}), manifest)
    out = str(tmp_path / "out")
    storage = open_storage(out)
    plan = plan_manifest(manifest, RunConfig().with_overrides({"worker": {"shard_size": 4}}), storage)
    settings = LaunchSettings(output=out, namespace=kube.namespace, gpus_per_node=1)
    RunController(kube.backend(), storage, plan, settings, max_jobs=2).reconcile()
    now = time.time()
    planned = load_shard_items(storage, plan.run_id, "shard-000000")
    for item, age in zip(planned, (500, 300, 100), strict=False):
        # Whole sidecars: status reads them (the flagged count) where no index part exists yet.
        sidecar(storage, plan, "shard-000000", item, parallel={"world_size": 1, "dp_size": 1})
        key = Path(storage.root) / layout.sidecar_key(plan.run_id, "shard-000000", item.id)
        os.utime(key, (now - age, now - age))

    cluster = ["--namespace", kube.namespace, "--kubeconfig", str(kube.kubeconfig), "--rate-window", "10"]
    cluster += ["--launcher", "pytorchjob"]  # the jobs above are PyTorchJobs; auto would pick TrainJob here
    as_json = cli("status", out, *cluster, "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["rate"]["committed_in_window"] == 3 and data["pending"] == 5
    assert data["rate"]["eta_s"] == pytest.approx(5 / (3 / 500), rel=0.02)  # younger than the window: since 1st commit
    rates = {job["shards"]: job["rate"] for job in data["jobs"]}
    assert rates["shard-000000"]["committed_in_window"] == 3
    assert rates["shard-000000"]["eta_s"] == pytest.approx(1 / (3 / 500), rel=0.02)
    assert rates["shard-000001"]["eta_s"] is None  # nothing committed there: no ETA rather than a made-up one
    text = cli("status", out, *cluster)
    assert re.search(r"^rate\s+21\.\d items/h over the last 8\.\d min; ETA 0:1\d:\d\d$", text.stdout, re.M), text.stdout
    assert f"{job_name(plan.run_id, 1, 1, 1)}: no item committed yet; no ETA" in text.stdout
