"""Wan transformer forward on a lent GPU: the 14B DiT with random bf16 weights at 81 frames, 480x832 and 720x1280.

    python bench/wan_gpu.py                       # writes bench/results/wan-gpu-<device>.json
    python bench/wan_gpu.py --tiny --out /tmp/x   # CPU smoke test with a small Wan (what the tests run)

Downloads nothing: ``WanTransformer3DModel`` is built on the meta device at the size of Wan-AI/Wan2.1-T2V-14B
(``batchgen.dataset.estimate.WAN_14B_CONFIG``; Wan 2.2 A14B's experts have the same shape) and filled with random weights
on the GPU. The text is 512 random UMT5-width tokens, as WanPipeline zero-pads every prompt to 512. Seconds are
medians of timed repeats after one warm-up, per SDPA kernel; FLOPs come from ``batchgen.dataset.estimate``'s Wan model
(per visual token the self- and cross-attention projections and the FFN, plus self- and cross-attention scores),
and MFU is quoted against the datasheet bf16 peak and a matmul rate measured in the same run. The results file is
rewritten after every shape, so a run cut short by the device lease keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu import DATASHEET_BF16_TFLOPS, Timer, peak_memory_gib, reset_peak, sdpa_kernels  # noqa: E402

from batchgen.dataset.estimate import WAN_14B_CONFIG, wan_flops_from_config  # noqa: E402
from batchgen.models import WAN  # noqa: E402

FULL = {"config": WAN_14B_CONFIG, "frames": 81, "shapes": [(480, 832), (720, 1280)]}
TINY = {
    "config": {**WAN_14B_CONFIG, "num_attention_heads": 4, "attention_head_dim": 24, "num_layers": 2, "ffn_dim": 192,
               "text_dim": 64},
    "frames": 9,
    "shapes": [(64, 64), (96, 128)],
}  # fmt: skip


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype):
    """The DiT materialised once, in ``dtype`` on ``device``, with batchgen's seeded random fill."""
    from diffusers import WanTransformer3DModel

    from batchgen.models.common.tiny import randomize_parameters

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    model.to_empty(device=device)
    randomize_parameters(model, torch.Generator(device).manual_seed(0))
    # diffusers keeps these in fp32 when it loads a checkpoint (``_keep_in_fp32_modules``); so does this build.
    keep = tuple(model._keep_in_fp32_modules or ())
    for name, module in model.named_modules():
        if not any(part in keep for part in name.split(".")):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    # The RoPE tables are buffers computed at construction; to_empty left them uninitialised.
    model.rope.__init__(model.config.attention_head_dim, model.config.patch_size, model.config.rope_max_seq_len)
    model.rope.to(device)
    return model.eval().requires_grad_(False)


def forward_inputs(config: dict, frames: int, height: int, width: int, device, dtype) -> dict:
    gen = torch.Generator("cpu").manual_seed(0)
    latent = (1, config.get("in_channels", 16), WAN.latent_frames(frames), height // 8, width // 8)
    return {
        "hidden_states": torch.randn(latent, generator=gen).to(device, dtype),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": torch.randn(1, WAN.text_length, config["text_dim"], generator=gen).to(device, dtype),
        "return_dict": False,
    }


def matmul_tflops(timer: Timer, device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / statistics.median(timer.measure(lambda: a @ b, warmup=3, repeats=10)) / 1e12


def measure_shape(model, setup: dict, height: int, width: int, ctx: dict) -> list[dict]:
    from torch.nn.attention import sdpa_kernel

    frames, config = setup["frames"], setup["config"]
    tokens = WAN.visual_tokens(frames, height, width)
    flops = wan_flops_from_config(config).forward(tokens)
    inputs = forward_inputs(config, frames, height, width, ctx["device"], ctx["dtype"])
    runs = []
    for kernel, backend in sdpa_kernels(ctx["device"]).items():
        run = {"frames": frames, "height": height, "width": width, "visual_tokens": tokens, "kernel": kernel}
        reset_peak(ctx["device"])
        try:
            with torch.no_grad(), sdpa_kernel([backend]):
                times = ctx["timer"].measure(lambda: model(**inputs), warmup=1, repeats=ctx["repeats"])
        except Exception as e:  # a kernel that refuses this shape or GPU
            runs.append({**run, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        median = statistics.median(times)
        run.update(
            seconds_per_forward=round(median, 4),
            all_seconds=[round(t, 4) for t in times],
            flop_per_forward=flops,
            pflop_per_forward=round(flops / 1e15, 4),
            achieved_tflops=round(flops / median / 1e12, 1),
            peak_memory_gib=peak_memory_gib(ctx["device"]),
            mfu_vs_measured_matmul=round(flops / median / 1e12 / ctx["matmul_tflops"], 4),
        )
        if ctx["datasheet"]:
            run["mfu_vs_datasheet"] = round(flops / median / 1e12 / ctx["datasheet"], 4)
        print(f"   {frames} frames {height}x{width} ({tokens} tokens) {kernel}: {median:.3f} s/forward", flush=True)
        runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small Wan on CPU (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="results file (default bench/results/wan-gpu-<device>.json)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setup = TINY if args.tiny else FULL
    timer = Timer(device)
    ctx = {
        "device": device, "dtype": dtype, "timer": timer, "repeats": args.repeats,
        "matmul_tflops": matmul_tflops(timer, device, dtype),
        "datasheet": next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None) if device.type == "cuda" else None,
    }  # fmt: skip
    out = Path(args.out or ROOT / "bench" / "results" / f"wan-gpu-{name.lower().replace(' ', '-')}.json")
    started = time.perf_counter()
    model = build_transformer(setup["config"], device, dtype)
    results = {
        "device": name, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "config": setup["config"], "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.perf_counter() - started, 2),
        "measured_matmul_tflops": round(ctx["matmul_tflops"], 3), "datasheet_bf16_tflops": ctx["datasheet"],
        "runs": [],
    }  # fmt: skip
    print(f"Wan DiT {results['parameters'] / 1e9:.2f} B parameters on {name} ({results['dtype']})", flush=True)
    for height, width in setup["shapes"]:
        results["runs"] += measure_shape(model, setup, height, width, ctx)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    measured = {(r["height"], r["width"]) for r in results["runs"] if "seconds_per_forward" in r}
    return 0 if measured == set(setup["shapes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
