"""``batchgen tail RUN_URI``: print a run's committed items as they appear, for shell pipelines."""

from __future__ import annotations

import argparse

NAME = "tail"
HELP = "print a run's committed items as they appear (one line each), until the run is complete"
ORDER = 72
DESCRIPTION = (
    "Follow a run while it generates: every committed item once, in commit order, as a line '<id> <video uri>' "
    "(--json: one JSON object per line with the item's fields, its video URI, commit time and the cursor to resume "
    "after it). Each poll lists the run's sidecars (no request per item). Stops when _SUCCESS.json appears (--once: "
    "after one poll); a closing line on stderr says which and gives the cursor. Resume with --start-after CURSOR."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--poll", type=float, default=30.0, metavar="S", help="seconds between polls (default 30)")
    parser.add_argument("--start-after", default=None, metavar="CURSOR", help="a cursor printed by tail")
    parser.add_argument("--once", action="store_true", help="print what is committed now and stop")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from batchgen.dataset import open_run

    run = open_run(args.run, args.run_id)
    follower = run.follow(poll=args.poll, start_after=args.start_after, once=args.once)
    count = 0
    for committed in follower:
        print(json.dumps(committed.to_dict()) if args.json else f"{committed.item.id} {committed.uri}")
        sys.stdout.flush()  # a pipeline reads each item as it is committed
        count += 1
    # On stderr: stdout holds only items, for pipelines.
    state = "the run is complete" if follower.complete else "the run is not complete yet"
    print(
        f"{count} item(s) of {run.run_id} printed; {state}. Resume with --start-after {follower.cursor}",
        file=sys.stderr,
    )
    return 0
