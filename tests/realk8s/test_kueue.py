"""batchgen's TrainJobs under the real Kueue v0.17 (its TrainJob integration) on the real control plane: Kueue's
webhook suspends each queue-labelled TrainJob on create, its scheduler admits it when the ClusterQueue has quota
(unsuspending it, so the Trainer renders the JobSet's pods), and evicts it again when its Workload is deactivated.
The assertions read what Kueue and the Trainer set (Workload conditions, TrainJob spec.suspend), sampled over time,
not batchgen's logs.

Each job asks for one GPU (one node of one process); the ClusterQueue's GPU quota fits one job, so Kueue, not
batchgen's --max-jobs, keeps the run to one job at a time (which the shared loopback needs anyway: see
test_lifecycle's module doc).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest

from batchgen.core import layout
from batchgen.core.plan import list_runs
from batchgen.launch.k8s import names
from batchgen.storage import open_storage
from tests.realk8s import test_lifecycle
from tests.realk8s.conftest import Poller, s3_objects, skip_module_unless_available, wait_for
from tests.realk8s.test_lifecycle import REPO, SUBMIT_TIMEOUT_S, Run
from tools.kube.node_agent import KubeApi

skip_module_unless_available()
pytestmark = pytest.mark.slow

KUEUE = "/apis/kueue.x-k8s.io/v1beta2"
QUEUE = "gpus"
make_run = test_lifecycle.make_run  # its fixture: one `batchgen submit` into a restricted namespace of its own


@pytest.fixture(scope="module")
def kueue(worker_nodes):
    """Kueue's manager on the session's control plane for this module only: its TrainJob webhook changes every
    TrainJob created while it runs."""
    if not (worker_nodes.bin / "kueue").exists():
        pytest.skip("kueue not built (tools/kube/kubebin.py records why)")
    worker_nodes.start_kueue()
    yield worker_nodes
    worker_nodes.stop_kueue()


def make_queue(run: Run, gpus: int) -> None:
    """A ResourceFlavor, a ClusterQueue for this namespace only with ``gpus`` GPUs of quota, and the LocalQueue
    ``QUEUE`` in it. CPU and memory are covered with room to spare: a pod's resources must all be covered."""
    name = f"cq-{run.namespace}"
    api = {"apiVersion": KUEUE.removeprefix("/apis/")}
    run.admin.request("POST", f"{KUEUE}/resourceflavors", {**api, "kind": "ResourceFlavor", "metadata": {"name": name}})
    resources = [
        {"name": "cpu", "nominalQuota": "64"},
        {"name": "memory", "nominalQuota": "256Gi"},
        {"name": "nvidia.com/gpu", "nominalQuota": str(gpus)},
    ]
    cluster_queue = {
        **api,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": run.namespace}},
            "resourceGroups": [
                {
                    "coveredResources": [r["name"] for r in resources],
                    "flavors": [{"name": name, "resources": resources}],
                }
            ],
        },
    }
    run.admin.request("POST", f"{KUEUE}/clusterqueues", cluster_queue)
    local_queue = {**api, "kind": "LocalQueue", "metadata": {"name": QUEUE}, "spec": {"clusterQueue": name}}
    run.admin.request("POST", f"{KUEUE}/namespaces/{run.namespace}/localqueues", local_queue)
    wait_for("an active ClusterQueue", lambda: _true(run.admin.get(f"{KUEUE}/clusterqueues/{name}"), "Active"), 60)


def _true(obj: dict | None, kind: str) -> bool:
    return any(
        c["type"] == kind and c["status"] == "True" for c in ((obj or {}).get("status") or {}).get("conditions", [])
    )


def workloads(run: Run) -> dict[str, dict]:
    """The namespace's Workloads by the TrainJob that owns each."""
    items = run.admin.request("GET", f"{KUEUE}/namespaces/{run.namespace}/workloads")["items"]
    return {
        ref["name"]: w for w in items for ref in w["metadata"].get("ownerReferences", []) if ref["kind"] == "TrainJob"
    }


@dataclass
class Sample:
    suspended: dict[str, bool]  # unfinished TrainJob -> spec.suspend (a finished one stays unsuspended)
    admitted: set[str]  # TrainJobs whose Workload holds quota and is not finished


class Sampler(Poller):
    """Lists the TrainJobs and Workloads every 0.3 s, for assertions over the whole run."""

    def __init__(self, run: Run):
        super().__init__()
        self.run = run
        self.samples: list[Sample] = []
        self._api = KubeApi(run.plane.kubeconfig)

    def tick(self) -> None:
        path = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{self.run.namespace}/trainjobs"
        trainjobs = self._api.request("GET", path)["items"]
        items = self._api.request("GET", f"{KUEUE}/namespaces/{self.run.namespace}/workloads")["items"]
        admitted = {
            ref["name"]
            for w in items
            if _true(w, "QuotaReserved") and not _true(w, "Finished")
            for ref in w["metadata"].get("ownerReferences", [])
        }
        unfinished = [j for j in trainjobs if not (_true(j, "Complete") or _true(j, "Failed"))]
        suspended = {j["metadata"]["name"]: bool(j["spec"].get("suspend")) for j in unfinished}
        self.samples.append(Sample(suspended, admitted))

    def ever_admitted(self) -> set[str]:
        return {name for s in self.samples for name in s.admitted}

    def ever_running(self) -> set[str]:
        return {name for s in self.samples for name, suspended in s.suspended.items() if not suspended}


def _index_ids(run: Run) -> list[str]:
    storage = open_storage(run.output)
    (run_id,) = list_runs(storage)
    assert storage.exists(layout.success_key(run_id))
    return sorted(pq.read_table(io.BytesIO(storage.get_bytes(layout.index_key(run_id)))).column("id").to_pylist())


def _status(run: Run) -> dict:
    argv = [sys.executable, "-m", "batchgen", "status", run.output, "--json", "--namespace", run.namespace]
    argv += ["--kubeconfig", str(run.plane.kubeconfig), "--launcher", "trainjob"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_a_clusterqueue_that_fits_one_job_admits_the_runs_trainjobs_one_at_a_time(kueue, make_run):
    items = 3
    run = make_run("kq-fifo", items=items, queue_name=QUEUE)
    make_queue(run, gpus=1)
    # One shard per item, one job per shard, and room for all three jobs at once on batchgen's side.
    run.submit_argv[run.submit_argv.index("--shard-size") + 1] = "1"
    run.submit_argv[run.submit_argv.index("--max-jobs") + 1] = str(items)
    with Sampler(run) as sampler:
        done = run.submit()
    assert done.returncode == 0, done.stderr[-4000:] + run.agent_logs()[-3000:]
    samples = sampler.samples
    assert samples, "nothing sampled"
    # Kueue let one job run at a time: never two Workloads holding quota, never two TrainJobs unsuspended.
    assert max(len(s.admitted) for s in samples) == 1, [s.admitted for s in samples if len(s.admitted) > 1]
    running_at_once = max(sum(not v for v in s.suspended.values()) for s in samples)
    assert running_at_once == 1, [s.suspended for s in samples]
    # batchgen created them together; the queue held the others back (suspended while another was admitted).
    assert max(len(s.suspended) for s in samples) >= 2
    assert any(s.admitted and any(v for n, v in s.suspended.items() if n not in s.admitted) for s in samples)
    # Each job was admitted once and ran; none was relaunched.
    assert len(sampler.ever_admitted()) == items and sampler.ever_running() == sampler.ever_admitted()
    assert all(name.endswith("-a1") for name in sampler.ever_admitted()), sampler.ever_admitted()
    assert _index_ids(run) == [f"kq-fifo-{i:02d}" for i in range(items)]  # every item once


def test_a_trainjob_kueue_evicts_waits_for_quota_and_resumes_without_regenerating_committed_items(
    kueue, make_run, s3_client
):
    items = 8
    # 20 steps: the pod is still generating when Kueue evicts it, a second after the first commit.
    run = make_run("kq-evict", items=items, queue_name=QUEUE, max_attempts=1, steps=20)
    make_queue(run, gpus=1)
    submit = subprocess.Popen(run.submit_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        with Sampler(run) as sampler:
            run.wait_first_commit(submit)
            ((name, workload),) = workloads(run).items()
            (first_job,) = run.jobs(name)
            (pod,) = run.pods(name)
            path = f"{KUEUE}/namespaces/{run.namespace}/workloads/{workload['metadata']['name']}"
            run.admin.merge_patch(path, {"spec": {"active": False}})  # what `kueuectl stop workload` does
            evicted = wait_for("an evicted TrainJob with no pods", lambda: _evicted(run, name, path), 120, run.describe)
            committed = s3_objects(s3_client, run.output)
            queued = _status(run)
            # Still queued well past a resync of the controller (--resync-seconds 2): nothing ended or relaunched.
            time.sleep(8)
            run_trainjob = run.trainjobs()[name]
            assert list(run.trainjobs()) == [name] and run_trainjob["spec"]["suspend"] is True
            run.admin.merge_patch(path, {"spec": {"active": True}})
            # The Job's activeDeadlineSeconds counts from its startTime, which starts again on resume: the time
            # spent queued does not count against the deadline (RFC 3339 UTC strings compare as times).
            started = first_job["status"]["startTime"]
            wait_for("the resumed Job's new start", lambda: _restarted(run, name, started), 120, run.describe, submit)
            out, err = submit.communicate(timeout=SUBMIT_TIMEOUT_S)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, err[-4000:] + run.agent_logs()[-3000:]
    assert _true(evicted, "Evicted") and not _true(evicted, "QuotaReserved"), evicted["status"]
    # batchgen's runtime patch (the run's pod labels) applied beside the one Kueue's webhook appends.
    patches = [patch["manager"] for patch in run_trainjob["spec"]["runtimePatches"]]
    assert sorted(patches) == ["batchgen.io/controller", "kueue.x-k8s.io/manager"], patches
    assert pod["metadata"]["labels"][names.RUN_LABEL] == run_trainjob["metadata"]["labels"][names.RUN_LABEL]
    # `batchgen status` showed it waiting for quota, not failed.
    (row,) = queued["jobs"]
    assert (row["name"], row["state"]) == (name, "Queued"), row
    assert row["reason"].startswith("waiting for quota") and QUEUE in row["reason"], row
    # Kueue suspended it (spec.suspend true) and admitted it again: the run went on in the same TrainJob.
    # (Its first admission can come before the first sample: the sequence may start unsuspended.)
    suspends = [s.suspended[name] for s in sampler.samples if name in s.suspended]
    changes = [v for i, v in enumerate(suspends) if i == 0 or v != suspends[i - 1]]
    assert changes[-3:] == [False, True, False] and len(changes) <= 4, changes
    progress = run.progress()[1]
    assert progress.done == items
    after = s3_objects(s3_client, run.output)
    assert {key: after.get(key) for key in committed} == committed  # same ETag and time: nothing written twice
    assert _index_ids(run) == [f"kq-evict-{i:02d}" for i in range(items)]


def _evicted(run: Run, trainjob: str, workload_path: str) -> dict | None:
    """The Workload, once Kueue evicted it, suspended its TrainJob and the pods are gone."""
    workload = run.admin.get(workload_path)
    suspended = run.trainjobs()[trainjob]["spec"].get("suspend")
    return workload if _true(workload, "Evicted") and suspended and not run.pods(trainjob) else None


def _restarted(run: Run, trainjob: str, started: str) -> bool:
    return any(job["status"].get("startTime", "") > started for job in run.jobs(trainjob))
