"""The PyTorchJob kind (Kubeflow training operator v1.9, kubeflow.org/v1): its API coordinates, its rendering
(a pure function from run, shards, launch settings and attempt to a manifest dict), its status mapping and its
backend. ``batchgen render``, the controller and the generated examples under ``jobs/`` all call
``render_pytorchjob`` and therefore agree byte for byte.

What the rendered job relies on (see ``shared/reference/platform.md``):
- ``restartPolicy: ExitCode``: exit codes 1-127 fail the job (bad input, RBAC, ...), >= 128 restart the pod
  (SIGTERM from preemption, transient storage outages). ``batchgen.launch.k8s.torchrun`` runs torchrun but exits
  with the worker's own code, because plain torchrun turns every child failure into exit 1.
- ``cleanPodPolicy: Running``: the default (None) would leave worker pods holding GPUs after the Master succeeds.
- The operator injects ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR/PORT``;
  torchrun reads them, so the command carries no rendezvous flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchgen.launch.k8s.client import CustomObjectBackend, JobInfo
from batchgen.launch.k8s.pod import job_identity, node_resources, pod_template, worker_command
from batchgen.launch.k8s.settings import LaunchSettings

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


API_VERSION = f"{GROUP}/{VERSION}"


KIND = "PyTorchJob"


CONTAINER_NAME = "pytorch"  # the operator's webhook requires exactly this name


def render_pytorchjob(
    plan_or_run_id: Any,
    shards: Sequence[str],
    settings: LaunchSettings,
    attempt: int = 1,
    *,
    group: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The PyTorchJob that runs ``batchgen worker`` for ``shards`` of a run (see ``job_identity``)."""
    job = job_identity(plan_or_run_id, shards, settings, attempt, group)
    template = pod_template(
        settings,
        job.pod_labels,
        container_name=CONTAINER_NAME,
        command=worker_command(job, settings),
        resources=node_resources(settings),
    )
    replica_specs: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if settings.nodes > 1:
        replica_specs["Worker"] = {"replicas": settings.nodes - 1, "restartPolicy": "ExitCode", "template": template}
    run_policy: dict[str, Any] = {"cleanPodPolicy": "Running", "backoffLimit": settings.backoff_limit}
    if settings.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = settings.active_deadline_seconds
    if settings.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": job.metadata,
        "spec": {
            "nprocPerNode": str(settings.gpus_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        },
    }


class PyTorchJobInfo(JobInfo):
    """The v1 operator's conditions are the states (Succeeded, Failed, Suspended, Restarting, Running, Created)."""

    kind = KIND

    @property
    def state(self) -> str:
        for kind in ("Succeeded", "Failed", "Suspended", "Restarting", "Running", "Created"):
            if self.condition(kind):
                # Kueue suspends a queued PyTorchJob (runPolicy.suspend) until it admits it.
                return "Queued" if kind == "Suspended" and self.queue else kind
        return "Pending"

    @property
    def active_pods(self) -> int:
        return sum(int(r.get("active") or 0) for r in self._replicas().values())

    @property
    def failed_pods(self) -> int:
        return sum(int(r.get("failed") or 0) for r in self._replicas().values())

    def condition_type(self) -> str:
        return {"Queued": "Suspended"}.get(self.state, self.state)

    def _replicas(self) -> dict[str, Any]:
        return (self.raw.get("status") or {}).get("replicaStatuses") or {}


class PyTorchJobBackend(CustomObjectBackend):
    """Kubeflow PyTorchJobs (kubeflow.org/v1, training-operator v1.9)."""

    group, version, plural, kind = GROUP, VERSION, PLURAL, KIND
    info_class = PyTorchJobInfo
    install_hint = (
        "install the Kubeflow training operator v1.9 (its pytorchjobs.kubeflow.org CRD), or use --launcher trainjob"
    )
    # The v1 operator fails a job past runPolicy.activeDeadlineSeconds (measured from status.startTime),
    # deleting its pods and keeping the job as the record (training-operator pkg/controller.v1/common/job.go,
    # ReconcileJobs and PastActiveDeadline). A deadline of 1 s is past for any job that has restarted.
    ending_spec = {"runPolicy": {"activeDeadlineSeconds": 1}}

    def render(
        self, plan: Any, shards: list[str], settings: Any, attempt: int, *, group: tuple[str, str]
    ) -> dict[str, Any]:
        return render_pytorchjob(plan, shards, settings, attempt, group=group)
