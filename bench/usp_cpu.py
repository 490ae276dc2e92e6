"""CPU benchmark of the native USP backend on the tiny Mochi transformer (gloo, one thread per process).

For 1 to 4 processes and each degree layout: median seconds per denoising step (the stock MochiPipeline
driving the parallelized transformer; step 0 is warm-up and excluded) and the bytes each rank sends per step,
counted in our collectives, next to the analytic formula. Padded layouts run a shape whose token count the degree
does not divide: the padding travels in the all-to-alls, ring hops and output gather, and the formula counts it.
Writes bench/results/usp-cpu.json, prints a table.

    python bench/usp_cpu.py [--steps 6]

On this tiny model communication and Python overhead dominate, and more processes than cores oversubscribe the
machine: these numbers check the bookkeeping and the relative cost of layouts, not GPU speed-ups.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# 25 frames at 128x128: T = 5 latent frames of 8 x 8 patches = 320 visual tokens; 16 text tokens (12 / 4 valid).
SHAPE = {"num_frames": 25, "height": 128, "width": 128}
# 25 frames at 112x112: 5 x 7 x 7 = 245 visual tokens, which 2, 3 and 4 do not divide (padded to 246, 246, 248).
PADDED_SHAPE = {"num_frames": 25, "height": 112, "width": 112}
LAYOUTS = [
    # (world, degrees, shape)
    (1, {}, SHAPE),
    (2, {"ulysses": 2}, SHAPE),
    (2, {"ring": 2}, SHAPE),
    (2, {"cfg": 2}, SHAPE),
    (4, {"ulysses": 4}, SHAPE),
    (4, {"ring": 4}, SHAPE),
    (4, {"ulysses": 2, "ring": 2}, SHAPE),
    (4, {"cfg": 2, "ulysses": 2}, SHAPE),
    (1, {}, PADDED_SHAPE),
    (2, {"ulysses": 2}, PADDED_SHAPE),
    (3, {"ring": 3}, PADDED_SHAPE),
    (4, {"ulysses": 4}, PADDED_SHAPE),
    (4, {"ulysses": 2, "ring": 2}, PADDED_SHAPE),
    (4, {"cfg": 2, "ulysses": 2}, PADDED_SHAPE),
]


def expected_bytes(degrees: dict[str, int], *, tokens: int, text_len: int, config: dict, latent_shape, elt: int = 4):
    """Bytes one rank sends per denoising step (one forward of its share of the CFG batch). ``tokens`` real visual
    tokens, padded up to a multiple of ulysses x ring: every collective moves the padded slices."""
    u, r, c = degrees.get("ulysses", 1), degrees.get("ring", 1), degrees.get("cfg", 1)
    sp = u * r
    batch = 2 // c  # the CFG batch [uncond, cond], split over the cfg pair
    heads, head_dim, layers = config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]
    local = -(-tokens // sp)  # this rank's slice of the padded sequence
    per_layer = {
        "ulysses": (3 + 1) * batch * local * heads * head_dim * elt * (u - 1) // u,  # q,k,v out; attention back
        "text_gather": batch * text_len * (heads // u) * head_dim * elt * (u - 1),
        "ring": (r - 1) * 2 * batch * local * heads * head_dim * elt,  # K and V chunks, r - 1 hops
    }
    out_width = config["patch_size"] ** 2 * config["in_channels"]
    per_forward = {
        "output_gather": batch * local * out_width * elt * (sp - 1),
        "cfg_gather": batch * latent_shape.numel() // 2 * elt * (c - 1),  # latent_shape: the full CFG batch
    }
    result = {k: v * layers for k, v in per_layer.items()}
    result.update(per_forward)
    return {k: v for k, v in result.items() if v}


def worker(degrees: dict[str, int], steps: int, shape: dict[str, int]) -> dict:
    import warnings

    import torch

    # diffusers computes RoPE under an fp32 autocast that CPU autocast rejects (and then runs in fp32 anyway).
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")

    from batchgen.parallel.usp import COMM_STATS
    from bench._usp_report import parallel_transformer
    from tests import _usp_cases as cases

    heads = cases.TINY_TRANSFORMER["num_attention_heads"]
    transformer, context = parallel_transformer(cases.tiny_transformer(), degrees, heads)

    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=None, text_encoder=None, tokenizer=None, transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    marks: list[float] = []
    comm: list[dict[str, int]] = []

    def on_step_end(pipeline, step, timestep, kwargs):
        marks.append(time.perf_counter())
        comm.append(dict(COMM_STATS.bytes))
        COMM_STATS.reset()
        return {}

    if context is not None:
        context.barrier()
    COMM_STATS.reset()
    marks.append(time.perf_counter())
    pipe(
        **cases.prompt_tensors(3),
        **shape,
        num_inference_steps=steps,
        guidance_scale=4.5,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        callback_on_step_end=on_step_end,
    )
    step_s = [b - a for a, b in zip(marks, marks[1:], strict=False)][1:]  # step 0: warm-up
    return {"step_s": step_s, "bytes_per_step": comm[-1], "rank": int(os.environ.get("RANK", 0))}


def visual_tokens(shape: dict[str, int]) -> int:
    from batchgen.models import MOCHI

    return MOCHI.visual_tokens(shape["num_frames"], shape["height"], shape["width"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "bench/results/usp-cpu.json"))
    args = parser.parse_args()

    import torch

    from batchgen.models import MOCHI
    from bench._usp_report import layout_row, machine, run_layout, write_and_print
    from tests import _usp_cases as cases

    config = cases.TINY_TRANSFORMER
    rows = []
    started = time.perf_counter()
    for world, degrees, shape in LAYOUTS:
        t = MOCHI.latent_frames(shape["num_frames"])
        latent_shape = torch.Size([2, 12, t, shape["height"] // 8, shape["width"] // 8])
        results = run_layout(world, worker, degrees, args.steps, shape)
        tokens = visual_tokens(shape)
        expected = expected_bytes(
            degrees, tokens=tokens, text_len=cases.TEXT_LEN, config=config, latent_shape=latent_shape
        )
        rows.append(layout_row("step", world, degrees, tokens, results, expected))
    report = {
        "benchmark": "bench/usp_cpu.py",
        "backend": "native (torch.distributed gloo)",
        "xfuser": "not measured: xfuser needs CUDA + flash-attn (its CPU check is the shim test, which times nothing)",
        "model": "tiny Mochi transformer (tests/_usp_cases.TINY_TRANSFORMER), fp32, random weights",
        "shapes": [
            {**shape, "latent_frames": MOCHI.latent_frames(shape["num_frames"]), "visual_tokens": visual_tokens(shape)}
            for shape in (SHAPE, PADDED_SHAPE)
        ],
        "text_tokens": cases.TEXT_LEN,
        "steps": args.steps,
        **machine(),
        "seconds_total": round(time.perf_counter() - started, 1),
        "layouts": rows,
    }
    return write_and_print(report, args.out, f"tiny Mochi, {args.steps} steps", "step")


if __name__ == "__main__":
    sys.exit(main())
