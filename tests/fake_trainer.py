"""A local stand-in for Kubeflow Trainer v2 and the JobSet and Job controllers under it, on the API emulator.

What it models, and where the real behaviour is defined:
- kubeflow/trainer ``pkg/runtime/framework/plugins/jobset`` (builder.go): the TrainJob's runtime (a namespaced
  TrainingRuntime from ``spec.runtimeRef``) becomes a JobSet; ``spec.trainer`` overrides the ``node`` container's
  image, command and resources, ``numNodes`` the Job's parallelism and completions; the pod patch
  (``podTemplateOverrides`` in v2.1, ``runtimePatches`` from v2.2) adds its labels to the pods.
- kubeflow/trainer ``pkg/runtime/framework/plugins/torch/torch.go``: the torch plugin injects ``PET_NNODES``,
  ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` (the Job completion index) and ``PET_MASTER_ADDR``/``PORT`` (29400).
- kubernetes ``pkg/controller/job/job_controller.go`` and ``pod_failure_policy.go``: an Indexed Job with one pod
  per node and ``restartPolicy: Never``; a failed pod is matched against ``podFailurePolicy`` rules in order
  (``onExitCodes`` looks at the containers, then the init containers: a failing weights fetch matches too);
  ``FailJob`` fails the Job at once (reason ``PodFailurePolicy``), otherwise the failure counts and the pod is
  recreated until more than ``backoffLimit`` failed (``BackoffLimitExceeded``); ``activeDeadlineSeconds`` ends
  it (``DeadlineExceeded``). Init containers run before the main container; one that fails ends the pod.
- kubernetes-sigs/jobset ``pkg/controllers/jobset_controller.go``: with ``failurePolicy.maxRestarts: 0`` a failed
  Job fails the JobSet (reason ``FailedJobs``); all Jobs complete -> Completed.
- kubeflow/trainer ``pkg/controller/trainjob_controller.go``: the TrainJob copies the JobSet's terminal condition
  as ``Complete`` or ``Failed`` and reports ``status.jobsStatus`` per replicated job.
A TrainJob whose runtime is missing never gets here: the emulator refuses it as the Trainer's webhook does.
Each pod is local processes running the containers' own commands; ``path_map`` maps image paths to local ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from tests._local_pods import LocalPodController, free_port, kill_process_tree, now
from tests.k8s_emulator import TRAINER_TOKEN

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
MASTER_PORT = 29400
Hook = Callable[[dict[str, Any], dict[str, Any]], list[str] | None]
"""(trainjob, container) -> argv to run instead of the container's command (a fault a test injects), or None."""


@dataclass
class Pod:
    """One pod of the Job: its init containers, then the node container, each a local process in turn."""

    name: str
    index: int
    steps: list[tuple[str, list[str], dict[str, str]]]
    """(container name, argv, env) in the order the kubelet runs them."""
    log_path: Path
    step: int = 0
    process: Any = None
    failed_container: str | None = None
    exit_code: int | None = None


@dataclass
class TrainRun:
    name: str
    uid: str
    job_spec: dict[str, Any]
    """The merged Job spec of the ``node`` replicated job."""
    nproc: int
    pod_labels: dict[str, str]
    pods: list[Pod] = field(default_factory=list)
    created_pods: int = 0
    failed_pods: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: str | None = None
    """None while running, else the TrainJob condition it ended with (Complete or Failed)."""
    reason: str = ""


class FakeTrainer(LocalPodController):
    name = "fake trainer"

    def __init__(
        self, kubeconfig: Path, namespace: str, workdir: Path, *, override: Hook | None = None, **options: Any
    ):
        # Its own identity is the Trainer's service account.
        super().__init__(kubeconfig, namespace, workdir, token=TRAINER_TOKEN, **options)
        self.override = override
        self.runs: dict[str, TrainRun] = {}
        self.deleted: dict[str, TrainRun] = {}
        """name -> the run of a TrainJob that was deleted (its pods killed), kept for the test to inspect."""

    def _processes(self) -> Iterator[Any]:
        return (pod.process for run in self.runs.values() for pod in run.pods)

    # -- building pods (trainer jobset + torch plugins) ------------------------------------------------------

    def _runtime(self, job: dict[str, Any]) -> dict[str, Any] | None:
        ref = job["spec"]["runtimeRef"]
        try:
            return self.api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "trainingruntimes", ref["name"]
            )
        except client.exceptions.ApiException as e:
            if e.status == 404:
                return None
            raise

    def _job_spec(self, job: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
        replicated = next(r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node")
        spec = replicated["template"]["spec"]
        trainer = job["spec"].get("trainer") or {}
        node = next(c for c in spec["template"]["spec"]["containers"] if c["name"] == "node")
        for key in ("image", "command", "args"):
            if key in trainer:
                node[key] = trainer[key]
        if "resourcesPerNode" in trainer:
            node["resources"] = trainer["resourcesPerNode"]
        nodes = int(trainer.get("numNodes") or runtime["spec"]["mlPolicy"].get("numNodes") or 1)
        spec.update({"parallelism": nodes, "completions": nodes, "completionMode": "Indexed"})
        return spec

    @staticmethod
    def _patched_labels(job: dict[str, Any]) -> dict[str, str]:
        labels: dict[str, str] = {}
        for override in job["spec"].get("podTemplateOverrides") or []:
            labels.update((override.get("metadata") or {}).get("labels") or {})
        for patch in job["spec"].get("runtimePatches") or []:
            jobset = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
            for replicated in jobset.get("replicatedJobs") or []:
                pod = ((replicated.get("template") or {}).get("spec") or {}).get("template") or {}
                labels.update((pod.get("metadata") or {}).get("labels") or {})
        return labels

    def _pod(self, job: dict[str, Any], run: TrainRun, index: int, port: int) -> Pod:
        spec = run.job_spec
        nodes = int(spec["parallelism"])
        torch_env = {
            "PET_NNODES": str(nodes),
            "PET_NPROC_PER_NODE": str(run.nproc),
            "PET_NODE_RANK": str(index),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
        }
        pod_spec = spec["template"]["spec"]
        steps = []
        for container in [*(pod_spec.get("initContainers") or []), *pod_spec["containers"]]:
            argv = (self.override(job, container) if self.override else None) or (
                container.get("command", []) + container.get("args", [])
            )
            argv = self.container_argv(argv)
            self.mount_volumes([container])
            env = self.container_env(container)
            if container["name"] == "node":
                env.update(torch_env)
            steps.append((container["name"], argv, env))
        run.created_pods += 1
        name = f"{run.name}-node-0-{index}-{run.created_pods}"
        return Pod(name, index, steps, self.log_path(name))

    # -- processes ---------------------------------------------------------------------------------------------

    def _spawn_step(self, pod: Pod) -> None:
        _name, argv, env = pod.steps[pod.step]
        pod.process = self.spawn(argv, env, pod.log_path)

    def _kill(self, pod: Pod) -> None:
        kill_process_tree(pod.process)

    def _poll(self, pod: Pod) -> None:
        """Advance a pod: next container when one succeeds; the pod fails with the first that does not."""
        if pod.exit_code is not None or pod.process is None:
            return
        code = pod.process.poll()
        if code is None:
            return
        code = 128 - code if code < 0 else code
        if code != 0:
            pod.failed_container, pod.exit_code = pod.steps[pod.step][0], code
        elif pod.step + 1 < len(pod.steps):
            pod.step += 1
            self._spawn_step(pod)
        else:
            pod.exit_code = 0

    # -- Job / JobSet / TrainJob status ------------------------------------------------------------------------

    @staticmethod
    def _fail_job_rule(job_spec: dict[str, Any], pod: Pod) -> bool:
        for rule in (job_spec.get("podFailurePolicy") or {}).get("rules") or []:
            codes = rule.get("onExitCodes")
            if not codes or codes.get("containerName") not in (None, pod.failed_container):
                continue
            matched = (pod.exit_code in codes["values"]) == (codes["operator"] == "In")
            if matched:
                return rule["action"] == "FailJob"
        return False

    def _advance(self, job: dict[str, Any], run: TrainRun) -> None:
        deadline = run.job_spec.get("activeDeadlineSeconds")
        if deadline and time.monotonic() - run.started > deadline:
            return self._finish(run, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
        port = None
        for slot, pod in enumerate(run.pods):
            self._poll(pod)
            if pod.exit_code in (None, 0):
                continue
            self._log.info("pod %s: container %s exited %s", pod.name, pod.failed_container, pod.exit_code)
            run.failed_pods += 1
            if self._fail_job_rule(run.job_spec, pod):
                message = f"Container {pod.failed_container} for pod {pod.name} failed with exit code {pod.exit_code}"
                return self._finish(run, "Failed", "PodFailurePolicy", message)
            if run.failed_pods > int(run.job_spec.get("backoffLimit", 6)):
                return self._finish(
                    run, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"
                )
            port = port or free_port()
            run.pods[slot] = self._pod(job, run, pod.index, port)  # a new pod, as the Job controller creates
            self._spawn_step(run.pods[slot])
        if all(p.exit_code == 0 for p in run.pods):
            self._finish(run, "Complete", "JobSetCompleted", "jobset completed successfully")
        else:
            self._report(run)

    def _finish(self, run: TrainRun, condition: str, job_reason: str, job_message: str) -> None:
        run.finished = condition
        run.reason = job_reason
        for pod in run.pods:
            self._kill(pod)
        self._log.info("trainjob %s %s: %s: %s", run.name, condition, job_reason, job_message)
        self._report(run)

    def _report(self, run: TrainRun) -> None:
        active = sum(1 for p in run.pods if p.process is not None and p.process.poll() is None)
        succeeded = sum(1 for p in run.pods if p.exit_code == 0)
        jobs_status = [
            {"name": "node", "active": active, "ready": active, "succeeded": succeeded,
             "failed": run.failed_pods, "suspended": 0}
        ]  # fmt: skip
        status: dict[str, Any] = {"jobsStatus": jobs_status}
        if run.finished:
            stamp = now()
            reason, message = (
                ("JobSetCompleted", "jobset completed successfully")
                if run.finished == "Complete"
                else ("FailedJobs", "jobset failed due to one or more job failures")
            )
            status["conditions"] = [
                {"type": run.finished, "status": "True", "reason": reason, "message": message,
                 "lastTransitionTime": stamp}
            ]  # fmt: skip
        try:
            self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, "trainjobs", run.name, {"status": status}
            )
        except client.exceptions.ApiException as e:
            if e.status != 404:  # deleted meanwhile
                raise

    # -- the loop ----------------------------------------------------------------------------------------------

    def _tick(self) -> None:
        jobs = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, "trainjobs")["items"]
        present = {j["metadata"]["uid"]: j for j in jobs}
        for uid, run in list(self.runs.items()):
            if uid not in present:  # deleted: the JobSet and its pods go with it (owner references)
                for pod in run.pods:
                    self._kill(pod)
                self.deleted[run.name] = self.runs.pop(uid)
        for uid, job in present.items():
            run = self.runs.get(uid)
            if run is None:
                run = self._start(job)
                if run is None:
                    continue
            if not run.finished:
                self._advance(job, run)
        self.peak_running = max(self.peak_running, sum(1 for r in self.runs.values() if not r.finished))

    def _start(self, job: dict[str, Any]) -> TrainRun | None:
        runtime = self._runtime(job)
        if runtime is None:
            self._log.error(
                "trainjob %s: runtime %s not found", job["metadata"]["name"], job["spec"]["runtimeRef"]["name"]
            )
            return None
        run = TrainRun(
            job["metadata"]["name"],
            job["metadata"]["uid"],
            self._job_spec(job, runtime),
            nproc=int((job["spec"].get("trainer") or {}).get("numProcPerNode") or 1),
            pod_labels=self._patched_labels(job),
        )
        port = free_port()
        run.pods = [self._pod(job, run, index, port) for index in range(int(run.job_spec["parallelism"]))]
        for pod in run.pods:
            self._spawn_step(pod)
        self.runs[run.uid] = run
        self.started_jobs.append(run.name)
        return run
