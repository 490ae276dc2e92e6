"""bench/gpu_device.sh is the one call a lent GPU gets, with no chance to debug there: the same command runs here
with --tiny (every section on CPU with small shapes) and its one results file must hold every section."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_device import SECTIONS  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-device")
    out, copies = tmp / "gpu-device-cpu.json", tmp / "out"
    copies.mkdir()
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(copies),
        # The compiled section compiles on CPU: keep inductor's cache out of the home directory.
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_device.sh"), "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    return proc, out, copies


@pytest.mark.slow
def test_tiny_run_writes_one_results_file_with_every_section(tiny_run):
    proc, out, copies = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"wrote {out}"
    results = json.loads(out.read_text())
    assert results["errors"] == {} and set(results["sections"]) == set(SECTIONS)
    assert [p.name for p in copies.iterdir()] == [out.name] and json.loads((copies / out.name).read_text()) == results
    assert results["date"] and results["device"].startswith("cpu") and results["environment"]["diffusers"]


@pytest.mark.slow
def test_every_attention_path_equals_fp32_and_auto_picks_a_timed_one(tiny_run):
    sections = json.loads(tiny_run[1].read_text())["sections"]
    paths = sections["attention_paths"]
    runs = paths["runs"]
    assert {r["frames"] for r in runs} == {13, 19}
    assert {r["masked"] for r in runs} == {True, False}
    # fp32 on CPU: every candidate equals the masked math reference within 1e-5.
    assert all(r["max_abs_diff_vs_fp32"] <= 1e-5 for r in runs)
    for frames, auto in paths["auto"].items():
        timed = {r["candidate"]: r for r in runs if r["frames"] == int(frames) and "seconds" in r}
        assert auto["measured"] and set(auto["timings_ms"]) == set(timed)
        assert f"{auto['path']}/{auto['kernel']}" == min(auto["timings_ms"], key=auto["timings_ms"].get)
    for run in sections["attention_forward"]["runs"]:
        assert run["joint"]["seconds_per_forward"] > 0 and run["per-prompt"]["seconds_per_forward"] > 0
        assert (run["joint"]["path"], run["per-prompt"]["path"]) == ("joint", "per-prompt")
        assert run["auto"]["measured"] and run["auto_measure_share_of_item"] > 0
        assert run["max_abs_diff_joint_vs_per_prompt"] <= 1e-5 * max(1.0, run["output_abs_max"])


@pytest.mark.slow
def test_fp8_wan_pipeline_and_compiled_sections_hold_their_figures(tiny_run):
    sections = json.loads(tiny_run[1].read_text())["sections"]
    assert sections["fp8_linear"]["gate"]["passed"] is False  # fp32 on CPU: no FP8 path can pass
    wan = [r for r in sections["wan_forward"]["runs"] if "seconds_per_forward" in r]
    assert wan and all(r["frames"] == 9 for r in wan)
    auto = sections["pipeline_auto"]
    assert auto["offload"] == "auto" and auto["steps"] == 3 and auto["frames_out"] == 19
    (compiled,) = sections["compiled_forward"]["runs"]
    assert compiled["layers"] == 2 and compiled["new_graphs"] > 0
    assert compiled["max_abs_diff_vs_eager"] <= 1e-4 * max(1.0, compiled["eager_abs_max"])


def test_without_diffusers_or_wheels_the_script_says_what_to_run(tmp_path):
    # A bare interpreter stands in for the device's python before the wheels travel.
    bare = tmp_path / "python3"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S -I "$@"\n')
    bare.chmod(0o755)
    script = tmp_path / "bench" / "gpu_device.sh"
    script.parent.mkdir()
    script.write_text((ROOT / "bench" / "gpu_device.sh").read_text())
    proc = subprocess.run(
        ["bash", str(script), "--tiny"], capture_output=True, text=True, env={**os.environ, "PYTHON": str(bare)}
    )
    assert proc.returncode == 2
    assert "run 'make device-wheels'" in proc.stderr
