"""bench/gpu.py is run once per lent GPU with no chance to debug there: its every section runs here first, on CPU
with small shapes, through the same script."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_sections_run_on_cpu_in_tiny_mode(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    sections = results["sections"]
    assert set(sections) == {
        "matmul_peak",
        "native_attention",
        "transformer_forward",
        "t5_encoder",
        "vae_decode",
        "pipeline",
        "projection",
    }

    native = sections["native_attention"]
    assert native["kernels"] and all(k["max_abs_diff_vs_fp32_reference"] < 1e-4 for k in native["kernels"].values())
    assert all(k["max_abs_diff"] < 1e-4 for k in native["forward_vs_stock"].values())

    runs = [r for r in sections["transformer_forward"]["runs"] if "seconds_per_forward" in r]
    assert {r["frames"] for r in runs} == {13, 19} and all(r["seconds_per_forward"] > 0 for r in runs)

    vae = sections["vae_decode"]
    assert vae["frames_out"] == vae["frames_expected"] == 19

    pipeline = sections["pipeline"]
    assert pipeline["frames_out"] == 19 and pipeline["seconds_per_denoising_step"] > 0
    assert set(pipeline["timings"]) >= {"text_encode", "denoise", "denoise_loop", "decode"}
    assert "19_frames" in sections["projection"]
