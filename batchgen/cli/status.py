"""``batchgen status``: a run's progress from storage alone (no cluster, no worker needed)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

NAME = "status"
HELP = "show a run's progress from storage alone"
ORDER = 70
DESCRIPTION = (
    "Count done, failed and pending items of a run from the plan's item ids and listings of its meta/ and errors/ "
    "objects (files that are not a planned item's sidecar are ignored with a warning). "
    "RUN_URI is the run's folder, or an output root with --run-id (or holding one run); given a root with several "
    "runs and no --run-id, status lists them."
)


def add_launcher_argument(parser: argparse.ArgumentParser) -> None:
    from batchgen.launch.k8s.settings import LAUNCHERS

    parser.add_argument(
        "--launcher", choices=LAUNCHERS, default="auto",
        help="job kind: trainjob, pytorchjob, or auto (ask the API server, prefer TrainJob; default)",
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--shards", action="store_true", help="also list every shard that is not finished")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--namespace", default=None, help="also show the run's jobs in this namespace")
    parser.add_argument("--kubeconfig", metavar="FILE", default=None, help="kubeconfig for --namespace")
    add_launcher_argument(parser)
    parser.add_argument(
        "--rate-window", type=float, default=15.0, metavar="MIN", help="rate and ETA over the last MIN minutes (15)"
    )


def run(args: argparse.Namespace) -> int:
    from batchgen.core.errors import InputError
    from batchgen.core.plan import SeveralRunsError, locate_run

    if not args.rate_window > 0:
        raise InputError(f"--rate-window must be positive, got {args.rate_window}")
    try:
        storage, plan = locate_run(args.run, args.run_id)
    except SeveralRunsError as several:
        _print_runs(several, as_json=args.json)
        return 0
    status = _status(args, storage, plan)
    if args.json:
        _print_json(args, status)
    else:
        _print_text(args, status)
    return 0


@dataclass
class _Status:
    """What ``batchgen status`` shows about one run, read from storage (and the cluster, with --namespace)."""

    storage: Any
    run_id: str
    progress: Any
    flagged: int
    success: bool
    rate: Any
    jobs: list[dict] | None
    job_rates: dict[str, Any]
    reuse: Any = None
    """The plan's ``ReusePlan`` (None for plans that predate reuse)."""


def _status(args: argparse.Namespace, storage, plan) -> _Status:
    from batchgen.core import layout
    from batchgen.core.progress import scan_run
    from batchgen.dataset import eta
    from batchgen.dataset.index import flagged_videos

    run_id = plan.run_id
    progress = scan_run(storage, plan)
    flagged = flagged_videos(storage, plan, progress)
    success = storage.exists(layout.success_key(run_id))
    times = eta.commit_times(storage, run_id)
    window = {"window_s": 60 * args.rate_window}
    rate = eta.run_rate(times, progress, **window)
    jobs, job_rates = _jobs_with_rates(args, run_id, times, progress, window) if args.namespace else (None, {})
    return _Status(storage, run_id, progress, flagged, success, rate, jobs, job_rates, plan.reuse)


def _print_runs(several, *, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps({"runs": several.runs}))
        return
    print(f"{len(several.runs)} runs under {several.root}; name one by its folder or --run-id:")
    for name in several.runs:
        print(f"  {several.root}/{name}")


def _print_json(args: argparse.Namespace, status: _Status) -> None:
    import json

    progress = status.progress
    data = {**progress.to_dict(), "flagged": status.flagged, "output": status.storage.uri}
    data["success_marker"] = status.success
    data["rate"] = status.rate.to_dict()
    if status.reuse is not None:
        data["reused"] = status.reuse.reused
    if args.shards:
        data["unfinished_shards"] = [
            {"shard": s.shard, "total": s.total, "done": s.done, "failed": s.failed, "stats": s.stats_written}
            for s in (progress.shards[name] for name in progress.unfinished_shards)
        ]
    if status.jobs is not None:
        data["jobs"] = status.jobs
    print(json.dumps(data, indent=2))


def _print_text(args: argparse.Namespace, status: _Status) -> None:
    from batchgen.dataset.index import FLAGGED_HINT

    progress = status.progress
    percent = 100.0 * progress.done / progress.total if progress.total else 100.0
    state = (
        "complete"
        if progress.complete
        else "failed items"
        if progress.failed and not progress.pending
        else ("in progress" if progress.done or progress.failed else "not started")
    )
    print(f"run       {status.run_id}")
    print(f"output    {status.storage.uri}")
    print(
        f"items     {progress.done}/{progress.total} done ({percent:.1f}%), {progress.failed} failed, "
        f"{progress.pending} pending"
    )
    print(f"flagged   {status.flagged} of {progress.done} videos ({FLAGGED_HINT})")
    if status.reuse is not None:
        print(f"reuse     {status.reuse.describe(progress.total)}")
    print(f"rate      {status.rate.describe()}")
    print(f"shards    {len(progress.finished_shards)}/{len(progress.shards)} finished")
    print(f"state     {state}" + (" (_SUCCESS.json present)" if status.success else ""))
    if args.shards:
        for name in progress.unfinished_shards:
            s = progress.shards[name]
            print(
                f"  {name}: {s.done}/{s.total} done, {s.failed} failed" + (", stats written" if s.stats_written else "")
            )
    if status.jobs is not None:  # read with --namespace
        from batchgen.launch.k8s.controller import format_jobs

        print(f"jobs in namespace {args.namespace}:")
        print(format_jobs(status.jobs))
        for name, job_rate in status.job_rates.items():
            print(f"  {name}: {job_rate.describe()}")


def _jobs_with_rates(args, run_id: str, times, progress, window) -> tuple[list[dict], dict]:
    """The run's jobs, and for each unfinished one the rate and ETA of its shards (also in its row's "rate")."""
    from batchgen.dataset import eta

    jobs = _jobs(args, run_id)
    rates = {}
    for job in jobs:
        if job["state"] not in ("Succeeded", "Failed"):
            rates[job["name"]] = eta.shards_rate(times, progress, job["shards"].split(","), **window)
            job["rate"] = rates[job["name"]].to_dict()
    return jobs, rates


def _jobs(args: argparse.Namespace, run_id: str) -> list[dict]:
    from batchgen.launch.k8s.client import load_api_client
    from batchgen.launch.k8s.controller import describe_jobs
    from batchgen.launch.k8s.launchers import make_backend

    return describe_jobs(make_backend(args.launcher, args.namespace, load_api_client(args.kubeconfig)), run_id)
