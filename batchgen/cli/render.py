"""``batchgen render``: print the TrainJob(s) or PyTorchJob(s) for some shards of a run as YAML (nothing is
created)."""

from __future__ import annotations

import argparse
import sys

NAME = "render"
HELP = "print TrainJob or PyTorchJob YAML for shards of a run (no cluster needed)"
ORDER = 60
DESCRIPTION = (
    "Print the jobs that `batchgen submit` would create for the given shards: with --launcher trainjob (or auto, "
    "since no cluster is asked) the TrainingRuntime they reference followed by the TrainJobs, with --launcher "
    "pytorchjob the PyTorchJobs. With --run-id nothing is read: the shards are indices. With --manifest the run "
    "is planned (and the plan stored) under --output first."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import add_generation_arguments, add_shard_size_argument
    from batchgen.launch.k8s.options import add_launch_arguments

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="run id (shards are then taken as indices, no storage access)")
    source.add_argument("--manifest", metavar="MANIFEST", help="plan the manifest under --output and render its shards")
    parser.add_argument("--output", metavar="URI", default=None, help="run output URI the workers write to")
    parser.add_argument(
        "--shards", required=True, metavar="SEL", help="'A:B' (half-open indices), '1,3,7' or 'all' (with --manifest)"
    )
    parser.add_argument("--attempt", type=int, default=1, help="attempt number in the job's name (default 1)")
    parser.add_argument(
        "--shards-per-job", type=int, default=0, metavar="S", help="split into jobs of S shards (default: one job)"
    )
    add_generation_arguments(parser)
    add_shard_size_argument(parser)
    add_launch_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from batchgen.core.errors import ConfigError
    from batchgen.launch.k8s.options import settings_from_args
    from batchgen.launch.k8s.pod import to_yaml
    from batchgen.launch.k8s.pytorchjob import render_pytorchjob
    from batchgen.launch.k8s.settings import parse_shard_indices
    from batchgen.launch.k8s.trainjob import render_trainingruntime, render_trainjob

    config = None
    if args.manifest is not None:
        from batchgen.cli._options import config_from_args

        config = config_from_args(args)
    family = config.model.family if config is not None else args.family
    settings = settings_from_args(args, output=args.output, family=family)
    if not settings.output:
        raise ConfigError("--output (or 'output' in --values) is required: the workers need to know where to write")
    if args.attempt < 1:
        raise ConfigError(f"--attempt must be >= 1, got {args.attempt}")
    if config is None:  # --run-id (argparse requires exactly one of the two)
        plan_or_run: object = args.run_id
        shards = parse_shard_indices(args.shards)
    else:
        from batchgen.core.plan import make_plan, parse_shard_selection
        from batchgen.storage import open_storage

        plan = make_plan(args.manifest, config, open_storage(settings.output))
        plan_or_run = plan
        shards = parse_shard_selection(args.shards, plan)
    size = args.shards_per_job or len(shards)
    if size < 1:
        raise ConfigError(f"--shards-per-job must be >= 1, got {args.shards_per_job}")
    # No cluster to ask which kind it serves: auto renders what submit prefers.
    trainjob = settings.launcher != "pytorchjob"
    render_job = render_trainjob if trainjob else render_pytorchjob
    jobs = [render_job(plan_or_run, shards[i : i + size], settings, args.attempt) for i in range(0, len(shards), size)]
    sys.stdout.write(to_yaml([render_trainingruntime(settings), *jobs] if trainjob else jobs))
    return 0
