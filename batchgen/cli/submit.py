"""``batchgen submit``: run a manifest on Kubernetes as TrainJobs or PyTorchJobs, resumably."""

from __future__ import annotations

import argparse
import sys

NAME = "submit"
HELP = "validate, plan and run a manifest on Kubernetes as TrainJobs or PyTorchJobs (idempotent, resumable)"
ORDER = 61
DESCRIPTION = (
    "Validate the manifest, plan the run under --output, and create one job (a TrainJob, or a PyTorchJob: see "
    "--launcher) per group of pending shards, "
    "at most --max-jobs at a time. With --wait, watch the jobs, relaunch failed ones (up to --max-attempts) and "
    "build the index when every shard is done. Safe to rerun, or to run twice: existing jobs are adopted by "
    "name and labels, finished shards are never relaunched."
)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster access (default: KUBECONFIG / ~/.kube/config, or in-cluster)")
    group.add_argument("--kubeconfig", metavar="FILE", default=None, help="kubeconfig file")
    group.add_argument("--context", default=None, help="kubeconfig context")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import add_generation_arguments, add_shard_size_argument, add_weights_arguments
    from batchgen.launch.k8s.options import add_launch_arguments

    parser.add_argument("manifest", metavar="MANIFEST", help="Parquet manifest (a path or an s3:// URI)")
    parser.add_argument("--output", required=True, metavar="URI", help="output root (s3://bucket/prefix)")
    parser.add_argument("--run-name", default=None, help="run name (default: the manifest file stem)")
    parser.add_argument("--new-run", action="store_true", help="plan a new run even if one of this name exists")
    parser.add_argument("--max-jobs", type=int, default=4, metavar="K", help="jobs running at once (default 4)")
    parser.add_argument("--shards-per-job", type=int, default=1, metavar="S", help="shards per job (default 1)")
    parser.add_argument(
        "--max-attempts", type=int, default=3, metavar="A", help="attempts per job before giving up (default 3)"
    )
    parser.add_argument("--wait", action="store_true", help="watch until the run is done, then build the index")
    parser.add_argument(
        "--resync-seconds", type=int, default=30, metavar="S", help="re-read progress at least this often (--wait)"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT", help="serve controller metrics here (0 = off)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="plan, check the degrees and print the cost estimate; create no job"
    )
    add_cluster_arguments(parser)
    add_generation_arguments(parser)
    add_weights_arguments(parser, model_dir=False)  # --model-dir is the pods' path
    add_shard_size_argument(parser)
    add_launch_arguments(parser)
    from batchgen.cli._estimate import add_estimate_arguments

    add_estimate_arguments(parser, layout_flags=False)


def run(args: argparse.Namespace) -> int:
    import logging

    from batchgen.cli._options import config_from_args
    from batchgen.core.errors import ConfigError
    from batchgen.core.plan import make_plan
    from batchgen.launch.k8s.options import settings_from_args
    from batchgen.launch.k8s.settings import resolve_degrees
    from batchgen.storage import open_storage

    log = logging.getLogger("batchgen.submit")
    for flag in ("max_jobs", "shards_per_job", "max_attempts", "resync_seconds"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    config = config_from_args(args)
    settings = settings_from_args(args, output=args.output, family=config.model.family)
    storage = open_storage(args.output)
    plan = make_plan(args.manifest, config, storage, run_name=args.run_name, new_run=args.new_run)
    topology = resolve_degrees(settings, plan)  # refuse degrees that cannot fit before touching the cluster
    log.info(
        "run %s: %d items in %d shards; pods: %s", plan.run_id, plan.row_count, len(plan.shards), topology.describe()
    )
    if args.dry_run:
        from batchgen.cli._estimate import estimate_for, reuse_lines

        gpus = args.max_jobs * settings.world_size
        group = topology.cfg * topology.ulysses * topology.ring
        estimate = estimate_for(args, storage, plan, gpus=gpus, group_size=group)
        sys.stdout.write("\n".join([*reuse_lines(plan), *estimate.lines()]) + "\n")
        sys.stdout.write(f"dry run: no job created ({args.max_jobs} job(s) of {settings.world_size} GPU(s) at once)\n")
        return 0
    return _launch(args, storage, plan, settings)


def _launch(args: argparse.Namespace, storage, plan, settings) -> int:
    """Run the controller against the cluster until the run is done (``--wait``) or its jobs are created."""
    from batchgen.core import layout, metrics
    from batchgen.launch.k8s.client import context_namespace, load_api_client
    from batchgen.launch.k8s.controller import RunController
    from batchgen.launch.k8s.launchers import make_backend

    metrics.serve(metrics.CONTROLLER_REGISTRY, metrics.resolve_port(args.metrics_port))
    if not settings.namespace:
        settings = settings.replace(namespace=context_namespace(args.kubeconfig, args.context))
    backend = make_backend(settings.launcher, settings.namespace, load_api_client(args.kubeconfig, args.context))
    backend.check_ready(settings)
    controller = RunController(
        backend,
        storage,
        plan,
        settings,
        max_jobs=args.max_jobs,
        shards_per_job=args.shards_per_job,
        max_attempts=args.max_attempts,
        resync_s=args.resync_seconds,
    )
    state = controller.run(wait=args.wait)
    sys.stdout.write(f"run {plan.run_id}: {state.summary()}\n")
    if args.wait:
        sys.stdout.write(f"index: {storage.url(layout.index_key(plan.run_id))}\n")
    else:
        sys.stdout.write(
            f"follow: batchgen status {args.output} --namespace {settings.namespace} --launcher "
            f"{backend.kind.lower()}; rerun this command to continue\n"
        )
    return 0
