"""``batchgen status``: a run's progress from storage alone (no cluster, no worker needed)."""

from __future__ import annotations

import argparse

NAME = "status"
HELP = "show a run's progress from storage alone"
ORDER = 70
DESCRIPTION = (
    "Count done, failed and pending items of a run from the plan's item ids and listings of its meta/ and errors/ "
    "objects (files that are not a planned item's sidecar are ignored with a warning). "
    "Without --run-id: the output's only run, or the list of runs when there are several."
)


def add_launcher_argument(parser: argparse.ArgumentParser) -> None:
    from batchgen.launch.k8s.settings import LAUNCHERS

    parser.add_argument(
        "--launcher", choices=LAUNCHERS, default="auto",
        help="job kind: trainjob, pytorchjob, or auto (ask the API server, prefer TrainJob; default)",
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="URI", help="output root: s3://bucket/prefix or a folder")
    parser.add_argument("--run-id", default=None, metavar="RUN", help="which run (needed when there are several)")
    parser.add_argument("--shards", action="store_true", help="also list every shard that is not finished")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--namespace", default=None, help="also show the run's jobs in this namespace")
    parser.add_argument("--kubeconfig", metavar="FILE", default=None, help="kubeconfig for --namespace")
    add_launcher_argument(parser)
    parser.add_argument(
        "--rate-window", type=float, default=15.0, metavar="MIN", help="rate and ETA over the last MIN minutes (15)"
    )


def resolve_run_id(storage, run_id: str | None) -> str | None:
    """The run to show: the given one, or the only run. None when there are several (the caller lists them)."""
    from batchgen.core.errors import NotFoundError
    from batchgen.core.plan import list_runs

    if run_id:
        return run_id
    runs = list_runs(storage)
    if not runs:
        raise NotFoundError(f"no planned run under {storage.uri}")
    return runs[0] if len(runs) == 1 else None


def open_run_plan(output: str, run_id: str | None):
    """(storage, plan) of the run ``run_id``, or of the only run under ``output``; InputError naming the runs
    when there are several."""
    from batchgen.core.errors import InputError
    from batchgen.core.plan import list_runs, load_plan
    from batchgen.storage import open_storage

    storage = open_storage(output)
    chosen = resolve_run_id(storage, run_id)
    if chosen is None:
        raise InputError(f"several runs under {storage.uri}; pick one with --run-id: {', '.join(list_runs(storage))}")
    return storage, load_plan(storage, chosen)


def run(args: argparse.Namespace) -> int:
    import json

    from batchgen.core import layout
    from batchgen.core.errors import InputError
    from batchgen.core.plan import list_runs, load_plan
    from batchgen.core.progress import scan_run
    from batchgen.dataset import eta
    from batchgen.storage import open_storage

    storage = open_storage(args.output)
    run_id = resolve_run_id(storage, args.run_id)
    if run_id is None:
        runs = list_runs(storage)
        if args.json:
            print(json.dumps({"runs": runs}))
        else:
            print(f"{len(runs)} runs under {storage.uri}; pick one with --run-id:")
            for name in runs:
                print(f"  {name}")
        return 0
    if not args.rate_window > 0:
        raise InputError(f"--rate-window must be positive, got {args.rate_window}")
    plan = load_plan(storage, run_id)
    progress = scan_run(storage, plan)
    success = storage.exists(layout.success_key(run_id))
    times = eta.commit_times(storage, run_id)
    window = {"window_s": 60 * args.rate_window}
    rate = eta.run_rate(times, progress, **window)
    jobs, job_rates = _jobs_with_rates(args, run_id, times, progress, window) if args.namespace else (None, {})
    if args.json:
        data = {**progress.to_dict(), "output": storage.uri, "success_marker": success, "rate": rate.to_dict()}
        if plan.reuse is not None:
            data["reused"] = plan.reuse.reused
        if args.shards:
            data["unfinished_shards"] = [
                {"shard": s.shard, "total": s.total, "done": s.done, "failed": s.failed, "stats": s.stats_written}
                for s in (progress.shards[name] for name in progress.unfinished_shards)
            ]
        if jobs is not None:
            data["jobs"] = jobs
        print(json.dumps(data, indent=2))
        return 0
    percent = 100.0 * progress.done / progress.total if progress.total else 100.0
    state = (
        "complete"
        if progress.complete
        else "failed items"
        if progress.failed and not progress.pending
        else ("in progress" if progress.done or progress.failed else "not started")
    )
    print(f"run       {run_id}")
    print(f"output    {storage.uri}")
    print(
        f"items     {progress.done}/{progress.total} done ({percent:.1f}%), {progress.failed} failed, "
        f"{progress.pending} pending"
    )
    if plan.reuse is not None:
        print(f"reuse     {plan.reuse.describe(plan.row_count)}")
    print(f"rate      {rate.describe()}")
    print(f"shards    {len(progress.finished_shards)}/{len(progress.shards)} finished")
    print(f"state     {state}" + (" (_SUCCESS.json present)" if success else ""))
    if args.shards:
        for name in progress.unfinished_shards:
            s = progress.shards[name]
            print(
                f"  {name}: {s.done}/{s.total} done, {s.failed} failed" + (", stats written" if s.stats_written else "")
            )
    if args.namespace:
        from batchgen.launch.k8s.controller import format_jobs

        print(f"jobs in namespace {args.namespace}:")
        print(format_jobs(jobs))
        for name, job_rate in job_rates.items():
            print(f"  {name}: {job_rate.describe()}")
    return 0


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
