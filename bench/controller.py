"""Controller scale benchmark (CPU): writes bench/results/controller-cpu.json.

A run of ``--groups`` shard groups (one shard of one item each) with at most ``--max-jobs`` jobs running, driven
pass by pass: the real ``RunController`` reconciles against the Kubernetes API emulator (tests/k8s_emulator.py,
real HTTP, paged lists, foreground deletion) and a plan stored on a moto S3 server in its own process. Between
passes the "cluster" finishes every running job: its shard's sidecar and stats are written to S3 and the job is
marked Succeeded, so the next pass deletes it and launches the next group.

Per pass: seconds, API requests the controller made (the emulator's record for its identity) and S3 requests
the controller's storage made. The figures that matter: requests per pass must not grow with the number of
finished groups, so the JSON reports them for the first and the last tenth of the steady passes.

Usage: python bench/controller.py [--groups 5000] [--max-jobs 64]
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
from batchgen.launch.k8s.pytorchjob import PyTorchJobBackend  # noqa: E402
from batchgen.launch.k8s.settings import LaunchSettings  # noqa: E402
from batchgen.storage import open_storage  # noqa: E402
from tests.k8s_emulator import KubeEmulator  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "controller-cpu.json"
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


def finish_running_jobs(emulator: KubeEmulator, plan, writer, pool: ThreadPoolExecutor) -> int:
    """What the cluster does between passes: every running job writes its shard's records and succeeds."""
    running = [j for j in emulator.jobs(NAMESPACE) if not j["metadata"].get("deletionTimestamp")]
    running = [j for j in running if not (j.get("status") or {}).get("conditions")]
    shards = [s for j in running for s in j["metadata"]["annotations"]["batchgen.io/shards"].split(",")]

    def record(shard: str) -> None:
        item_id = f"item-{layout.shard_index(shard):06d}"  # one item per shard, in manifest order
        writer.put_bytes(f"{layout.sidecars_prefix(plan.run_id, shard)}{item_id}.json", b"{}")
        writer.put_bytes(layout.stats_key(plan.run_id, shard), b"{}")

    list(pool.map(record, shards))
    kind = emulator.kinds[("kubeflow.org", "v1", "pytorchjobs")]
    succeeded = {"status": {"conditions": [{"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}]}}
    with emulator._lock:
        for job in running:
            emulator._patch(kind, NAMESPACE, job["metadata"]["name"], succeeded, "status", "Warn")
    return len(running)


def run(groups: int, max_jobs: int, progress: Path | None = None) -> dict:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    moto, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    emulator = KubeEmulator().start()
    try:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        output = f"s3://{bucket}/runs"
        workdir = Path(tempfile.mkdtemp(prefix="bench-controller-"))
        started = time.perf_counter()
        plan = make_run(groups, output, workdir)
        plan_seconds = time.perf_counter() - started
        kubeconfig = emulator.write_kubeconfig(workdir / "kubeconfig", NAMESPACE)
        storage, writer = open_storage(output), open_storage(output)
        backend = PyTorchJobBackend(NAMESPACE, load_api_client(str(kubeconfig)))
        settings = LaunchSettings(output=output, namespace=NAMESPACE, gpus_per_node=8, model_pvc="weights")
        controller = RunController(backend, storage, plan, settings, max_jobs=max_jobs, shards_per_job=1)
        passes = []
        with ThreadPoolExecutor(8) as pool:
            while True:
                api_before, s3_before = len(emulator.calls), storage.request_count
                tick = time.perf_counter()
                state = controller.reconcile()
                seconds = time.perf_counter() - tick
                calls = emulator.calls[api_before:]
                passes.append(
                    {
                        "seconds": seconds,
                        "api_requests": sum(1 for call in calls if call.user == emulator.user),
                        "s3_requests": storage.request_count - s3_before,
                        "done_groups": state.count("done"),
                        "created": len(state.created),
                    }
                )
                if progress is not None:  # a long run on a busy machine leaves its figures so far
                    progress.write_text(json.dumps(passes) + "\n")
                if state.settled:
                    break
                finish_running_jobs(emulator, plan, writer, pool)
                emulator.wait_for_deletions()
    finally:
        emulator.stop()
        moto.terminate()
    return summarize(groups, max_jobs, plan_seconds, passes)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=5000)
    parser.add_argument("--max-jobs", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = run(args.groups, args.max_jobs, Path(tempfile.gettempdir()) / "controller-cpu.passes.json")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    first, last = result["first_tenth"], result["last_tenth"]
    print(
        f"{args.groups} groups, max {args.max_jobs} jobs: {result['passes']} passes, plan {result['plan_seconds']:.1f} s"
    )
    for name, part in (("first tenth", first), ("last tenth", last)):
        print(
            f"  {name} (done groups {part['done_groups'][0]}-{part['done_groups'][1]}): "
            f"{part['seconds_median']:.3f} s, {part['api_requests_median']:.0f} API requests, "
            f"{part['s3_requests_median']:.0f} S3 requests per pass (median)"
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
