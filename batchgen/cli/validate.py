"""``batchgen validate MANIFEST``: check a manifest without writing or launching anything."""

from __future__ import annotations

import argparse
import json
import logging

from batchgen.cli._options import add_generation_arguments, config_from_args

NAME = "validate"
HELP = "check a Parquet manifest (types, prompts, ids, shapes); exit 2 listing every problem"
DESCRIPTION = (
    "Validate a Parquet prompt manifest against the run-wide generation defaults. Every problem names the file, "
    "the row (0-based) and the column; nothing is written."
)
ORDER = 10

log = logging.getLogger("batchgen.validate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "manifest", metavar="MANIFEST", help="Parquet file (a path or an s3:// URI) with at least a 'prompt' column"
    )
    parser.add_argument("--max-errors", type=int, default=50, metavar="N", help="problems to list (default 50)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from batchgen.core.manifest import iter_item_batches, validate_manifest
    from batchgen.core.reuse import duplicate_rows, duplicate_warnings

    config = config_from_args(args)
    summary = validate_manifest(args.manifest, config.generation, spec=config.spec, max_errors=args.max_errors)
    batches = iter_item_batches(args.manifest, config.generation, spec=config.spec, expected_digest=summary.digest)
    for warning in duplicate_warnings(duplicate_rows(batches, config.generation, config.model.family)):
        log.warning("%s: %s", summary.path, warning)
        summary.warnings.append(warning)
    if args.json:
        print(
            json.dumps(
                {
                    "manifest": summary.path,
                    "rows": summary.rows,
                    "digest": summary.digest,
                    "derived_ids": summary.derived_ids,
                    "warnings": summary.warnings,
                }
            )
        )
    else:
        ids = "derived from row content" if summary.derived_ids else "from the 'id' column"
        print(f"{summary.path}: OK, {summary.rows} rows, ids {ids}, {len(summary.warnings)} warning(s)")
    return 0
