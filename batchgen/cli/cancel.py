"""``batchgen cancel``: delete a run's jobs (their pods go with them). Outputs stay; submit resumes."""

from __future__ import annotations

import argparse
import sys

NAME = "cancel"
HELP = "delete the TrainJobs or PyTorchJobs of a run (outputs are kept; submit again to resume)"
ORDER = 63


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli.status import add_launcher_argument
    from batchgen.cli.submit import add_cluster_arguments

    parser.add_argument("run_id", metavar="RUN_ID", help="the run id (printed by submit and status)")
    parser.add_argument(
        "--namespace",
        default=None,
        help="namespace of the jobs (default: the kubeconfig context's, in-cluster the pod's)",
    )
    add_cluster_arguments(parser)
    add_launcher_argument(parser)


def run(args: argparse.Namespace) -> int:
    from batchgen.launch.k8s.client import context_namespace, load_api_client
    from batchgen.launch.k8s.controller import cancel_run
    from batchgen.launch.k8s.launchers import make_backend

    namespace = args.namespace or context_namespace(args.kubeconfig, args.context)
    backend = make_backend(args.launcher, namespace, load_api_client(args.kubeconfig, args.context))
    deleted = cancel_run(backend, args.run_id)
    for name in deleted:
        sys.stdout.write(f"deleted {name}\n")
    sys.stdout.write(f"run {args.run_id}: {len(deleted)} job(s) deleted in namespace {namespace}\n")
    return 0
