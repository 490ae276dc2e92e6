"""Kubeflow Trainer v2 rendering: the namespaced TrainingRuntime a run's jobs share, and one TrainJob per job.

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

from batchgen.launch.k8s import names
from batchgen.launch.k8s.render import LaunchSettings, job_identity, node_resources, pod_template, worker_command
from batchgen.worker.contract import PERMANENT_EXIT_CODES

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND, RUNTIME_KIND = "TrainJob", "TrainingRuntime"
RUNTIME_PLURAL = "trainingruntimes"
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
