"""The run lifecycle on the real control plane: `batchgen submit --launcher trainjob` creates TrainJobs, the real
Trainer renders each as a JobSet, JobSet renders a Job, the Job controller creates pods, kube-scheduler binds them
and the node agent runs them: the real weights fetch (init container) from S3 on moto, then torchrun ->
`batchgen worker` on the tiny model. Nothing here fakes an outcome: what happens to a failing job is what the
Job controller, JobSet and the Trainer decide, and the tests assert the conditions they set.

Faults are made the way they happen on a cluster: a preempted worker gets SIGTERM (a watcher here signals the
run's worker processes as they start: exit 143), the weights are missing (the fetch exits 3) or are no model (the
worker exits 2), a pod is deleted, a worker hangs (SIGSTOP) past activeDeadlineSeconds.

One job runs at a time (`--max-jobs 1`, one group per run): every pod shares the host's loopback, so two
torchrun rendezvous on the Trainer's fixed PET_MASTER_PORT would collide.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.core import layout
from batchgen.core.plan import list_runs, load_plan
from batchgen.core.progress import scan_run
from batchgen.launch.k8s import names
from batchgen.launch.k8s.pod import FETCH_CONTAINER
from batchgen.launch.k8s.settings import LaunchSettings
from batchgen.launch.k8s.trainjob import render_trainingruntime
from batchgen.storage import open_storage
from tests.realk8s.conftest import (
    container_logs,
    restricted_namespace,
    s3_objects,
    skip_module_unless_available,
    wait_for,
)
from tools.kube.node_agent import KubeApi

skip_module_unless_available()
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3-credentials"
TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
JOBSETS = "/apis/jobset.x-k8s.io/v1alpha2"
PYTORCHJOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
BACKOFF_LIMIT = 1
SUBMIT_TIMEOUT_S = 420


@dataclass
class Run:
    """One `batchgen submit` into its own restricted namespace, with the TrainingRuntime its settings render."""

    plane: object
    admin: KubeApi
    namespace: str
    output: str
    values: Path
    tmp: Path
    submit_argv: list[str] = field(default_factory=list)

    def submit(self, timeout_s: float = SUBMIT_TIMEOUT_S) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.submit_argv, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"batchgen submit did not finish in {timeout_s:.0f} s; TrainJobs: {self.describe()}\n"
                f"stderr: {(e.stderr or b'')[-3000:]!r}\n{self.agent_logs()[-4000:]}"
            ) from None

    def list(self, path: str, selector: str | None = None) -> list[dict]:
        query = {"labelSelector": selector} if selector else None
        return self.admin.request("GET", path.format(ns=self.namespace), query=query)["items"]

    def trainjobs(self) -> dict[str, dict]:
        return {j["metadata"]["name"]: j for j in self.list(TRAINER + "/namespaces/{ns}/trainjobs")}

    def jobs(self, trainjob: str) -> list[dict]:
        return self.list("/apis/batch/v1/namespaces/{ns}/jobs", f"jobset.sigs.k8s.io/jobset-name={trainjob}")

    def pods(self, trainjob: str) -> list[dict]:
        return self.list("/api/v1/namespaces/{ns}/pods", f"jobset.sigs.k8s.io/jobset-name={trainjob}")

    def jobset(self, trainjob: str) -> dict:
        return self.admin.request("GET", f"{JOBSETS}/namespaces/{self.namespace}/jobsets/{trainjob}")

    def describe(self) -> str:
        return json.dumps({n: j.get("status", {}) for n, j in self.trainjobs().items()})[:3000]

    def agent_logs(self) -> str:
        return container_logs(self.plane, self.namespace)

    def pod_log(self, pod: dict, container: str = "node") -> str:
        meta = pod["metadata"]
        node = pod["spec"]["nodeName"]
        folder = self.plane.root / node / "root" / "logs" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        return (folder / container / "0.log").read_text(errors="replace")

    def progress(self):
        storage = open_storage(self.output)
        (run_id,) = list_runs(storage)
        return run_id, scan_run(storage, load_plan(storage, run_id))


def conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", []) if c["status"] == "True"}


@pytest.fixture
def make_run(
    worker_nodes, s3_server, s3_client, s3_credentials, tiny_model_dir, weights, tmp_path
) -> Callable[..., Run]:
    plane = worker_nodes
    admin = KubeApi(plane.kubeconfig)
    made = []

    def make(name: str, items: int, model: str = "tiny", max_attempts: int = 2, steps: int = 2, **launch) -> Run:
        namespace = restricted_namespace(plane, f"{name}-{os.urandom(3).hex()}")
        made.append(namespace)
        secret = {"metadata": {"name": SECRET}, "stringData": dict(s3_credentials)}
        admin.request("POST", f"/api/v1/namespaces/{namespace}/secrets", secret)
        bucket = f"out-{namespace}"
        s3_client.create_bucket(Bucket=bucket)
        output = f"s3://{bucket}/run"
        values = {
            "namespace": namespace, "image": "localhost/batchgen:test", "nodes": 1, "gpus_per_node": 1,
            "num_heads": 4, "model_s3_uri": weights[model], "s3_endpoint": s3_server, "s3_region": "us-east-1",
            "s3_secret": SECRET, "backoff_limit": BACKOFF_LIMIT, "active_deadline_seconds": 600,
            "termination_grace_seconds": 5, "trainer_api": "v2.3", "launcher": "trainjob", **launch,
        }  # fmt: skip
        values_file = tmp_path / f"{name}-values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        # What the chart installs beside the controller: the runtime the TrainJobs reference, from the same settings.
        if values["launcher"] == "trainjob":
            runtime = render_trainingruntime(LaunchSettings.from_dict({**values, "output": output}))
            plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(runtime))
        manifest = tmp_path / f"{name}.parquet"
        ids = [f"{name}-{i:02d}" for i in range(items)]
        pq.write_table(pa.table({"id": ids, "prompt": [f"a tiny red fox number {i}" for i in range(items)]}), manifest)
        run = Run(plane, admin, namespace, output, values_file, tmp_path)
        run.submit_argv = [
            sys.executable, "-m", "batchgen", "submit", str(manifest), "--output", output,
            "--config", str(tiny_model_dir / "batchgen-tiny.toml"), "--steps", str(steps), "--shard-size", str(items),
            "--kubeconfig", str(plane.kubeconfig), "--values", str(values_file), "--max-jobs", "1", "--wait",
            "--max-attempts", str(max_attempts), "--resync-seconds", "2",
        ]  # fmt: skip
        return run

    yield make
    for namespace in made:
        plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


class WorkerSignaller:
    """Sends ``signum`` to every `batchgen worker` process of one output as soon as it appears: what a node
    under memory pressure or a preemption does to a container's main process. torchrun (batchgen.launch.k8s.torchrun)
    sees its child die of the signal and exits 128 + signum, as the pod's exit code."""

    def __init__(self, output: str, signum: int):
        self.output, self.signum = output, signum
        self.signalled: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _workers(self) -> Iterator[int]:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            text = [a.decode(errors="replace") for a in argv]
            if "worker" in text and self.output in text and "batchgen.launch.k8s.torchrun" not in text:
                yield int(entry.name)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid in self._workers():
                if pid not in self.signalled:
                    try:
                        os.kill(pid, self.signum)
                        self.signalled.add(pid)
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)

    def __enter__(self) -> WorkerSignaller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.signum == signal.SIGSTOP:
            for pid in self.signalled:  # let a stopped one take its SIGKILL
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass


def _assert_failed_like_its_jobset(run: Run, name: str, trainjob: dict) -> None:
    """JobSet fails with its Job (failurePolicy.maxRestarts 0), and the Trainer copies the JobSet's Failed condition
    onto the TrainJob (kubeflow/trainer v2.3 pkg/runtime/framework/plugins/jobset/jobset.go)."""
    jobset_failed = conditions(run.jobset(name))["Failed"]
    assert conditions(trainjob)["Failed"]["reason"] == jobset_failed["reason"], (trainjob["status"], jobset_failed)


def _job_failure(run: Run, trainjob: str) -> tuple[dict, list[dict]]:
    (job,) = run.jobs(trainjob)
    return conditions(job), run.pods(trainjob)


def test_a_worker_that_always_exits_143_fails_each_attempt_after_backoff_limit_plus_one_pods(make_run):
    run = make_run("sigterm", items=2)
    with WorkerSignaller(run.output, signal.SIGTERM) as signaller:
        done = run.submit()
    assert done.returncode == 5, done.stderr[-4000:] + run.agent_logs()[-3000:]
    assert signaller.signalled
    run_id, progress = run.progress()
    assert progress.done == 0
    trainjobs = run.trainjobs()
    group = names.job_name(run_id, 0, 0, 1)[: -len("-a1")]
    assert sorted(trainjobs) == [f"{group}-a1", f"{group}-a2"]  # --max-attempts 2: relaunched once
    for name, trainjob in trainjobs.items():
        job_conditions, pods = _job_failure(run, name)
        # The Job controller: each pod exited 143 (not in the FailJob rule's 1-127), counted against backoffLimit.
        assert job_conditions["Failed"]["reason"] == "BackoffLimitExceeded", job_conditions
        assert len(pods) == BACKOFF_LIMIT + 1
        exit_codes = [p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in pods]
        assert exit_codes == [143] * len(pods)
        # JobSet (failurePolicy.maxRestarts 0) fails at once, and the Trainer copies its Failed condition.
        _assert_failed_like_its_jobset(run, name, trainjob)
    assert "relaunching shards shard-000000 as attempt 2" in done.stderr


@pytest.mark.parametrize(
    ("model", "container", "exit_code"),
    [("not-a-model", "node", 2), ("empty", FETCH_CONTAINER, 3)],
    ids=["worker-exits-2", "fetch-fails"],
)
def test_a_permanent_failure_ends_the_job_at_once_through_the_pod_failure_policy(make_run, model, container, exit_code):
    run = make_run(f"perm-{exit_code}", items=2, model=model, max_attempts=1)
    done = run.submit()
    assert done.returncode == 5, done.stderr[-4000:] + run.agent_logs()[-3000:]
    ((name, trainjob),) = run.trainjobs().items()
    job_conditions, pods = _job_failure(run, name)
    assert job_conditions["Failed"]["reason"] == "PodFailurePolicy", job_conditions
    assert len(pods) == 1  # no retry: FailJob
    status = pods[0]["status"]
    statuses = {c["name"]: c for c in status.get("initContainerStatuses", []) + status["containerStatuses"]}
    assert statuses[container]["state"]["terminated"]["exitCode"] == exit_code, statuses
    _assert_failed_like_its_jobset(run, name, trainjob)


def test_a_hung_worker_is_ended_by_active_deadline_seconds(make_run):
    run = make_run("deadline", items=2, max_attempts=1, active_deadline_seconds=30)
    with WorkerSignaller(run.output, signal.SIGSTOP) as signaller:
        done = run.submit()
    assert done.returncode == 5, done.stderr[-4000:] + run.agent_logs()[-3000:]
    assert signaller.signalled, "no worker started within the deadline: the job was slow, not hung"
    ((name, trainjob),) = run.trainjobs().items()
    job_conditions, _ = _job_failure(run, name)
    assert job_conditions["Failed"]["reason"] == "DeadlineExceeded", job_conditions
    _assert_failed_like_its_jobset(run, name, trainjob)


def test_a_deleted_pod_is_replaced_and_resumes_without_regenerating_committed_items(make_run, s3_client):
    # Items slow enough that the first pod is still generating when it is deleted: at 2 steps a tiny item takes
    # about 0.2 s, and the first pod could finish them all between the first commit and the deletion, leaving
    # nothing to replace.
    items = 8
    run = make_run("preempted", items=items, max_attempts=1, steps=40)
    submit = subprocess.Popen(run.submit_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(
            "first committed item",
            lambda: list_runs(open_storage(run.output)) and run.progress()[1].done,
            300,
            run.agent_logs,
            submit,
        )
        committed = s3_objects(s3_client, run.output)
        done_before = [i for shard in run.progress()[1].shards.values() for i in shard.done_ids]
        ((name, _),) = run.trainjobs().items()
        (pod,) = run.pods(name)
        run.admin.request("DELETE", f"/api/v1/namespaces/{run.namespace}/pods/{pod['metadata']['name']}")
        replacement = wait_for(
            "replacement pod",
            lambda: [p for p in run.pods(name) if p["metadata"]["uid"] != pod["metadata"]["uid"]],
            120,
            run.agent_logs,
            submit,
        )
        (job,) = run.jobs(name)
        out, err = submit.communicate(timeout=SUBMIT_TIMEOUT_S)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, err[-4000:] + run.agent_logs()[-3000:]
    assert len(replacement) == 1 and job["status"].get("failed") == 1, job["status"]  # counted against backoffLimit
    _, progress = run.progress()
    assert progress.done == items
    after = s3_objects(s3_client, run.output)
    # Every object the first pod committed is still the one it wrote: nothing was generated twice.
    assert {key: after.get(key) for key in committed} == committed
    # The replacement's worker found them done in storage (batchgen/worker.py's scan line).
    found = re.search(
        rf"shard-000000: {items} items, (\d+) already done, \d+ adopted, \d+ copied, (\d+) to generate",
        run.pod_log(replacement[0]),
    )
    assert found and int(found[1]) >= len(done_before) and int(found[1]) + int(found[2]) == items, run.agent_logs()


def test_a_pytorchjob_run_completes_through_the_real_operator(make_run, worker_nodes):
    """The same run as the TrainJob path, launched as a PyTorchJob: the operator creates the Master pod and its
    Service, torchrun runs two ranks (Ulysses 2), every item is committed once, and the controller deletes its
    finished job and finalises the run. One node: in a `restricted` namespace the operator's own `init-pytorch`
    container on Worker pods is refused (test_server_side.py shows it; docs/kubernetes.md documents it)."""
    if not any(p.name == "training-operator" for p in worker_nodes.started):
        pytest.skip("training-operator.v1 not built (tools/kube/kubebin.py records why)")
    run = make_run("ptj-run", items=4, launcher="pytorchjob", gpus_per_node=2, ulysses_degree=2)
    done = run.submit()
    assert done.returncode == 0, done.stderr[-4000:] + run.agent_logs()[-3000:]
    run_id, progress = run.progress()
    assert progress.done == progress.total == 4
    storage = open_storage(run.output)
    index = pq.read_table(io.BytesIO(storage.get_bytes(layout.index_key(run_id))))
    assert sorted(index.column("id").to_pylist()) == [f"ptj-run-{i:02d}" for i in range(4)]
    assert storage.exists(layout.success_key(run_id))
    wait_for("the finished PyTorchJob deleted by the controller", lambda: not run.list(PYTORCHJOBS), 120)
    assert done.stderr.count("created job ") == 1, done.stderr[-4000:]  # one attempt, no relaunch


def test_pytorchjob_exiting_143_is_stopped_by_the_controller_past_backoff_limit(make_run, worker_nodes):
    """The v1 training operator (restartPolicy ExitCode) recreates a pod that exits 143 without counting it
    against backoffLimit; batchgen's controller counts the restarts from the job's status and ends the job past
    the limit (runPolicy.activeDeadlineSeconds 1), as the operator's own retry semantics require. The count is
    recorded on the job: the controller is killed after the first restart, and the one started after it stops the
    job at the second (counting from zero it would let a third happen)."""
    if not any(p.name == "training-operator" for p in worker_nodes.started):
        pytest.skip("training-operator.v1 not built (tools/kube/kubebin.py records why)")
    run = make_run("ptj", items=2, launcher="pytorchjob", max_attempts=1)
    with WorkerSignaller(run.output, signal.SIGTERM) as signaller:
        first = subprocess.Popen(run.submit_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            wait_for(
                "a restart recorded on the PyTorchJob", lambda: _recorded_restarts(run), 300, run.agent_logs, first
            )
        finally:
            first.kill()
            first.communicate()
        assert _recorded_restarts(run) == ["1"]
        done = run.submit()
    assert done.returncode == 5, done.stderr[-4000:] + run.agent_logs()[-3000:]
    assert len(signaller.signalled) > BACKOFF_LIMIT  # the operator did recreate the pod
    ((name, job),) = {j["metadata"]["name"]: j for j in run.list(PYTORCHJOBS)}.items()
    assert f"job {name}: going on from the 1 pod restart(s) recorded on it" in done.stderr, done.stderr[-4000:]
    assert "pods restarted 2 times" in job["metadata"]["annotations"][names.ENDED_ANNOTATION], job["metadata"]
    assert job["metadata"]["annotations"][names.RESTARTS_ANNOTATION] == "2"
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 1
    assert "Failed" in conditions(job), job["status"]


def _recorded_restarts(run: Run) -> list[str]:
    annotations = [j["metadata"].get("annotations") or {} for j in run.list(PYTORCHJOBS)]
    return [a[names.RESTARTS_ANNOTATION] for a in annotations if names.RESTARTS_ANNOTATION in a]
