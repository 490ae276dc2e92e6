"""``batchgen tail RUN_URI``: print a run's committed items as they appear, for shell pipelines."""

from __future__ import annotations

import argparse

NAME = "tail"
HELP = "print a run's committed items as they appear (one line each), until the run is complete"
ORDER = 72
DESCRIPTION = (
    "Follow a run while it generates: every committed item once, in commit order, as a line '<id> <video uri>' "
    "(--json: one JSON object per line with the item's fields, its video URI, commit time and the cursor to resume "
    "after it). Each poll lists the run's sidecars (no request per item). Stops when _SUCCESS.json appears; resume "
    "an interrupted tail with --start-after CURSOR."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--poll", type=float, default=30.0, metavar="S", help="seconds between polls (default 30)")
    parser.add_argument("--start-after", default=None, metavar="CURSOR", help="a cursor printed by tail --json")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from batchgen.dataset import open_run

    for committed in open_run(args.run, args.run_id).follow(poll=args.poll, start_after=args.start_after):
        print(json.dumps(committed.to_dict()) if args.json else f"{committed.item.id} {committed.uri}")
        sys.stdout.flush()  # a pipeline reads each item as it is committed
    return 0
