"""``LaunchSettings``: how a run's shards become Kubernetes jobs (every field is also a key of ``--values FILE``),
and how they combine with the run's plan: the workers' parallel settings (``resolve_parallel``) and their degrees,
checked before anything is created (``resolve_degrees``). No cluster access, no torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from batchgen.core.config import ParallelConfig, build_section, field_kind, type_problem
from batchgen.core.errors import ConfigError
from batchgen.core.layout import shard_id
from batchgen.core.logs import LOG_FORMATS
from batchgen.launch.k8s import names
from batchgen.models import FAMILIES, spec_for, uses_cfg

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
