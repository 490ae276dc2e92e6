"""Controller scale benchmark (CPU): writes bench/results/controller-cpu.json.

A run of ``--groups`` shard groups (one shard of one item each) with at most ``--max-jobs`` jobs running, driven
pass by pass: the real ``RunController`` reconciles against the Kubernetes API emulator (tests/k8s_emulator.py,
real HTTP, paged lists, foreground deletion) and a plan stored on a moto S3 server in its own process. Between
passes the "cluster" finishes every running job: its shard's sidecar and stats are written to S3 and the job is
marked Succeeded, so the next pass deletes it and launches the next group.

Per pass: seconds, API requests the controller made (the emulator's record for its identity) and S3 requests
the controller's storage made. The figures that matter: requests per pass must not grow with the number of
finished groups, so the JSON reports them for the first and the last tenth of the steady passes.

With --real, the same run with TrainJobs twice: against the emulator and against the real control plane (API
server, etcd, Trainer, JobSet, Job controller, scheduler, a --no-run node agent; bench/controller_real.py), with
the API server's and etcd's CPU seconds and memory; writes bench/results/controller-real.json.

Usage: python bench/controller.py [--groups 5000] [--max-jobs 64] [--real [--no-run 1.0]]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchgen.core import layout  # noqa: E402
from batchgen.core.config import RunConfig  # noqa: E402
from batchgen.core.plan import make_plan  # noqa: E402
from batchgen.launch.k8s.client import load_api_client  # noqa: E402
from batchgen.launch.k8s.controller import RunController  # noqa: E402
from batchgen.launch.k8s.launchers import make_backend  # noqa: E402
from batchgen.launch.k8s.settings import LaunchSettings  # noqa: E402
from batchgen.launch.k8s.trainjob import render_trainingruntime  # noqa: E402
from batchgen.storage import open_storage  # noqa: E402
from tests.k8s_emulator import KubeEmulator  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "controller-cpu.json"
RESULTS_REAL = ROOT / "bench" / "results" / "controller-real.json"
NAMESPACE = "bench"


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def make_run(groups: int, output: str, workdir: Path):
    manifest = workdir / "prompts.parquet"
    ids = [f"item-{i:06d}" for i in range(groups)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"prompt {i}" for i in range(groups)]}), manifest)
    config = RunConfig().with_overrides({"worker": {"shard_size": 1}})
    return make_plan(str(manifest), config, open_storage(output))


# What "finished" looks like for each launcher: (API group, version, plural) and the condition its operator sets.
DONE = {
    "pytorchjob": (("kubeflow.org", "v1", "pytorchjobs"), {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}),
    "trainjob": (("trainer.kubeflow.org", "v1alpha1", "trainjobs"), {"type": "Complete", "status": "True", "reason": "JobsCompleted"}),
}  # fmt: skip


def write_records(plan, writer, shards: list[str], pool: ThreadPoolExecutor) -> None:
    """What a job's workers leave in storage: each shard's one sidecar, then its stats (the finished marker)."""

    def record(shard: str) -> None:
        item_id = f"item-{layout.shard_index(shard):06d}"  # one item per shard, in manifest order
        writer.put_bytes(f"{layout.sidecars_prefix(plan.run_id, shard)}{item_id}.json", b"{}")
        writer.put_bytes(layout.stats_key(plan.run_id, shard), b"{}")

    list(pool.map(record, shards))


def finish_running_jobs(emulator: KubeEmulator, plan, writer, pool: ThreadPoolExecutor, launcher: str) -> int:
    """What the cluster does between passes: every running job writes its shard's records and succeeds."""
    (group, version, plural), done = DONE[launcher]
    running = [j for j in emulator.jobs(NAMESPACE, plural=plural) if not j["metadata"].get("deletionTimestamp")]
    running = [j for j in running if not (j.get("status") or {}).get("conditions")]
    write_records(
        plan, writer, [s for j in running for s in j["metadata"]["annotations"]["batchgen.io/shards"].split(",")], pool
    )
    with emulator._lock:
        for job in running:
            emulator._patch(
                emulator.kinds[(group, version, plural)],
                NAMESPACE,
                job["metadata"]["name"],
                {"status": {"conditions": [done]}},
                "status",
                "Warn",
            )
    return len(running)


def bench_settings(output: str, launcher: str) -> LaunchSettings:
    if launcher == "trainjob":  # weights by init container: a PVC that does not exist would keep pods unschedulable
        return LaunchSettings(
            output=output, namespace=NAMESPACE, gpus_per_node=1, model_s3_uri="s3://weights/mochi", trainer_api="v2.3"
        )
    return LaunchSettings(output=output, namespace=NAMESPACE, gpus_per_node=8, model_pvc="weights")


def run(groups: int, max_jobs: int, progress: Path | None = None, launcher: str = "pytorchjob") -> dict:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    moto, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    emulator = KubeEmulator(trainer_version="v2.3.0").start()
    try:
        output = new_bucket(endpoint)
        plan, plan_seconds, workdir = timed_plan(groups, output)
        kubeconfig = emulator.write_kubeconfig(workdir / "kubeconfig", NAMESPACE)
        settings = bench_settings(output, launcher)
        if launcher == "trainjob":
            emulator.put(render_trainingruntime(settings))
        backend = make_backend(launcher, NAMESPACE, load_api_client(str(kubeconfig)))
        storage, writer = open_storage(output), open_storage(output)
        controller = RunController(backend, storage, plan, settings, max_jobs=max_jobs, shards_per_job=1)
        passes = []
        with ThreadPoolExecutor(8) as pool:
            while True:
                api_before = len(emulator.calls)
                passes.append(
                    timed_pass(
                        controller,
                        storage,
                        lambda b=api_before: sum(1 for c in emulator.calls[b:] if c.user == emulator.user),
                    )
                )
                if progress is not None:  # a long run on a busy machine leaves its figures so far
                    progress.write_text(json.dumps(passes) + "\n")
                if passes[-1]["settled"]:
                    break
                finish_running_jobs(emulator, plan, writer, pool, launcher)
                emulator.wait_for_deletions()
    finally:
        emulator.stop()
        moto.terminate()
    return summarize(groups, max_jobs, plan_seconds, passes)


def new_bucket(endpoint: str) -> str:
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs"


def timed_plan(groups: int, output: str):
    workdir = Path(tempfile.mkdtemp(prefix="bench-controller-"))
    started = time.perf_counter()
    plan = make_run(groups, output, workdir)
    return plan, time.perf_counter() - started, workdir


def timed_pass(controller: RunController, storage, api_requests) -> dict:
    """One reconciliation pass: its seconds, the API requests (``api_requests()`` counts them afterwards) and the
    S3 requests the controller's storage made."""
    s3_before = storage.request_count
    tick = time.perf_counter()
    state = controller.reconcile()
    seconds = time.perf_counter() - tick
    return {
        "seconds": seconds,
        "api_requests": api_requests(),
        "s3_requests": storage.request_count - s3_before,
        "done_groups": state.count("done"),
        "created": len(state.created),
        "settled": state.settled,
    }


def summarize(groups: int, max_jobs: int, plan_seconds: float, passes: list[dict]) -> dict:
    # Full passes after the first: each deletes max_jobs finished jobs and creates max_jobs new ones.
    steady = [p for p in passes[1:] if p["created"] == max_jobs]
    tenth = max(1, len(steady) // 10)
    first, last = steady[:tenth], steady[-tenth:]

    def figures(chosen: list[dict]) -> dict:
        return {
            "done_groups": [chosen[0]["done_groups"], chosen[-1]["done_groups"]],
            "seconds_median": statistics.median(p["seconds"] for p in chosen),
            "api_requests_median": statistics.median(p["api_requests"] for p in chosen),
            "s3_requests_median": statistics.median(p["s3_requests"] for p in chosen),
        }

    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "groups": groups,
        "max_jobs": max_jobs,
        "plan_seconds": plan_seconds,
        "passes": len(passes),
        "steady_passes": len(steady),
        "seconds_per_pass_median": statistics.median(p["seconds"] for p in steady),
        "api_requests_per_pass_max": max(p["api_requests"] for p in passes),
        "s3_requests_per_pass_max": max(p["s3_requests"] for p in passes),
        "first_tenth": figures(first),
        "last_tenth": figures(last),
        "per_pass": passes,
    }


def print_figures(title: str, result: dict) -> None:
    print(
        f"{title}: {result['groups']} groups, max {result['max_jobs']} jobs: {result['passes']} passes, plan {result['plan_seconds']:.1f} s"
    )
    for name in ("first_tenth", "last_tenth"):
        part = result[name]
        print(
            f"  {name.replace('_', ' ')} (done groups {part['done_groups'][0]}-{part['done_groups'][1]}): "
            f"{part['seconds_median']:.3f} s, {part['api_requests_median']:.0f} API requests, "
            f"{part['s3_requests_median']:.0f} S3 requests per pass (median)"
        )
    for name, figures in result.get("control_plane", {}).items():
        print(
            f"  {name}: {figures['cpu_s']} CPU s, RSS {figures['rss_mib_end']} MiB at the end, peak {figures['peak_rss_mib']} MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=5000)
    parser.add_argument("--max-jobs", type=int, default=64)
    parser.add_argument("--output", type=Path, default=None, help=f"default {RESULTS} ({RESULTS_REAL} with --real)")
    parser.add_argument(
        "--real",
        action="store_true",
        help="TrainJobs on the real control plane (bench/controller_real.py), beside the emulator",
    )
    parser.add_argument(
        "--no-run", type=float, default=1.0, help="with --real: seconds each pod 'runs' (node agent --no-run)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    progress = Path(tempfile.gettempdir()) / "controller-cpu.passes.json"
    if args.real:
        from bench.controller_real import run_real

        result = {"emulator": run(args.groups, args.max_jobs, progress, launcher="trainjob")}
        result["real"] = run_real(args.groups, args.max_jobs, args.no_run, progress)
    else:
        result = run(args.groups, args.max_jobs, progress)
    output = args.output or (RESULTS_REAL if args.real else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    for title, part in result.items() if args.real else [("emulator (PyTorchJob)", result)]:
        print_figures(title, part)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
