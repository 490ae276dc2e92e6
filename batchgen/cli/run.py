"""``batchgen run``: the whole batch on this machine (validate, plan, local workers, index, summary)."""

from __future__ import annotations

import argparse

NAME = "run"
HELP = "run a batch on this machine: validate, plan, N local workers, index, summary"
ORDER = 30
DESCRIPTION = (
    "Validate the manifest, plan the run under --output (or find its stored plan), start --workers local worker "
    "processes on the shards that are not finished, show progress, then build the index and print a summary. "
    "Running the same command again resumes: finished items are skipped, so a completed run generates nothing. "
    "With --nproc-per-worker P > 1 each worker is a torchrun job of P processes splitting every video "
    "(--ulysses-degree, --ring-degree, --cfg-degree). Exit 5 if some items failed every attempt."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import (
        add_generation_arguments,
        add_parallel_arguments,
        add_shard_size_argument,
        add_weights_arguments,
    )

    parser.add_argument("manifest", metavar="MANIFEST", help="Parquet prompt manifest (a path or an s3:// URI)")
    parser.add_argument("--output", required=True, metavar="URI", help="output root: s3://bucket/prefix or a folder")
    parser.add_argument(
        "--model-dir",
        required=True,
        metavar="DIR",
        help="model directory (its family and fingerprint enter the run id)",
    )
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="local worker processes (default 1)")
    parser.add_argument(
        "--nproc-per-worker", type=int, default=1, metavar="P", help="processes per worker, via torchrun (default 1)"
    )
    parser.add_argument("--run-name", default=None, help="run name (default: the manifest file stem)")
    parser.add_argument("--new-run", action="store_true", help="plan a separate run even if the name has one")
    parser.add_argument("--poll", type=float, default=1.0, metavar="S", help="progress refresh interval in seconds")
    add_generation_arguments(parser)
    add_weights_arguments(parser, model_dir=False)
    add_shard_size_argument(parser)
    add_parallel_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from batchgen.cli._options import config_from_args
    from batchgen.core.metrics import resolve_port
    from batchgen.launch.local import run_local
    from batchgen.storage import open_storage

    config = config_from_args(args, model_dir=args.model_dir)
    port = resolve_port(args.metrics_port, config.worker.metrics_port)
    outcome = run_local(
        args.manifest,
        args.output,
        args.model_dir,
        dataclasses.replace(config, worker=dataclasses.replace(config.worker, metrics_port=port)),
        workers=args.workers,
        nproc_per_worker=args.nproc_per_worker,
        run_name=args.run_name,
        new_run=args.new_run,
        poll_s=args.poll,
        verbose=args.verbose,
    )
    if outcome.generated == 0 and outcome.resumed == outcome.total and not outcome.worker_exit_codes:
        print(f"Nothing to generate: all {outcome.total} items of {outcome.plan.run_id} were already done.")
    for line in outcome.summary_lines(open_storage(args.output)):
        print(line)
    return outcome.exit_code
