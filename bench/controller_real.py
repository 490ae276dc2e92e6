"""`bench/controller.py --real`: the controller's passes against the real control plane (tools/kube/controlplane.py).

The same run as the emulator benchmark (one item per shard group, at most --max-jobs jobs), with TrainJobs that
the real Trainer, JobSet and Job controllers carry to pods; one node agent in --no-run mode completes each pod
with exit 0 after a delay. Between passes the bench waits until every job of the pass is Complete, then writes
its shard's records to S3 (what the workers would have written), so the next pass deletes it and launches the
next group. API requests per pass are counted from the API server's audit log (the controller has its own client
certificate user); the API server's and etcd's CPU seconds and memory are read from /proc.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from batchgen.launch.k8s import names
from batchgen.launch.k8s.client import load_api_client
from batchgen.launch.k8s.controller import RunController
from batchgen.launch.k8s.launchers import make_backend
from batchgen.launch.k8s.trainjob import render_trainingruntime
from batchgen.storage import open_storage
from bench.controller import (
    NAMESPACE,
    bench_settings,
    new_bucket,
    summarize,
    timed_pass,
    timed_plan,
    write_records,
)
from tools.kube import controlplane
from tools.kube.node_agent import KubeApi

CONTROLLER_USER = "bench-controller"
NODE = "bench-node"
TRAINJOBS = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs"
JOBS_DONE_TIMEOUT_S = 600


def usage(plane: controlplane.ControlPlane) -> dict[str, dict[str, float]]:
    """CPU seconds (user + system) and resident memory (now and peak, MiB) of kube-apiserver and etcd."""
    figures = {}
    for process in plane.started:
        if process.name not in ("kube-apiserver", "etcd"):
            continue
        pid = process.running_pid()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        figures[process.name] = {
            "cpu_s": (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
            "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
            "peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024,
        }
    return figures


def requests_since(audit_log: Path, offset: int) -> int:
    """Requests the controller's user made after byte ``offset`` of the audit log (one ResponseComplete each)."""
    with audit_log.open() as log:
        log.seek(offset)
        events = (json.loads(line) for line in log if line.strip())
        return sum(1 for e in events if e["stage"] == "ResponseComplete" and e["user"]["username"] == CONTROLLER_USER)


def wait_for_completion(admin: KubeApi, selector: str) -> list[dict]:
    """The run's TrainJobs once none is still running (each Complete or Failed, by the real controllers)."""
    deadline = time.monotonic() + JOBS_DONE_TIMEOUT_S
    while True:
        jobs = admin.request("GET", TRAINJOBS, query={"labelSelector": selector})["items"]
        ended = {"Complete", "Failed"}
        running = [
            j["metadata"]["name"]
            for j in jobs
            if not any(c["type"] in ended and c["status"] == "True" for c in j.get("status", {}).get("conditions", []))
        ]
        if not running:
            return jobs
        if time.monotonic() > deadline:
            raise SystemExit(
                f"bench: TrainJobs {running[:5]} (of {len(running)}) not finished after {JOBS_DONE_TIMEOUT_S} s"
            )
        time.sleep(0.5)


def start_plane(folder: Path, max_jobs: int, no_run_s: float) -> controlplane.ControlPlane:
    plane = controlplane.ControlPlane(folder / "plane", nodes=0)
    plane.start()
    plane.add_node(NODE, "--no-run", str(no_run_s), "--cpu", "1000", "--memory", "4Ti", "--gpus", str(max_jobs))
    plane.wait_nodes_ready()
    plane.kubectl("create", "namespace", NAMESPACE)
    return plane


def controller_kubeconfig(plane: controlplane.ControlPlane) -> Path:
    """Its own user (in system:masters: RBAC is not what this measures), so the audit log tells its requests apart."""
    pair = plane.pki.client(CONTROLLER_USER, CONTROLLER_USER, "system:masters")
    path = plane.root / f"{CONTROLLER_USER}.kubeconfig"
    return controlplane.pki.write_kubeconfig(path, plane.server, plane.pki.ca, pair, CONTROLLER_USER)


def run_real(groups: int, max_jobs: int, no_run_s: float, progress: Path | None = None) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-real-"))
    plane = start_plane(folder, max_jobs, no_run_s)
    try:
        os.environ.update(
            {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        )
        os.environ["AWS_ENDPOINT_URL"] = plane.s3_endpoint
        output = new_bucket(plane.s3_endpoint)
        plan, plan_seconds, _ = timed_plan(groups, output)
        settings = bench_settings(output, "trainjob")
        plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(render_trainingruntime(settings)))
        backend = make_backend("trainjob", NAMESPACE, load_api_client(str(controller_kubeconfig(plane))))
        storage, writer = open_storage(output), open_storage(output)
        controller = RunController(backend, storage, plan, settings, max_jobs=max_jobs, shards_per_job=1)
        admin, recorded, passes = KubeApi(plane.kubeconfig), set(), []
        before = usage(plane)
        with ThreadPoolExecutor(8) as pool:
            while True:
                offset = plane.audit_log.stat().st_size
                passes.append(timed_pass(controller, storage, lambda o=offset: requests_since(plane.audit_log, o)))
                if progress is not None:
                    progress.write_text(json.dumps(passes) + "\n")
                if passes[-1]["settled"]:
                    break
                jobs = wait_for_completion(admin, names.run_selector(plan.run_id))
                fresh = [j for j in jobs if j["metadata"]["name"] not in recorded]
                recorded.update(j["metadata"]["name"] for j in fresh)
                shards = [s for j in fresh for s in j["metadata"]["annotations"][names.SHARDS_ANNOTATION].split(",")]
                write_records(plan, writer, shards, pool)
        after = usage(plane)
    finally:
        plane.stop()
    result = summarize(groups, max_jobs, plan_seconds, passes)
    result["no_run_s"] = no_run_s
    result["control_plane"] = {
        name: {
            "cpu_s": round(after[name]["cpu_s"] - before[name]["cpu_s"], 1),
            "rss_mib_end": round(after[name]["rss_mib"], 1),
            "peak_rss_mib": round(after[name]["peak_rss_mib"], 1),
        }
        for name in after
    }
    return result
