"""A Helm-installed run end to end on the real control plane.

`helm install` (the built helm) puts the chart into a restricted namespace. The controller runs as the chart's Job
pod under its own ServiceAccount token (in-cluster config through the node agent's projected token) and creates
TrainJobs; the real Trainer renders JobSets, JobSet renders Jobs, the Job controller creates pods, kube-scheduler
binds them to two node agents, and each pod fetches the tiny model from S3 (moto) and runs torchrun across two
"nodes" (2 x 2 processes: Ulysses 2 x CFG 2) from the PET_* variables the Trainer injects.

Mid-run, `batchgen status --namespace` run from outside with a kubeconfig bound only to a read Role shows the
jobs; the controller is killed (its Job starts another, which adopts the running TrainJob); the run is stopped (the controller Job deleted, `batchgen cancel` deletes the TrainJobs); `helm upgrade`
starts the controller again, which resumes without regenerating what was committed, deletes finished jobs,
finalises the index and writes _SUCCESS.json. `helm uninstall` leaves the outputs.

Two settings differ from a real cluster, both because every pod shares this machine's loopback: one job at a
time (`run.maxJobs=1`; the Trainer's PET_MASTER_PORT is fixed) and no metrics ports (`metrics.port=0`).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.core import layout
from batchgen.core.plan import list_runs
from batchgen.storage import open_storage
from tests.realk8s.conftest import (
    ROOT,
    WORKER_NODES,
    container_logs,
    restricted_namespace,
    s3_objects,
    skip_module_unless_available,
    wait_for,
)
from tests.realk8s.test_server_side import CHART, helm
from tools.kube.node_agent import KubeApi

skip_module_unless_available()
pytestmark = pytest.mark.slow

ITEMS, SHARD_SIZE, SHARDS_PER_JOB = 8, 2, 2
IDS = [f"clip-{i:02d}" for i in range(ITEMS)]
RELEASE = "tiny"
CONTROLLER_JOB = f"{RELEASE}-batchgen-controller"  # the chart's componentName of "controller"
SECRET = "s3-credentials"
TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
JOBSETS = "/apis/jobset.x-k8s.io/v1alpha2"
TRAINER_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"  # the Trainer names a TrainJob's JobSet after it
READ_ROLE_RULES = [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["get", "list"]}]


def _chart_values(bucket: str, s3_server: str, weights: str) -> dict:
    return {
        "image": {"repository": "localhost/batchgen", "tag": "test"},
        "launcher": "trainjob",
        "trainer": {"apiVersion": "v2.3"},
        "run": {
            "manifest": f"s3://{bucket}/prompts.parquet",
            "output": f"s3://{bucket}/out",
            "maxJobs": 1,
            "shardsPerJob": SHARDS_PER_JOB,
            "maxJobAttempts": 2,
            "config": {
                "generation": {"num_frames": 13, "height": 64, "width": 64, "num_inference_steps": 2, "fps": 30},
                "worker": {"shard_size": SHARD_SIZE},
            },
        },
        "workers": {
            "nodes": 2,
            "gpusPerNode": 2,
            "ulyssesDegree": 2,
            "cfgDegree": 2,
            "shmSize": "1Gi",
            "scratchSize": "2Gi",
            "backoffLimit": 1,
            "activeDeadlineSeconds": 900,
            "terminationGracePeriodSeconds": 5,
        },  # fmt: skip
        "model": {"source": "s3", "numHeads": 4, "s3": {"uri": weights, "cacheSize": "1Gi"}},
        "s3": {"endpointUrl": s3_server, "region": "us-east-1", "credentialsSecret": {"name": SECRET}},
        "controller": {"verbosity": 1, "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}},
        "metrics": {"port": 0},
        "logFormat": "text",
    }


def _reader_kubeconfig(plane, admin: KubeApi, namespace: str, folder: Path) -> Path:
    """A ServiceAccount bound only to a Role that may read TrainJobs, as a kubeconfig holding its token."""
    base = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    admin.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": "reader"}})
    admin.request("POST", f"{base}/roles", {"metadata": {"name": "reader"}, "rules": READ_ROLE_RULES})
    binding = {
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    }
    admin.request("POST", f"{base}/rolebindings", binding)
    token = plane.kubectl("create", "token", "reader", "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(plane.kubeconfig.read_text())
    config["users"] = [{"name": "reader", "user": {"token": token}}]
    config["contexts"][0]["context"] = {"cluster": "local", "user": "reader", "namespace": namespace}
    path = folder / "reader.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def _batchgen(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "batchgen", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


class Release:
    def __init__(self, plane, namespace: str, values: Path, bucket: str, s3_client):
        self.plane, self.namespace, self.values, self.bucket = plane, namespace, values, bucket
        self.output = f"s3://{bucket}/out"
        self.admin = KubeApi(plane.kubeconfig)
        self.s3_client = s3_client

    def helm(self, *args: str) -> subprocess.CompletedProcess:
        done = helm(self.plane, *args, "--namespace", self.namespace)
        assert done.returncode == 0 and "Warning" not in done.stderr, f"helm {args[0]}: {done.stderr}"
        return done

    def trainjobs(self) -> list[dict]:
        return self.admin.request("GET", f"{TRAINER}/namespaces/{self.namespace}/trainjobs")["items"]

    def pods(self, selector: str) -> list[dict]:
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        return self.admin.request("GET", path, query={"labelSelector": selector})["items"]

    def running_workers(self) -> list[dict]:
        """Both worker pods of one TrainJob, when both are running (a finishing job's pods may overlap the next's)."""
        by_job: dict[str, list[dict]] = {}
        for pod in self.pods(JOBSET_LABEL):
            if pod["status"].get("phase") == "Running":
                by_job.setdefault(pod["metadata"]["labels"][JOBSET_LABEL], []).append(pod)
        return next((pods for pods in by_job.values() if len(pods) == 2), [])

    def jobsets(self) -> list[dict]:
        return self.admin.request("GET", f"{JOBSETS}/namespaces/{self.namespace}/jobsets")["items"]

    def trainjob_names(self) -> set[str]:
        return {job["metadata"]["name"] for job in self.trainjobs()}

    def controller_pods(self) -> list[dict]:
        return self.pods(f"batch.kubernetes.io/job-name={CONTROLLER_JOB}")

    def controller_job(self) -> dict | None:
        return self.admin.get(f"/apis/batch/v1/namespaces/{self.namespace}/jobs/{CONTROLLER_JOB}")

    def finished_controller(self) -> dict | None:
        job = self.controller_job()
        ended = [c for c in (job or {}).get("status", {}).get("conditions", []) if c["type"] in ("Complete", "Failed")]
        return job if any(c["status"] == "True" for c in ended) else None

    def logs(self) -> str:
        return container_logs(self.plane, self.namespace, 1200)[-8000:]


def _created(plane, namespace: str, resource: str) -> list[tuple[str, str]]:
    """From the API server's audit log: (name, time) of every object of ``resource`` created in ``namespace`` (a
    create or a server-side apply answered 201)."""
    created = []
    for line in plane.audit_log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef", {})
        if (ref.get("resource"), ref.get("namespace"), ref.get("subresource")) != (resource, namespace, None):
            continue
        if event["stage"] == "ResponseComplete" and event["responseStatus"]["code"] == 201:
            created.append((ref.get("name", ""), event["requestReceivedTimestamp"]))
    return created


def _kill_submit(manifest: str) -> None:
    """SIGKILL the controller container's `batchgen submit` (the node agent runs it as a local process)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if entry.name.isdigit() and "submit" in argv and manifest in argv:
            os.kill(int(entry.name), signal.SIGKILL)
            return
    raise AssertionError(f"no running `batchgen submit {manifest}` to kill")


def _trainer_env(pod: dict) -> dict[str, str]:
    """The PET_* variables the Trainer put on the trainer container, each resolved as the kubelet resolves it (a
    node's rank comes from the pod's Job completion index through the downward API)."""
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "node"]
    annotations = pod["metadata"]["annotations"]
    resolved = {}
    for entry in container.get("env", []):
        if entry["name"] not in TRAINER_ENV:
            continue
        path = entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
        found = re.fullmatch(r"metadata\.annotations\['(.+)'\]", path)
        resolved[entry["name"]] = annotations[found[1]] if found else entry.get("value", path)
    return resolved


def _prepared(plane, s3_server, s3_client, s3_credentials, weights, tmp_path) -> Release:
    """A restricted namespace with the S3 Secret, the prompts in a bucket and the chart values for them."""
    namespace = restricted_namespace(plane, "helm-run")
    bucket = "helm-run"
    s3_client.create_bucket(Bucket=bucket)
    prompts = pa.table({"id": IDS, "prompt": [f"a tiny red fox number {i}" for i in range(ITEMS)]})
    buffer = io.BytesIO()
    pq.write_table(prompts, buffer)
    s3_client.put_object(Bucket=bucket, Key="prompts.parquet", Body=buffer.getvalue())
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(_chart_values(bucket, s3_server, weights["tiny"])))
    release = Release(plane, namespace, values, bucket, s3_client)
    secret = {"metadata": {"name": SECRET}, "stringData": dict(s3_credentials)}
    release.admin.request("POST", f"/api/v1/namespaces/{namespace}/secrets", secret)
    return release


def _first_job_runs_across_two_nodes(release: Release) -> dict:
    """Both pods of the first TrainJob running, one on each node, with the Trainer's PET_* variables."""
    pods = wait_for("the first TrainJob's two running worker pods", release.running_workers, 300, release.logs)
    assert {p["spec"]["nodeName"] for p in pods} == set(WORKER_NODES)
    envs = sorted((_trainer_env(p) for p in pods), key=lambda e: e["PET_NODE_RANK"])
    ranks = [(e["PET_NNODES"], e["PET_NPROC_PER_NODE"], e["PET_NODE_RANK"]) for e in envs]
    assert ranks == [("2", "2", "0"), ("2", "2", "1")]
    # Named by the running pods, not by listing TrainJobs: one that has just finished may still be listed.
    (name,) = {p["metadata"]["labels"][JOBSET_LABEL] for p in pods}
    first = release.admin.get(f"{TRAINER}/namespaces/{release.namespace}/trainjobs/{name}")
    assert first is not None, f"TrainJob {name} of the running pods not found"
    assert envs[0]["PET_MASTER_ADDR"].startswith(f"{name}-node-0-0.")
    return first


def _kill_controller(release: Release) -> None:
    """A killed controller: its Job starts another pod, which adopts the running TrainJob instead of adding one."""
    (controller,) = release.controller_pods()
    _kill_submit(f"s3://{release.bucket}/prompts.parquet")

    def replacement() -> list[dict]:
        others = [p for p in release.controller_pods() if p["metadata"]["uid"] != controller["metadata"]["uid"]]
        return [p for p in others if p["status"].get("phase") == "Running"]

    wait_for("a second controller pod running", replacement, 120, release.logs)
    assert release.controller_job()["status"].get("failed") == 1


def _cancel(release: Release, run_id: str) -> tuple[dict, str]:
    """Stop the run once an item is committed: the controller Job first (else it would relaunch what cancel
    deletes), then `batchgen cancel`. Returns the objects committed by then and the time of the cancel."""
    plane, prefix = release.plane, f"{release.output}/{run_id}/"
    committed = wait_for(
        "a committed item before cancelling",
        lambda: {k: e for k, e in s3_objects(release.s3_client, prefix).items() if "/meta/" in k},
        300,
        release.logs,
    )
    plane.kubectl("delete", "job", CONTROLLER_JOB, "-n", release.namespace, "--cascade=foreground", "--timeout=120s")
    # Those not already being deleted (the killed controller may have deleted a finished one): cancel lists them.
    live = {j["metadata"]["name"] for j in release.trainjobs() if not j["metadata"].get("deletionTimestamp")}
    assert live, f"no TrainJob left to cancel\n{release.logs()}"
    cancelled_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cancel = _batchgen(
        "cancel", run_id, "--namespace", release.namespace, "--kubeconfig", str(plane.kubeconfig), "--launcher",
        "trainjob",
    )  # fmt: skip
    assert cancel.returncode == 0, cancel.stderr
    assert all(f"deleted {name}" in cancel.stdout for name in live), (live, cancel.stdout)
    wait_for("the cancelled TrainJobs gone", lambda: not release.trainjobs(), 120)
    wait_for("the cancelled JobSets gone", lambda: not release.jobsets(), 120)
    # Nothing of a cancelled job ran again. Under a foreground deletion the TrainJob stayed while its JobSet was
    # collected, and the Trainer brought back JobSet, Jobs and pods (TrainJobBackend.deletion_propagation). With the
    # background deletion the Trainer may still re-apply the JobSet once from its informer cache just after the
    # TrainJob is gone (seen in CI: 33 ms after the collector deleted it); the collector deletes that one too (its
    # owner is gone) before any Job is made from it.
    created = _created(plane, release.namespace, "jobsets") + _created(plane, release.namespace, "jobs")
    again = [(name, at) for name, at in created if at > cancelled_at and name.startswith(tuple(live))]
    assert len([name for name, _ in again if name in live]) <= len(live), again
    assert not [name for name, _ in again if name not in live], again  # no Job of a cancelled JobSet
    return committed, cancelled_at


def _resume_to_the_end(release: Release, run_id: str, committed: dict, cancelled_at: str) -> None:
    """`helm upgrade` recreates the controller Job; it resumes, finishes, finalises and deletes its jobs."""
    release.helm("upgrade", RELEASE, str(CHART), "-f", str(release.values))
    job = wait_for("the controller Job finished", release.finished_controller, 900, release.logs)
    assert any(c["type"] == "Complete" for c in job["status"]["conditions"]), (job["status"], release.logs())
    storage = open_storage(release.output)
    marker = json.loads(storage.get_bytes(layout.success_key(run_id)))
    index = pq.read_table(io.BytesIO(storage.get_bytes(layout.index_key(run_id))))
    assert sorted(index.column("id").to_pylist()) == IDS, marker  # every item once
    after = s3_objects(release.s3_client, f"{release.output}/{run_id}/")
    assert {k: after.get(k) for k in committed} == committed  # resumed: nothing committed was written again
    wait_for("the finished TrainJobs deleted by the controller", lambda: not release.trainjobs(), 120)
    # No TrainJob was created twice by the killed and the adopting controller, nor by the resumed one; a job
    # cancelled mid-way is created again by the resume under its own name (cancel deleted it).
    created = _created(release.plane, release.namespace, "trainjobs")
    for window in ([n for n, at in created if at < cancelled_at], [n for n, at in created if at > cancelled_at]):
        assert len(window) == len(set(window)), created
    assert len({name for name, _ in created}) == ITEMS // SHARD_SIZE // SHARDS_PER_JOB, created


def test_helm_installed_run_end_to_end(worker_nodes, s3_server, s3_client, s3_credentials, weights, tmp_path):
    release = _prepared(worker_nodes, s3_server, s3_client, s3_credentials, weights, tmp_path)
    reader = _reader_kubeconfig(worker_nodes, release.admin, release.namespace, tmp_path)
    release.helm("install", RELEASE, str(CHART), "-f", str(release.values))
    first = _first_job_runs_across_two_nodes(release)

    (run_id,) = list_runs(open_storage(release.output))
    cluster = ["--namespace", release.namespace, "--kubeconfig", str(reader), "--launcher", "trainjob"]
    listed = release.trainjob_names() | {first["metadata"]["name"]}
    status = _batchgen("status", release.output, *cluster)
    listed |= release.trainjob_names()  # the first job may finish while status runs; the next is then shown
    assert status.returncode == 0, status.stdout + status.stderr
    assert any(name in status.stdout for name in listed), (listed, status.stdout)

    _kill_controller(release)
    committed, cancelled_at = _cancel(release, run_id)
    _resume_to_the_end(release, run_id, committed, cancelled_at)
    release.helm("uninstall", RELEASE, "--wait")
    storage = open_storage(release.output)
    assert storage.exists(layout.success_key(run_id)) and storage.exists(layout.index_key(run_id))
