"""``batchgen index``: (re)build a run's Parquet index from its sidecars, and its success marker."""

from __future__ import annotations

import argparse

NAME = "index"
HELP = "(re)build a run's index/index.parquet from its sidecars"
ORDER = 75
DESCRIPTION = (
    "Assemble <run>/index/index.parquet from the shards' index parts (rebuilding only the parts whose sidecars "
    "changed) and write it atomically and conditionally: one row per committed video with its key, URI and every "
    "sidecar field. Writes _SUCCESS.json when every item is done; writes nothing when the complete run's index is "
    "current. Prints the rows written. Exit 5 when the run is not complete (the index then covers the items done)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import add_run_arguments

    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from batchgen.core import layout
    from batchgen.core.errors import EXIT_INCOMPLETE
    from batchgen.core.plan import locate_run
    from batchgen.dataset.index import finalize

    storage, plan = locate_run(args.run, args.run_id)
    run_id = plan.run_id
    result = finalize(storage, plan)
    print(f"{storage.url(layout.index_key(run_id))}: {result.rows} rows")
    if not result.complete:
        progress = result.progress
        print(f"run incomplete: {progress.failed} failed, {progress.pending} pending of {progress.total}")
        return EXIT_INCOMPLETE
    print(f"complete: {storage.url(layout.success_key(run_id))}")
    return 0
