"""Options and output of the cost estimate that ``plan`` and ``submit --dry-run`` print (see batchgen.dataset.estimate).
Not a subcommand itself (no ``NAME``), so ``batchgen.cli`` skips it."""

from __future__ import annotations

import argparse


def add_estimate_arguments(parser: argparse.ArgumentParser, *, layout_flags: bool) -> None:
    group = parser.add_argument_group("cost estimate (H200 figures unless told otherwise)")
    if layout_flags:
        group.add_argument("--gpus", type=int, default=8, metavar="N", help="GPUs the run will use (default 8)")
        group.add_argument(
            "--gpus-per-group", type=int, default=1, metavar="K",
            help="GPUs splitting each video: ulysses x ring x cfg (default 1)",
        )  # fmt: skip
    group.add_argument(
        "--gpu-tflops", type=float, default=None, metavar="T",
        help="dense bf16 TFLOP/s of your GPU type: scales the H200 figures (H200: 989.4)",
    )  # fmt: skip
    group.add_argument(
        "--calibration", default=None, metavar="FILE", help="bench/gpu.py results measured on your GPU type"
    )


def estimate_for(args: argparse.Namespace, storage, plan, *, gpus: int, group_size: int):
    """The estimate, from the run's own sidecars when it has committed items, else from the chosen profile. The
    FLOPs are the plan's family's, from the weights' config when ``--model-dir`` is local (``plan``)."""
    from batchgen.dataset.estimate import choose_profile, estimate_plan, flop_model, own_timings

    spec = plan.config.spec
    # plan's --model-dir is local; submit's is the pods' path (dest launch_model_dir), so it is not read here.
    flops = flop_model(spec, getattr(args, "model_dir", None))
    profile = choose_profile(args.gpu_tflops, args.calibration)
    own = own_timings(storage, plan.run_id, spec=spec, flops=flops)
    return estimate_plan(plan, gpus=gpus, group_size=group_size, profile=profile, own=own, flops=flops)


def reuse_lines(plan) -> list[str]:
    """What the plan copies instead of generating (the estimate above counts only the rest)."""
    return [f"reuse: {plan.reuse.describe(plan.row_count)}"] if plan.reuse is not None else []
