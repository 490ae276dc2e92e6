"""PyTorchJob rendering: a pure function from (run, shards, launch settings, attempt) to a manifest dict.

No cluster access, no storage access, no torch: ``batchgen render``, the controller and the generated examples
under ``jobs/`` all call ``render_pytorchjob`` and therefore agree byte for byte.

What the rendered job relies on (see ``shared/reference/platform.md``):
- ``restartPolicy: ExitCode``: exit codes 1-127 fail the job (bad input, RBAC, ...), >= 128 restart the pod
  (SIGTERM from preemption, transient storage outages). ``batchgen.launch.k8s.torchrun`` runs torchrun but exits with the
  worker's own code, because plain torchrun turns every child failure into exit 1.
- ``cleanPodPolicy: Running``: the default (None) would leave worker pods holding GPUs after the Master succeeds.
- The operator injects ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR/PORT``;
  torchrun reads them, so the command carries no rendezvous flags.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from batchgen.core.config import ParallelConfig, build_section, field_kind, type_problem
from batchgen.core.errors import ConfigError
from batchgen.core.layout import shard_id, shard_index
from batchgen.core.logs import LOG_FORMAT_ENV, LOG_FORMATS
from batchgen.core.metrics import METRICS_PORT_ENV
from batchgen.launch.k8s import names
from batchgen.models import FAMILIES, spec_for, uses_cfg
from batchgen.worker.contract import TORCHRUN, WorkerArgs

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the operator's webhook requires exactly this name
FETCH_CONTAINER = "fetch-model"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

SCRATCH_DIR = "/scratch"
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$")
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
LAUNCHERS = ("auto", "trainjob", "pytorchjob")
TRAINER_APIS = ("v2.1", "v2.3")


@dataclass(frozen=True)
class LaunchSettings:
    """How a run's shards become PyTorchJobs. Every field is also a key of ``--values FILE`` (YAML)."""

    output: str = ""
    """Run output URI the workers write to (s3://bucket/prefix). Required to render."""
    namespace: str = ""
    """Namespace of the jobs; empty = the kubeconfig context's (submit), left out of the YAML (render)."""
    image: str = "ghcr.io/batchgen/batchgen:0.1.0"
    """Worker image (batchgen + CUDA torch)."""
    image_pull_policy: str = "IfNotPresent"
    """Always, IfNotPresent or Never."""
    image_pull_secrets: tuple[str, ...] = ()
    """Names of existing docker-registry Secrets."""
    service_account: str | None = None
    """Pod service account; annotate it for workload identity (IRSA, GKE WI) instead of a credentials Secret."""
    nodes: int = 1
    """Pods per job: one Master plus nodes-1 Workers."""
    gpus_per_node: int = 8
    """GPUs per pod = processes per pod (nprocPerNode)."""
    gpu_resource: str = "nvidia.com/gpu"
    """Extended resource name of a GPU."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The workers' parallel and speed settings (``ParallelConfig``'s fields, flat keys in a values file and flags):
    a value at its default leaves the plan's ``[parallel]`` (see ``resolve_parallel``)."""
    family: str = "mochi"
    """Model family of the run (the plan's ``[model] family`` when rendering a plan): picks the defaults below."""
    num_heads: int = 0
    """Attention heads of the model, for refusing Ulysses degrees that cannot divide them; 0 = the family's
    flagship (Mochi 1: 24, Wan 14B: 40; Wan 1.3B has 12, so set it for that size)."""
    cpu: str | None = None
    """CPU request and limit per pod (e.g. "32"); None leaves it unset."""
    memory: str | None = None
    """Memory request and limit per pod (e.g. "400Gi"); None leaves it unset."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    priority_class: str | None = None
    queue_name: str | None = None
    """Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label."""
    shm_size: str = "64Gi"
    """Size of the memory-backed /dev/shm; NCCL's shared-memory transport needs far more than Docker's 64Mi."""
    scratch_size: str = "20Gi"
    """Writable emptyDir for caches (HF, Triton, inductor) and HOME; the root filesystem is read-only."""
    model_dir: str = ""
    """Where the pods see the model weights; empty = /models/<family>."""
    model_pvc: str | None = None
    """PersistentVolumeClaim holding the weights, mounted read-only at model_dir."""
    model_pvc_subpath: str = ""
    """Sub-path inside the PVC."""
    model_s3_uri: str | None = None
    """s3:// prefix of the weights, downloaded once per pod into a node-local emptyDir by an init container."""
    model_cache_size: str = "80Gi"
    """Size limit of that emptyDir."""
    s3_endpoint: str | None = None
    """AWS_ENDPOINT_URL for S3-compatible stores (MinIO, Ceph, R2)."""
    s3_region: str | None = None
    s3_secret: str | None = None
    """Existing Secret with the S3 credentials (referenced, never copied)."""
    s3_access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    s3_secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    s3_session_token_key: str | None = None
    backoff_limit: int = 3
    """Pod restarts (exit codes >= 128, init container failures) before the job fails. The v1 operator does not
    count recreated pods, so the controller counts them and stops the job past this limit."""
    active_deadline_seconds: int | None = 24 * 3600
    """Seconds a job may run before the operator fails it: the backstop when nothing else ends its retries."""
    ttl_seconds_after_finished: int | None = 7 * 24 * 3600
    """Keep finished jobs long enough for a restarted controller to see why they ended."""
    termination_grace_seconds: int = 120
    """SIGTERM to SIGKILL: lets a worker finish the commit in flight."""
    run_as_user: int = 1000
    run_as_group: int = 1000
    fs_group: int = 1000
    launcher: str = "auto"
    """trainjob, pytorchjob, or auto: ask the API server which it serves, preferring TrainJob (render, which
    asks no server, renders TrainJobs for auto)."""
    trainer_api: str = "v2.1"
    """Kubeflow Trainer release of the cluster: v2.1 (pod patch in podTemplateOverrides) or v2.3 (runtimePatches)."""
    runtime_name: str = "batchgen-runtime"
    """The TrainingRuntime, in the jobs' namespace, that the TrainJobs run (the chart and kustomize base ship it)."""
    worker_metrics_port: int = 0
    """Prometheus port of the workers: rank r serves on port + r, declared as container port metrics-<r>; 0 = off."""
    worker_log_format: str = "text"
    """Log format of the workers (BATCHGEN_LOG_FORMAT): text or json."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"launch settings: family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        # Resolved once here (frozen): the family's defaults for what was left unset.
        if not self.num_heads:
            object.__setattr__(self, "num_heads", FAMILIES[self.family].default_heads)
        if not self.model_dir:
            object.__setattr__(self, "model_dir", f"/models/{self.family}")
        problems = []
        for name in ("nodes", "gpus_per_node", "num_heads"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("backoff_limit", "termination_grace_seconds"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_pull_policy not in _PULL_POLICIES:
            problems.append(f"image_pull_policy must be one of {_PULL_POLICIES}, got {self.image_pull_policy!r}")
        if self.launcher not in LAUNCHERS:
            problems.append(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.trainer_api not in TRAINER_APIS:
            problems.append(f"trainer_api must be one of {TRAINER_APIS}, got {self.trainer_api!r}")
        if not names.is_dns_label(self.runtime_name):
            problems.append(f"runtime_name {self.runtime_name!r} is not a DNS-1035 label")
        if not 0 <= self.worker_metrics_port <= 65535 - self.gpus_per_node:
            problems.append(f"worker_metrics_port must be 0 (off) or a port below {65536 - self.gpus_per_node}")
        if self.worker_log_format not in LOG_FORMATS:
            problems.append(f"worker_log_format must be one of {LOG_FORMATS}, got {self.worker_log_format!r}")
        if not self.image:
            problems.append("image must not be empty")
        if (
            self.namespace
            and not names.is_dns_label(self.namespace)
            and not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", self.namespace)
        ):
            problems.append(f"namespace {self.namespace!r} is not a DNS-1123 label")
        for name in ("cpu", "memory", "shm_size", "scratch_size", "model_cache_size"):
            value = getattr(self, name)
            if value is not None and not _QUANTITY.match(str(value)):
                problems.append(f"{name} {value!r} is not a Kubernetes quantity (e.g. 16Gi, 500m)")
        if self.model_pvc and self.model_s3_uri:
            problems.append("model_pvc and model_s3_uri are exclusive: the weights come from one place")
        if self.model_s3_uri is not None and not self.model_s3_uri.startswith("s3://"):
            problems.append(f"model_s3_uri must be an s3:// URI, got {self.model_s3_uri!r}")
        if not self.model_dir.startswith("/"):
            problems.append(f"model_dir must be an absolute path, got {self.model_dir!r}")
        for name in ("active_deadline_seconds", "ttl_seconds_after_finished"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} must be >= 0, got {value}")
        if problems:
            raise ConfigError("launch settings: " + "; ".join(problems))

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        """The values-file shape: flat keys, the parallel settings beside the others."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "parallel"}
        data.update(dataclasses.asdict(self.parallel))
        data["image_pull_secrets"] = list(self.image_pull_secrets)
        data["tolerations"] = [dict(t) for t in self.tolerations]
        data["node_selector"] = dict(self.node_selector)
        data["affinity"] = None if self.affinity is None else dict(self.affinity)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "launch settings") -> LaunchSettings:
        """Build from a mapping of field names (a ``--values`` file); unknown keys and wrong types are refused by
        name, the parallel settings by ``ParallelConfig``'s own checks."""
        values, parallel = _split_parallel(dict(data))
        known = {f.name: f for f in fields(cls) if f.name != "parallel"}
        unknown = sorted(set(values) - set(known))
        if unknown:
            expected = sorted({*known, *_PARALLEL_KEYS})
            raise ConfigError(f"{source}: unknown key(s) {unknown}; expected some of {expected}")
        for key, value in values.items():
            problem = None if value is None else type_problem(field_kind(known[key]), value)
            if problem:
                raise ConfigError(f"{source}: {key} {problem}")
            if isinstance(value, list):
                values[key] = tuple(value)
        try:
            return cls(**values, parallel=build_section(ParallelConfig, parallel, f"{source}: parallel"))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> LaunchSettings:
        """A copy with ``changes``; parallel settings are given by their flat names (``ulysses_degree=8``)."""
        changes, parallel = _split_parallel(changes)
        if parallel:
            changes["parallel"] = dataclasses.replace(self.parallel, **parallel)
        return dataclasses.replace(self, **changes)


_PARALLEL_KEYS = frozenset(f.name for f in fields(ParallelConfig))


def _split_parallel(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the launch settings' own keys, the ``ParallelConfig`` keys) of a flat mapping."""
    parallel = {k: values.pop(k) for k in list(values) if k in _PARALLEL_KEYS}
    return values, parallel


def parse_shard_indices(text: str) -> list[str]:
    """ "A:B" (half-open) or "1,3,7" -> shard ids, without a plan (for rendering offline)."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop = (int(p) for p in text.split(":", 1))
            indices = list(range(start, stop))
        else:
            indices = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--shards {text!r}: expected 'A:B' (half-open indices) or a list like '1,3,7'") from None
    if not indices or min(indices) < 0:
        raise ConfigError(f"--shards {text!r} selects no shard")
    return [shard_id(i) for i in sorted(set(indices))]


def resolve_parallel(settings: LaunchSettings, plan: Any | None = None) -> ParallelConfig:
    """The workers' ``ParallelConfig``: the plan's ``[parallel]`` with every launch setting that is not at its
    default on top (a default means "not set here": zero degrees and speed options left off fall back to the plan's,
    whose own zero degrees mean "choose automatically")."""
    parallel = getattr(getattr(plan, "config", None), "parallel", None) or ParallelConfig()
    given = {
        f.name: getattr(settings.parallel, f.name)
        for f in fields(ParallelConfig)
        if getattr(settings.parallel, f.name) != f.default
    }
    return dataclasses.replace(parallel, **given)


def resolve_degrees(settings: LaunchSettings, plan: Any | None = None):
    """Check the degrees against the pods' GPUs, the model's heads and (with a plan) every item's shape, before
    anything is created: a degree that cannot split an item's tokens would otherwise fail only once the pods had
    their GPUs and had loaded the weights.

    Degrees come from ``resolve_parallel``; automatic ones are chosen from the plan's shape tally (degrees that
    fit every item). Returns the ``batchgen.core.topology.Topology``; raises TopologyError listing the layouts
    that would fit.
    """
    from batchgen.core.topology import topology_for

    config = getattr(plan, "config", None)
    use_cfg = uses_cfg(config.generation.guidance_scale) if config is not None else True
    return topology_for(
        resolve_parallel(settings, plan),
        settings.world_size,
        num_heads=settings.num_heads,
        use_cfg=use_cfg,
        spec=config.spec if config is not None else spec_for(settings.family),
        shapes=getattr(plan, "shapes", ()),
    )


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
    mounts = [
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
        job_labels[KUEUE_QUEUE_LABEL] = settings.queue_name
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


def to_yaml(objects: Sequence[Mapping[str, Any]]) -> str:
    import yaml

    class _PlainDumper(yaml.SafeDumper):
        # Master and Worker share one pod template object; anchors (&id001 / *id001) would be valid YAML but
        # unreadable for anyone reviewing the job with kubectl.
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump_all([dict(o) for o in objects], Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)
