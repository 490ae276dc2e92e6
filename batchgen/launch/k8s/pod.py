"""The worker pod every job kind runs, and what names a job: the hardened pod template (read-only root, caches on
scratch, /dev/shm, the weights from a PVC or an init container that fetches them), the worker's command (torchrun
through ``batchgen.launch.k8s.torchrun`` running ``batchgen worker``), its environment and resources, and
``job_identity`` (name, labels, annotations, the checked degrees). Pure functions: no cluster, no storage, no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batchgen.core.errors import ConfigError
from batchgen.core.layout import shard_index
from batchgen.core.logs import LOG_FORMAT_ENV
from batchgen.core.metrics import METRICS_PORT_ENV
from batchgen.launch.k8s import names
from batchgen.launch.k8s.settings import LaunchSettings, resolve_degrees, resolve_parallel
from batchgen.worker.contract import TORCHRUN, WorkerArgs

FETCH_CONTAINER = "fetch-model"

SCRATCH_DIR = "/scratch"
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"


def worker_command(job: JobIdentity, settings: LaunchSettings) -> list[str]:
    """The trainer container's command: torchrun (through batchgen.launch.k8s.torchrun) running ``batchgen worker``.

    Both launchers inject the ``PET_*`` variables torchrun reads, so the command carries no rendezvous flags.
    """
    topology = job.topology
    parallel = dataclasses.replace(
        job.parallel, ulysses_degree=topology.ulysses, ring_degree=topology.ring, cfg_degree=topology.cfg
    )
    worker = WorkerArgs(
        output=settings.output, run_id=job.run_id, shards=tuple(job.shards), model_dir=settings.model_dir,
        parallel=parallel,
    )  # fmt: skip
    # A failed rank fails the pod; the job's failure policy decides whether to retry it.
    return ["python", *TORCHRUN, "--max-restarts=0", "-m", "batchgen", *worker.argv()]


def _s3_env(settings: LaunchSettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if settings.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint})
    if settings.s3_region:
        env += [
            {"name": "AWS_REGION", "value": settings.s3_region},
            {"name": "AWS_DEFAULT_REGION", "value": settings.s3_region},
        ]
    if settings.s3_secret:
        keys = [
            ("AWS_ACCESS_KEY_ID", settings.s3_access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", settings.s3_secret_access_key_key),
        ]
        if settings.s3_session_token_key:
            keys.append(("AWS_SESSION_TOKEN", settings.s3_session_token_key))
        env += [
            {"name": var, "valueFrom": {"secretKeyRef": {"name": settings.s3_secret, "key": key}}} for var, key in keys
        ]
    return env


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _add_observability(container: dict[str, Any], settings: LaunchSettings) -> None:
    """Metrics ports (one per rank: a PodMonitor scrapes only declared ports) and the log format, when asked for."""
    if settings.worker_log_format != "text":
        container["env"].append({"name": LOG_FORMAT_ENV, "value": settings.worker_log_format})
    port = settings.worker_metrics_port
    if port:
        container["env"].append({"name": METRICS_PORT_ENV, "value": str(port)})
        container["ports"] = [
            {"name": f"metrics-{rank}", "containerPort": port + rank, "protocol": "TCP"}
            for rank in range(settings.gpus_per_node)
        ]


def node_resources(settings: LaunchSettings) -> dict[str, Any]:
    """Requests and limits of one node's trainer container: its GPUs, and CPU and memory when set."""
    resources: dict[str, Any] = {"limits": {settings.gpu_resource: str(settings.gpus_per_node)}}
    for name in ("cpu", "memory"):
        value = getattr(settings, name)
        if value is not None:
            resources["limits"][name] = str(value)
            resources.setdefault("requests", {})[name] = str(value)
    return resources


def _worker_env(settings: LaunchSettings) -> list[dict[str, Any]]:
    return [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # The root filesystem is read-only: every cache and HOME live on the scratch emptyDir.
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "HF_HOME", "value": f"{SCRATCH_DIR}/hf"},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH_DIR}/cache"},
        {"name": "TRITON_CACHE_DIR", "value": f"{SCRATCH_DIR}/triton"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{SCRATCH_DIR}/inductor"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        *_s3_env(settings),
    ]


def _volumes(settings: LaunchSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the pod's volumes, the worker container's mounts): /dev/shm, /tmp, scratch, and the weights if mounted."""
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": settings.scratch_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": SHM_DIR},
        {"name": "tmp", "mountPath": TMP_DIR},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    if settings.model_pvc:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": settings.model_pvc, "readOnly": True}})
        mount = {"name": "model", "mountPath": settings.model_dir, "readOnly": True}
        if settings.model_pvc_subpath:
            mount["subPath"] = settings.model_pvc_subpath
        mounts.append(mount)
    elif settings.model_s3_uri:
        # Node-local disk, filled once per pod by the fetch init container: restarts of the worker reuse it.
        volumes.append({"name": "model", "emptyDir": {"sizeLimit": settings.model_cache_size}})
        mounts.append({"name": "model", "mountPath": settings.model_dir, "readOnly": True})
    return volumes, mounts


def _fetch_container(settings: LaunchSettings) -> dict[str, Any]:
    """The init container that downloads the weights from ``model_s3_uri`` into the pod's model volume."""
    return {
        "name": FETCH_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "batchgen.launch.k8s.fetch", settings.model_s3_uri, settings.model_dir],
        "env": [{"name": "HOME", "value": SCRATCH_DIR}, *_s3_env(settings)],
        "volumeMounts": [
            {"name": "model", "mountPath": settings.model_dir},
            {"name": "tmp", "mountPath": TMP_DIR},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
        ],
        "securityContext": _container_security(),
    }


def _worker_container(
    settings: LaunchSettings, name: str, mounts: list[dict[str, Any]], command: list[str] | None, resources
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": settings.image, "imagePullPolicy": settings.image_pull_policy}
    if command is not None:
        container["command"] = command
    container["env"] = _worker_env(settings)
    if resources is not None:
        container["resources"] = resources
    container.update({"volumeMounts": mounts, "securityContext": _container_security()})
    _add_observability(container, settings)
    return container


def _scheduling(settings: LaunchSettings) -> dict[str, Any]:
    """Pod spec fields that only exist when set: service account, pull secrets, placement, priority."""
    spec: dict[str, Any] = {}
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    else:
        # Workers need no Kubernetes API access; without a service account, do not mount its token.
        spec["automountServiceAccountToken"] = False
    if settings.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    if settings.node_selector:
        spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        spec["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.affinity:
        spec["affinity"] = dict(settings.affinity)
    if settings.priority_class:
        spec["priorityClassName"] = settings.priority_class
    return spec


def pod_template(
    settings: LaunchSettings,
    labels: Mapping[str, str],
    *,
    container_name: str,
    command: list[str] | None = None,
    resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The hardened worker pod both launchers run: read-only root, caches on scratch, /dev/shm, the weights.

    The TrainJob launcher leaves ``command`` and ``resources`` out here (its runtime is shared by every job)
    and sets them per job in the TrainJob's ``trainer``.
    """
    volumes, mounts = _volumes(settings)
    spec: dict[str, Any] = {
        "containers": [_worker_container(settings, container_name, mounts, command, resources)],
        "volumes": volumes,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_group,
            "fsGroup": settings.fs_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if settings.model_s3_uri and not settings.model_pvc:
        spec["initContainers"] = [_fetch_container(settings)]
    spec.update(_scheduling(settings))
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


@dataclass(frozen=True)
class JobIdentity:
    """What every launcher's job carries: name, labels, annotations, the shards and the checked degrees."""

    run_id: str
    shards: list[str]
    topology: Any
    parallel: Any
    """The workers' ``ParallelConfig`` (``resolve_parallel``): degrees as asked and the speed options."""
    name: str
    pod_labels: dict[str, str]
    """The job's labels minus the Kueue queue label (which belongs on the job only)."""
    metadata: dict[str, Any]


def job_identity(
    plan_or_run_id: Any, shards: Sequence[str], settings: LaunchSettings, attempt: int, group: tuple[str, str] | None
) -> JobIdentity:
    """Check the inputs and name the job. ``plan_or_run_id`` is a ``RunPlan`` (its config supplies degrees the
    settings leave at 0 and whether CFG is used) or a run id string. ``group`` is the (first, last) shard range
    the job's name and labels carry, by default the shards' own: a relaunch passes the original group so attempt
    N+1 is named like attempt N even when only some of its shards are left to do.
    Raises TopologyError when the degrees do not fit nodes x gpus_per_node, the model's heads or the items.
    """
    if not shards:
        raise ConfigError("render: no shards given")
    if not settings.output:
        raise ConfigError("launch settings: output (the run's output URI) is required")
    plan = None if isinstance(plan_or_run_id, str) else plan_or_run_id
    run_id = plan_or_run_id if plan is None else plan.run_id
    ordered = sorted(set(shards), key=shard_index)
    first, last = group or (ordered[0], ordered[-1])
    topology = resolve_degrees(settings, plan)
    labels = names.job_labels(run_id, first, last, attempt)
    job_labels = dict(labels)
    if settings.queue_name:
        job_labels[names.KUEUE_QUEUE_LABEL] = settings.queue_name
    name = names.job_name(run_id, first, last, attempt)
    metadata: dict[str, Any] = {"name": name, "namespace": settings.namespace, "labels": job_labels}
    if not settings.namespace:
        del metadata["namespace"]  # kubectl apply then uses its context's namespace, as submit does
    metadata["annotations"] = {
        names.RUN_ANNOTATION: run_id,
        names.SHARDS_ANNOTATION: ",".join(ordered),
        names.OUTPUT_ANNOTATION: settings.output,
    }
    return JobIdentity(run_id, ordered, topology, resolve_parallel(settings, plan), name, labels, metadata)


def to_yaml(objects: Sequence[Mapping[str, Any]]) -> str:
    import yaml

    class _PlainDumper(yaml.SafeDumper):
        # Master and Worker share one pod template object; anchors (&id001 / *id001) would be valid YAML but
        # unreadable for anyone reviewing the job with kubectl.
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump_all([dict(o) for o in objects], Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)
