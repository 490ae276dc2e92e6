"""``batchgen plan MANIFEST --output URI``: validate, then store the run's plan and shards (or reuse them)."""

from __future__ import annotations

import argparse
import json

from batchgen.cli._estimate import add_estimate_arguments, estimate_for, reuse_lines
from batchgen.cli._options import (
    add_generation_arguments,
    add_shard_size_argument,
    add_weights_arguments,
    config_from_args,
)

NAME = "plan"
HELP = "validate a manifest and store the run's deterministic shard plan under the output (idempotent)"
DESCRIPTION = (
    "Validate MANIFEST, derive the run id from its content, the generation settings, the shard size and the "
    "model (family; weights' fingerprint when --model-dir or --weights-fingerprint gives it), and "
    "store the plan under OUTPUT/<run-id>/plan/. Planning again with the same inputs reuses the stored plan; "
    "a run of the same name planned from other inputs is refused (exit 4) unless --new-run."
)
ORDER = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "manifest", metavar="MANIFEST", help="Parquet file (a path or an s3:// URI) with at least a 'prompt' column"
    )
    parser.add_argument(
        "--output", "-o", required=True, metavar="URI", help="s3://bucket/prefix, file:///dir or a path"
    )
    parser.add_argument("--run-name", metavar="NAME", help="run name (default: the manifest file name)")
    parser.add_argument(
        "--new-run", action="store_true", help="plan a separate run even if a run of this name has other inputs"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_generation_arguments(parser)
    add_weights_arguments(parser)
    add_shard_size_argument(parser)
    add_estimate_arguments(parser, layout_flags=True)


def run(args: argparse.Namespace) -> int:
    from batchgen.core import layout
    from batchgen.core.plan import plan_manifest
    from batchgen.storage import open_storage

    config = config_from_args(args, model_dir=args.model_dir)
    storage = open_storage(args.output)
    plan, reused = plan_manifest(args.manifest, config, storage, run_name=args.run_name, new_run=args.new_run)
    where = storage.url(layout.plan_key(plan.run_id))
    estimate = estimate_for(args, storage, plan, gpus=args.gpus, group_size=args.gpus_per_group)
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": plan.run_id,
                    "reused": reused,
                    "rows": plan.row_count,
                    "shards": len(plan.shards),
                    "shard_size": plan.shard_size,
                    "fingerprint": plan.fingerprint,
                    "reused_items": plan.reuse.reused if plan.reuse is not None else 0,
                    "reuse_note": plan.reuse.note if plan.reuse is not None else "",
                    "plan": where,
                    "estimate": estimate.to_dict(),
                }
            )
        )
    else:
        state = "reused the stored plan" if reused else "planned"
        print(f"{state}: run {plan.run_id}, {plan.row_count} items in {len(plan.shards)} shards of {plan.shard_size}")
        print(f"plan: {where}")
        print("\n".join([*reuse_lines(plan), *estimate.lines()]))
    return 0
