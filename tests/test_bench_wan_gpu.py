"""bench/wan_gpu.py runs only where a GPU is lent, with no chance to debug there: its build and every step run here
on CPU with a small Wan first."""

import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import wan_gpu  # noqa: E402


def test_meta_built_transformer_equals_a_normally_constructed_one():
    # to_empty leaves buffers uninitialised: the RoPE tables must be rebuilt, or every forward would be garbage.
    from diffusers import WanTransformer3DModel

    config = wan_gpu.TINY["config"]
    built = wan_gpu.build_transformer(config, torch.device("cpu"), torch.float32)
    reference = WanTransformer3DModel(**config).eval()
    reference.load_state_dict(built.state_dict())
    inputs = wan_gpu.forward_inputs(config, 9, 64, 64, "cpu", torch.float32)
    with torch.no_grad():
        got, want = built(**inputs)[0], reference(**inputs)[0]
    assert torch.isfinite(got).all() and got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tiny_run_writes_every_shape_with_flops_and_mfu(tmp_path):
    out = tmp_path / "wan.json"
    assert wan_gpu.main(["--tiny", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    runs = results["runs"]
    assert [(r["height"], r["width"]) for r in runs] == wan_gpu.TINY["shapes"]
    assert [r["visual_tokens"] for r in runs] == [3 * 4 * 4, 3 * 6 * 8]  # 9 frames: 3 latent frames, 16 px cells
    for run in runs:
        flops = wan_gpu.wan_flops_from_config(wan_gpu.TINY["config"]).forward(run["visual_tokens"])
        assert run["flop_per_forward"] == flops and run["seconds_per_forward"] > 0
        achieved = flops / statistics.median(run["all_seconds"]) / 1e12
        assert 0 < run["mfu_vs_measured_matmul"] <= 1
        assert (
            abs(run["mfu_vs_measured_matmul"] * results["measured_matmul_tflops"] - achieved) < 0.01 * achieved + 1e-3
        )
