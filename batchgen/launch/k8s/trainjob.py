"""The TrainJob kind (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1): its API coordinates, the namespaced
TrainingRuntime a run's jobs share, one TrainJob per job, its status mapping and its backend.

Pure functions like ``render_pytorchjob``: no cluster, no storage, no torch. ``batchgen render --launcher
trainjob``, the controller, the chart and the kustomize base all produce these objects from the same settings.

The runtime carries what does not change between jobs (kubeflow/trainer ``manifests/base/runtimes/
torch_distributed.yaml`` is the stock one it follows): the torch ML policy (it injects the ``PET_*`` variables
torchrun reads), one replicated job and container named ``node``, the hardened pod with ``/dev/shm``, caches and
the weights, and the failure handling. Each TrainJob sets the trainer's command, nodes, processes per node and
resources, and patches its pods' labels (``podTemplateOverrides`` in Trainer v2.1, ``runtimePatches`` from v2.2).

Failure handling (a Job ``podFailurePolicy`` on the replicated job, ``restartPolicy: Never``): a container or the
weights fetch exiting 1-127 fails the Job at once (``FailJob``), so its JobSet and TrainJob fail and the
controller records it; exit codes >= 128 (signals, preemption, transient errors that outlasted their retries)
count against ``backoffLimit`` and the pod is recreated; the Job's ``activeDeadlineSeconds`` bounds the whole.
The JobSet restarts nothing itself (``failurePolicy.maxRestarts: 0``): relaunching is the controller's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchgen.core.errors import ClusterError
from batchgen.launch.k8s import names
from batchgen.launch.k8s.client import CustomObjectBackend, JobInfo, _collection_missing, _status_body
from batchgen.launch.k8s.pod import job_identity, node_resources, pod_template, worker_command
from batchgen.launch.k8s.settings import LaunchSettings
from batchgen.worker.contract import PERMANENT_EXIT_CODES

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND, RUNTIME_KIND = "TrainJob", "TrainingRuntime"
PLURAL, RUNTIME_PLURAL = "trainjobs", "trainingruntimes"
NODE = "node"
"""The replicated job and container name the torch plugin looks for (the stock runtime's)."""
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
FRAMEWORK_LABEL = "trainer.kubeflow.org/framework"
PATCH_MANAGER = "batchgen.io/controller"
DEFAULT_DEADLINE_S = 48 * 3600
"""Used when ``active_deadline_seconds`` is unset: a job that hangs must still end (and free its GPUs)."""


def job_deadline_s(settings: LaunchSettings) -> int:
    return settings.active_deadline_seconds or DEFAULT_DEADLINE_S


def failure_policy() -> dict[str, Any]:
    """FailJob on the permanent exit codes of any container, init containers included (the weights fetch)."""
    permanent = list(PERMANENT_EXIT_CODES)
    return {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": permanent}}]}


def render_trainingruntime(settings: LaunchSettings) -> dict[str, Any]:
    """The TrainingRuntime ``settings.runtime_name`` in ``settings.namespace``."""
    template = pod_template(settings, {}, container_name=NODE)
    del template["metadata"]
    template["spec"]["restartPolicy"] = "Never"  # a podFailurePolicy requires it
    job_spec = {
        "backoffLimit": settings.backoff_limit,
        "activeDeadlineSeconds": job_deadline_s(settings),
        "podFailurePolicy": failure_policy(),
        "template": template,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": RUNTIME_KIND,
        "metadata": {
            "name": settings.runtime_name,
            **({"namespace": settings.namespace} if settings.namespace else {}),
            "labels": {**names.MANAGED_BY, FRAMEWORK_LABEL: "torch"},
        },
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {
                "spec": {
                    "failurePolicy": {"maxRestarts": 0},
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {"metadata": {"labels": {ANCESTOR_LABEL: "trainer"}}, "spec": job_spec},
                        }
                    ],
                }
            },
        },
    }


def _pod_patch(settings: LaunchSettings, labels: dict[str, str]) -> dict[str, Any]:
    """Per-job pod labels (so ``kubectl get pods -l batchgen.io/run-id=...`` finds a run's pods), in the shape of
    the cluster's Trainer release."""
    if settings.trainer_api == "v2.1":
        return {"podTemplateOverrides": [{"targetJobs": [{"name": NODE}], "metadata": {"labels": labels}}]}
    replicated = {"name": NODE, "template": {"spec": {"template": {"metadata": {"labels": labels}}}}}
    return {
        "runtimePatches": [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated]}}},
            }
        ]
    }


def render_trainjob(
    plan_or_run_id: Any,
    shards: Sequence[str],
    settings: LaunchSettings,
    attempt: int = 1,
    *,
    group: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob that runs ``batchgen worker`` for ``shards`` of a run (arguments as ``render_pytorchjob``)."""
    job = job_identity(plan_or_run_id, shards, settings, attempt, group)
    trainer = {
        "image": settings.image,
        "command": worker_command(job, settings),
        "numNodes": settings.nodes,
        "numProcPerNode": settings.gpus_per_node,
        "resourcesPerNode": node_resources(settings),
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": job.metadata,
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": settings.runtime_name},
            "trainer": trainer,
            **_pod_patch(settings, job.pod_labels),
        },
    }


class TrainJobInfo(JobInfo):
    """Trainer v2 sets only Complete, Failed and Suspended (pkg/apis/trainer/v1alpha1/trainjob_types.go in
    kubeflow/trainer); whether it runs is read from its JobSet's child jobs in status.jobsStatus."""

    kind = KIND

    @property
    def state(self) -> str:
        for condition, state in (("Complete", "Succeeded"), ("Failed", "Failed")):
            if self.condition(condition):
                return state
        ended = names.ENDED_ANNOTATION in self.annotations
        suspended = bool(self.condition("Suspended"))
        if self.queue and not ended and (suspended or (self.raw.get("spec") or {}).get("suspend")):
            # Kueue's TrainJob webhook suspends a queued job on create, before the Trainer sets any condition,
            # and suspends it again on eviction or preemption; it resumes it once admitted (Kueue
            # pkg/controller/jobs/trainjob, Default and RunWithPodSetsInfo).
            return "Queued"
        if suspended:
            # A TrainJob batchgen ended (see TrainJobBackend.end) stays suspended for good: it failed.
            return "Failed" if ended else "Suspended"
        return "Running" if self.active_pods else "Created"

    @property
    def active_pods(self) -> int:
        return sum(int(j.get("active") or 0) for j in (self.raw.get("status") or {}).get("jobsStatus") or [])

    @property
    def failed_pods(self) -> int:
        """Zero: a TrainJob's JobSet counts and bounds its own restarts (failurePolicy.maxRestarts)."""
        return 0

    def condition_type(self) -> str:
        state = self.state
        if state == "Failed" and not self.condition("Failed"):
            return "Suspended"  # ended by batchgen
        return {"Succeeded": "Complete", "Queued": "Suspended"}.get(state, state)


class TrainJobBackend(CustomObjectBackend):
    """Kubeflow Trainer v2 TrainJobs (trainer.kubeflow.org/v1alpha1) running a namespaced TrainingRuntime."""

    group, version, plural, kind = GROUP, VERSION, PLURAL, KIND
    info_class = TrainJobInfo
    install_hint = "install Kubeflow Trainer v2 (its trainjobs.trainer.kubeflow.org CRD), or use --launcher pytorchjob"
    # spec.activeDeadlineSeconds exists only from Trainer v2.3 and is immutable, so a deadline cannot be set on a
    # running TrainJob. spec.suspend can (every v2 release): the Trainer suspends the JobSet, whose pods are
    # deleted, and the TrainJob shows Suspended (kubeflow/trainer pkg/controller/trainjob_controller.go,
    # setSuspendedCondition). With batchgen's ended annotation that counts as Failed (TrainJobInfo.state).
    ending_spec = {"suspend": True}
    # Background, not Foreground: the Trainer reconciles a TrainJob that is being deleted like any other (v2.3.0
    # pkg/controller/trainjob_controller.go Reconcile checks no deletionTimestamp) and server-side applies its
    # JobSet again. While a foreground deletion waits for the garbage collector, an unfinished TrainJob's JobSet,
    # Job and pods were recreated and started (the weights fetch ran) until the collector won (seen against the
    # real control plane, tests/realk8s/test_helm_run.py). Gone at once, the TrainJob is not reconciled again;
    # the collector then removes its JobSet, Jobs and pods, and the scheduler keeps the next job's pods pending
    # until their GPUs are free.
    deletion_propagation = "Background"

    def render(
        self, plan: Any, shards: list[str], settings: Any, attempt: int, *, group: tuple[str, str]
    ) -> dict[str, Any]:
        return render_trainjob(plan, shards, settings, attempt, group=group)

    def rejection_hint(self, message: str) -> str:
        if "podTemplateOverrides" in message or "runtimePatches" in message:
            return (
                "; set trainer_api to the cluster's Kubeflow Trainer release (v2.1 takes podTemplateOverrides, "
                "v2.2 and later runtimePatches)"
            )
        return ""

    def check_ready(self, settings: LaunchSettings) -> None:
        self.check_runtime(settings.runtime_name)

    def check_runtime(self, name: str) -> None:
        """Refuse to launch, with a message that says what to install, when the TrainingRuntime the jobs reference
        is missing (the Trainer's webhook would otherwise refuse every TrainJob's create with a 422)."""
        from kubernetes.client.exceptions import ApiException

        def attempt() -> None:
            try:
                self.api.get_namespaced_custom_object(
                    self.group, self.version, self.namespace, RUNTIME_PLURAL, name,
                    _request_timeout=self.request_timeout_s,
                )  # fmt: skip
            except ApiException as e:
                if e.status == 404 and not _collection_missing(_status_body(e)):
                    raise ClusterError(
                        f"TrainingRuntime {name!r} not found in namespace {self.namespace!r}: install the chart or "
                        "kustomize base (they ship it), or `batchgen render --launcher trainjob ... | kubectl apply "
                        "-f -`; set runtime_name to use another"
                    ) from None
                raise

        self._call("get", attempt, name=name)
