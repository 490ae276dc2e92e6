"""A local stand-in for the Kubeflow training operator, driving PyTorchJobs on the API emulator.

For every PyTorchJob it starts one local process per pod (Master, then Workers) running the pod's own command,
with the environment the real operator and kubelet give it:
- container ``env`` values, and ``secretKeyRef`` entries resolved from ``secrets`` (as the kubelet would);
- ``MASTER_ADDR``/``PET_MASTER_ADDR`` = 127.0.0.1 (the master pod's Service), ``MASTER_PORT``/``PET_MASTER_PORT`` = a
  free port, ``WORLD_SIZE`` = pods x nprocPerNode, ``PET_NNODES``, ``PET_NPROC_PER_NODE``, and ``RANK`` =
  ``PET_NODE_RANK`` = the pod's index (Master 0, Worker i -> i + 1).
Image paths are mapped to local ones through ``path_map`` (e.g. the model mount to the tiny model); ``python`` is
this interpreter. Status conditions (Created, Running, Restarting, Succeeded, Failed), ``startTime`` and
replicaStatuses are written through the status subresource.

Retries follow the real v1 operator (kubeflow/training-operator v1.9, ``pkg/controller.v1/common/pod.go``
``ReconcilePods`` and ``job.go`` ``ReconcileJobs``), not what its docs suggest:
- ``restartPolicy: ExitCode``: a pod whose ``pytorch`` container exited >= 128 is deleted and recreated, with a
  Restarting condition; recreated pods are never counted against ``backoffLimit`` (which counts only container
  restarts inside running pods, and ExitCode pods run with ``restartPolicy: Never``), so they retry forever;
- a pod that failed in an init container has no ``pytorch`` exit code, so the operator's default 0xbeef applies:
  retryable, recreated forever too;
- 1-127 fails the job at once; ``runPolicy.activeDeadlineSeconds`` (re-read every pass, so a patch applies)
  fails it once ``now - startTime`` reaches it, with the operator's message, and deletes its pods.
Init containers run in order before the ``pytorch`` container, as the kubelet does.
``cleanPodPolicy: Running``: when the job ends, pods still running are killed. ``fail_first_attempt(job)``
selects jobs whose attempt-1 Master exits 1 instead of running; ``sabotage(job)`` may edit a job's spec before
its pods are made (a test's fault injection: a command that always exits 143, a weights URI that does not exist).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from tests._local_pods import LocalPodController, free_port, kill_process_tree, now
from tests.k8s_emulator import OPERATOR_TOKEN

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


@dataclass
class Pod:
    name: str
    rtype: str
    index: int
    node_rank: int
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    init: list[tuple[list[str], dict[str, str]]] = field(default_factory=list)
    """Init containers (argv, env), run in order before ``argv``."""
    process: Any = None
    stage: int = 0
    """Index into init containers; len(init) = the pytorch container."""
    recreated: int = 0
    exit_code: int | None = None
    """The pytorch container's exit code; None while running or when an init container failed."""
    failed: bool = False


@dataclass
class JobRun:
    name: str
    uid: str
    pods: list[Pod]
    started: float = field(default_factory=time.monotonic)
    start_time: str = field(default_factory=now)
    conditions: list[dict[str, Any]] = field(default_factory=list)
    completion_time: str | None = None
    """When the job ended (RFC 3339, as status.completionTime); None while it runs."""

    @property
    def finished(self) -> bool:
        return self.completion_time is not None


class FakeOperator(LocalPodController):
    name = "fake operator"

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        workdir: Path,
        *,
        fail_first_attempt: Callable[[dict[str, Any]], bool] | None = None,
        sabotage: Callable[[dict[str, Any]], None] | None = None,
        **options: Any,
    ):
        super().__init__(kubeconfig, namespace, workdir, token=OPERATOR_TOKEN, **options)
        self.fail_first_attempt = fail_first_attempt
        self.sabotage = sabotage
        self.runs: dict[str, JobRun] = {}

    def _processes(self) -> Iterator[Any]:
        return (pod.process for run in self.runs.values() for pod in run.pods)

    def _argv(self, container: dict[str, Any]) -> list[str]:
        return self.container_argv(container.get("command", []) + container.get("args", []))

    def _pods(self, job: dict[str, Any]) -> list[Pod]:
        if self.sabotage is not None:
            self.sabotage(job)
        name = job["metadata"]["name"]
        specs = job["spec"]["pytorchReplicaSpecs"]
        nproc = int(job["spec"].get("nprocPerNode") or 1)
        replicas = [("Master", i) for i in range(int(specs["Master"].get("replicas", 1)))]
        if "Worker" in specs:
            replicas += [("Worker", i) for i in range(int(specs["Worker"].get("replicas", 0)))]
        port = free_port()
        injected_failure = (
            self.fail_first_attempt is not None
            and job["metadata"]["labels"].get("batchgen.io/attempt") == "1"
            and self.fail_first_attempt(job)
        )
        pods = []
        for node_rank, (rtype, index) in enumerate(replicas):
            pod_spec = specs[rtype]["template"]["spec"]
            container = next(c for c in pod_spec["containers"] if c["name"] == "pytorch")
            argv = self._argv(container)
            init = [(self._argv(c), self.container_env(c)) for c in pod_spec.get("initContainers", [])]
            if injected_failure and rtype == "Master":
                argv = [sys.executable, "-c", "import sys; sys.exit(1)"]
            env = {
                **self.container_env(container),
                "MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "PET_MASTER_PORT": str(port),
                "WORLD_SIZE": str(len(replicas) * nproc),
                "PET_NNODES": str(len(replicas)),
                "PET_NPROC_PER_NODE": str(nproc),
                "PET_NODE_RANK": str(node_rank),
                "RANK": str(node_rank),
            }
            pod_name = f"{name}-{rtype.lower()}-{index}"
            self.mount_volumes([container, *pod_spec.get("initContainers", [])])
            log_path = self.log_path(pod_name)
            pods.append(Pod(pod_name, rtype, index, node_rank, argv, env, log_path, init))
        return pods

    def _spawn(self, pod: Pod, stage: int = 0) -> None:
        """Start the pod's container number ``stage`` (init containers first, then pytorch)."""
        argv, env = pod.init[stage] if stage < len(pod.init) else (pod.argv, pod.env)
        pod.process = self.spawn(argv, env, pod.log_path)
        pod.stage, pod.exit_code, pod.failed = stage, None, False

    def _kill(self, pod: Pod) -> None:
        kill_process_tree(pod.process)

    # -- status ----------------------------------------------------------------------------------------------

    def _set_condition(self, run: JobRun, kind: str, reason: str, message: str) -> None:
        stamp = now()
        for c in run.conditions:
            if (
                c["type"] in ("Running", "Restarting")
                and c["type"] != kind
                and kind in ("Running", "Restarting", "Succeeded", "Failed")
            ):
                c["status"] = "False"
        existing = next((c for c in run.conditions if c["type"] == kind), None)
        entry = {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastUpdateTime": stamp,
            "lastTransitionTime": stamp,
        }
        if existing:
            existing.update(entry)
        else:
            run.conditions.append(entry)
        replica_statuses: dict[str, dict[str, int]] = {}
        for pod in run.pods:
            counts = replica_statuses.setdefault(pod.rtype, {"active": 0, "succeeded": 0, "failed": 0})
            if pod.process is not None and pod.process.poll() is None:
                counts["active"] += 1
            elif pod.exit_code == 0:
                counts["succeeded"] += 1
            elif pod.failed:
                counts["failed"] += 1
        status: dict[str, Any] = {
            "conditions": run.conditions,
            "replicaStatuses": replica_statuses,
            "startTime": run.start_time,
        }
        if run.finished:
            status["completionTime"] = run.completion_time
        try:
            self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, run.name, {"status": status}
            )
        except client.exceptions.ApiException as e:
            if e.status != 404:  # deleted meanwhile
                raise

    # -- the loop --------------------------------------------------------------------------------------------

    def _tick(self) -> None:
        jobs = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"]
        # A job being deleted (foreground) loses its pods first: the garbage collector deletes them.
        present = {j["metadata"]["uid"]: j for j in jobs if not j["metadata"].get("deletionTimestamp")}
        for uid, run in list(self.runs.items()):
            if uid not in present:
                for pod in run.pods:
                    self._kill(pod)
                del self.runs[uid]
        for uid, job in present.items():
            run = self.runs.get(uid)
            if run is None:
                run = JobRun(job["metadata"]["name"], uid, self._pods(job))
                self.runs[uid] = run
                self.started_jobs.append(run.name)
                self._set_condition(run, "Created", "PyTorchJobCreated", f"PyTorchJob {run.name} is created.")
                for pod in run.pods:
                    self._spawn(pod)
                self._set_condition(run, "Running", "PyTorchJobRunning", f"PyTorchJob {run.name} is running.")
                continue
            if not run.finished and self._past_deadline(run, job):
                self._end(run, "Failed", "PyTorchJobFailed",
                          f"Job {run.name} has failed because it was active longer than specified deadline")  # fmt: skip
            elif not run.finished:
                self._advance(run)
        self.peak_running = max(self.peak_running, sum(1 for r in self.runs.values() if not r.finished))

    @staticmethod
    def _past_deadline(run: JobRun, job: dict[str, Any]) -> bool:
        # core.PastActiveDeadline: now - status.startTime >= runPolicy.activeDeadlineSeconds.
        deadline = (job["spec"].get("runPolicy") or {}).get("activeDeadlineSeconds")
        return deadline is not None and time.monotonic() - run.started >= int(deadline)

    def _end(self, run: JobRun, kind: str, reason: str, message: str) -> None:
        run.completion_time = now()
        for pod in run.pods:  # cleanPodPolicy: Running (and DeletePodsAndServices on failure)
            self._kill(pod)
        self._set_condition(run, kind, reason, message)

    def _advance(self, run: JobRun) -> None:
        for pod in run.pods:
            if pod.process is None or pod.exit_code is not None or pod.failed:
                continue
            code = pod.process.poll()
            if code is None:
                continue
            code = 128 - code if code < 0 else code
            if pod.stage < len(pod.init):
                if code == 0:
                    self._spawn(pod, pod.stage + 1)
                    continue
                self._log.info("pod %s: init container %d exited %s", pod.name, pod.stage, code)
                pod.failed = True  # no pytorch exit code: the operator's 0xbeef, which is retryable
            else:
                pod.exit_code = code
                pod.failed = code != 0
                self._log.info("pod %s exited %s", pod.name, code)
            if not pod.failed:
                continue
            if pod.exit_code is None or pod.exit_code >= 128:
                # ReconcilePods: delete the pod (it is recreated on the next pass), condition Restarting. Nothing
                # counts these against backoffLimit.
                pod.recreated += 1
                self._set_condition(run, "Restarting", "PyTorchJobRestarting",
                                    f"job {run.name} is restarting because {pod.rtype} replica(s) failed.")  # fmt: skip
                self._spawn(pod)
                self._set_condition(run, "Running", "PyTorchJobRunning", f"PyTorchJob {run.name} is running.")
                continue
            self._end(run, "Failed", "PyTorchJobFailed",
                      f"{pod.rtype} replica {pod.index} ({pod.name}) exited with code {pod.exit_code}")  # fmt: skip
            return
        master = next(p for p in run.pods if p.rtype == "Master")
        if master.exit_code == 0:
            self._end(run, "Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {run.name} is successfully completed.")
