"""CPU benchmark of Wan under the native USP backend: the tiny Wan transformer forward (gloo, one thread per process).

For 1, 2 and 4 processes and each degree layout: median seconds per transformer forward of one CFG batch
[uncond, cond] (one warm-up forward excluded) and the bytes each rank sends per forward, counted in our
collectives, next to the analytic formula. The padded shape has a token count that 2 and 4 do not divide: the
padding travels in the all-to-alls, ring hops and output gather, and the formula counts it. Wan's self-attention
has no text, so unlike Mochi there is no text gather; cross-attention to the text is local on every rank.
Writes bench/results/wan-usp-cpu.json, prints a table.

    python bench/wan_usp_cpu.py [--repeats 5]

On this tiny model communication and Python overhead dominate, and more processes than cores oversubscribe the
machine: these numbers check the bookkeeping and the relative cost of layouts, not GPU speed-ups.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Latent [frames, height, width]: 5 x 16 x 16 -> 5 x 8 x 8 = 320 visual tokens; 5 x 14 x 14 -> 245, padded to 246
# on 2 ranks and 248 on 4.
LATENT = (5, 16, 16)
PADDED_LATENT = (5, 14, 14)
LAYOUTS = [
    # (world, degrees, latent)
    (1, {}, LATENT),
    (2, {"ulysses": 2}, LATENT),
    (2, {"ring": 2}, LATENT),
    (2, {"cfg": 2}, LATENT),
    (4, {"ulysses": 4}, LATENT),
    (4, {"ring": 4}, LATENT),
    (4, {"ulysses": 2, "ring": 2}, LATENT),
    (4, {"cfg": 2, "ulysses": 2}, LATENT),
    (1, {}, PADDED_LATENT),
    (2, {"ulysses": 2}, PADDED_LATENT),
    (4, {"ulysses": 2, "ring": 2}, PADDED_LATENT),
    (4, {"cfg": 2, "ring": 2}, PADDED_LATENT),
]


def visual_tokens(latent: tuple[int, int, int]) -> int:
    frames, height, width = latent
    return frames * (height // 2) * (width // 2)


def expected_bytes(degrees: dict[str, int], *, latent: tuple[int, int, int], config: dict, elt: int = 4) -> dict:
    """Bytes one rank sends per forward of its share of the CFG batch. Every collective moves padded slices."""
    u, r, c = degrees.get("ulysses", 1), degrees.get("ring", 1), degrees.get("cfg", 1)
    sp = u * r
    batch = 2 // c  # the CFG batch [uncond, cond], split over the cfg pair
    width = config["num_attention_heads"] * config["attention_head_dim"]
    local = -(-visual_tokens(latent) // sp)  # this rank's slice of the padded sequence
    per_layer = {
        "ulysses": (3 + 1) * batch * local * width * elt * (u - 1) // u,  # q, k, v out; attention output back
        "ring": (r - 1) * 2 * batch * local * width * elt,  # K and V of u slices with H/u heads, r - 1 hops
    }
    out_width = math.prod(config["patch_size"]) * config["out_channels"]
    output_numel = 2 * config["out_channels"] * math.prod(latent)  # the full CFG batch's prediction
    per_forward = {
        "output_gather": batch * local * out_width * elt * (sp - 1),
        "cfg_gather": output_numel // c * elt * (c - 1),
    }
    result = {k: v * config["num_layers"] for k, v in per_layer.items()}
    result.update(per_forward)
    return {k: v for k, v in result.items() if v}


def worker(degrees: dict[str, int], repeats: int, latent: tuple[int, int, int]) -> dict:
    import torch

    from batchgen.models import WAN
    from batchgen.parallel.usp import COMM_STATS
    from bench._usp_report import parallel_transformer
    from tests import _wan_cases as cases

    heads = cases.TINY_TRANSFORMER["num_attention_heads"]
    transformer, context = parallel_transformer(cases.tiny_transformer(), degrees, heads, plan=WAN.parallel_plan)
    inputs = cases.forward_inputs(3, latent)
    seconds, comm = [], {}
    with torch.no_grad():
        for _ in range(repeats + 1):
            if context is not None:
                context.barrier()
            COMM_STATS.reset()
            started = time.perf_counter()
            transformer(**inputs, return_dict=False)
            seconds.append(time.perf_counter() - started)
            comm = dict(COMM_STATS.bytes)
    return {"forward_s": seconds[1:], "bytes_per_forward": comm, "rank": int(os.environ.get("RANK", 0))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench/results/wan-usp-cpu.json"))
    args = parser.parse_args()

    from bench._usp_report import layout_row, machine, run_layout, write_and_print
    from tests import _wan_cases as cases

    config = cases.TINY_TRANSFORMER
    started = time.perf_counter()
    rows = [
        layout_row(
            "forward", world, degrees, visual_tokens(latent), run_layout(world, worker, degrees, args.repeats, latent),
            expected_bytes(degrees, latent=latent, config=config), latent=list(latent),
        )
        for world, degrees, latent in LAYOUTS
    ]  # fmt: skip
    report = {
        "benchmark": "bench/wan_usp_cpu.py",
        "backend": "native (torch.distributed gloo)",
        "model": "tiny WanTransformer3DModel (tests/_wan_cases.TINY_TRANSFORMER), fp32, random weights",
        "text_tokens": cases.TEXT_LEN,
        "repeats": args.repeats,
        **machine(),
        "seconds_total": round(time.perf_counter() - started, 1),
        "layouts": rows,
    }
    title = f"tiny Wan forward (CFG batch 2), {args.repeats} repeats"
    return write_and_print(report, args.out, title, "forward")


if __name__ == "__main__":
    sys.exit(main())
