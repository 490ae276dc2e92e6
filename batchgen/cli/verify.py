"""``batchgen verify``: audit a run's stored objects against what its sidecars, index and marker say."""

from __future__ import annotations

import argparse

NAME = "verify"
HELP = "audit a run: every done item's video exists and matches its sidecar, no strays, index and marker agree"
ORDER = 77
DESCRIPTION = (
    "Check that every done item's video exists with its recorded size (one listing, no read per item), that "
    "sidecars are valid, that no sidecar, error record or video is stray, and that index/index.parquet and "
    "_SUCCESS.json agree with the sidecars. --deep also reads every video: sha256 and decoded frame count. "
    "--repair makes each damaged item pending again (deletes its video, then its sidecar) and rebuilds the index, "
    "so the next run regenerates it. Exit 0: no problem; 8: problems remain (listed)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--deep", action="store_true", help="also read every video: sha256 and frame count")
    parser.add_argument("--repair", action="store_true", help="make damaged items pending again, rebuild the index")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from batchgen.core.errors import EXIT_OK, EXIT_VERIFY
    from batchgen.core.plan import locate_run
    from batchgen.dataset.audit import audit_run, repair

    storage, plan = locate_run(args.run, args.run_id)
    audit = audit_run(storage, plan, deep=args.deep)
    found = list(audit.problems)
    if args.repair and found:
        repair(storage, plan, audit)
        audit = audit_run(storage, plan, deep=args.deep)
    if args.json:
        print(json.dumps(_as_dict(audit, found, storage), indent=2))
    else:
        _print(audit, found, storage, repaired=args.repair)
    return EXIT_VERIFY if audit.problems else EXIT_OK


def _as_dict(audit, found, storage) -> dict:
    def problems(items):
        return [{"uri": p.where(storage), "problem": p.what} for p in items]

    return {
        "run_id": audit.run_id,
        "done": audit.done,
        "total": audit.total,
        "found": problems(found),
        "remaining": problems(audit.problems),
    }


def _print(audit, found, storage, *, repaired: bool) -> None:
    print(f"run       {audit.run_id}: {audit.done}/{audit.total} done")
    for problem in found:
        print(f"  {problem.where(storage)}: {problem.what}")
    if repaired and found:
        fixed = len(found) - len(audit.problems)
        print(f"repaired  {fixed} problem(s): damaged items are pending again; run the same batch again to regenerate")
    print(f"verify    {'OK' if not audit.problems else f'{len(audit.problems)} problem(s)'}")
