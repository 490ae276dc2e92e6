"""Prometheus metrics of workers and of the run controller (``prometheus_client``), served over HTTP when a port
is set: ``--metrics-port``, else ``BATCHGEN_METRICS_PORT``, else ``worker.metrics_port`` in the config (0 = off).

Every process that serves binds ``port + LOCAL_RANK`` (torchrun's local rank, 0 without torchrun), so the ranks of
one pod never clash; ``batchgen run`` gives its local workers ``port``, ``port + nproc``, ``port + 2 * nproc``...
Metrics of a process are counted whether or not they are served (a counter costs nothing).

The sample names a scrape returns are listed in ``WORKER_METRICS`` and ``CONTROLLER_METRICS`` (the README and the
Grafana dashboard use them; tests check them against real scrapes).
"""

from __future__ import annotations

import logging
import os
import sys

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from batchgen.core.errors import ConfigError

log = logging.getLogger("batchgen.metrics")

METRICS_PORT_ENV = "BATCHGEN_METRICS_PORT"
STAGES = ("text_encode", "denoise", "decode", "encode_mp4", "upload")
# From a tiny-model second to a 163-frame item's ten minutes of denoising on one GPU.
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 2400)

WORKER_REGISTRY = CollectorRegistry()
ITEMS_GENERATED = Counter(
    "batchgen_items_generated", "Items generated and committed by this process", registry=WORKER_REGISTRY
)
ITEMS_RESUMED = Counter(
    "batchgen_items_resumed", "Items found already done when a shard was scanned", registry=WORKER_REGISTRY
)
ITEMS_ADOPTED = Counter(
    "batchgen_items_adopted", "Orphan videos (no sidecar) adopted by this process", registry=WORKER_REGISTRY
)
ITEMS_FAILED = Counter(
    "batchgen_items_failed",
    "Items recorded under errors/ after their last attempt, by exception type",
    ["reason"],
    registry=WORKER_REGISTRY,
)
STAGE_SECONDS = Histogram(
    "batchgen_stage_seconds",
    "Seconds per item and pipeline stage (from the sidecar timings)",
    ["stage"],
    buckets=STAGE_BUCKETS,
    registry=WORKER_REGISTRY,
)
CURRENT = Info("batchgen_worker_current", "Run, shard and item this process works on", registry=WORKER_REGISTRY)
GPU_MEMORY = Gauge(
    "batchgen_gpu_memory_bytes", "GPU memory allocated by this process (0 without CUDA)", registry=WORKER_REGISTRY
)

CONTROLLER_REGISTRY = CollectorRegistry()
RUN_ITEMS = Gauge(
    "batchgen_run_items", "Items of the run by state (from storage)", ["state"], registry=CONTROLLER_REGISTRY
)
RUN_SHARDS = Gauge(
    "batchgen_run_shards", "Shards of the run: finished or unfinished", ["state"], registry=CONTROLLER_REGISTRY
)
RUN_JOBS = Gauge(
    "batchgen_run_jobs", "Latest job of every shard group, by job state", ["state"], registry=CONTROLLER_REGISTRY
)
RUN_GROUPS = Gauge("batchgen_run_groups", "Shard groups by controller status", ["status"], registry=CONTROLLER_REGISTRY)
RELAUNCHES = Counter("batchgen_job_relaunches", "Jobs created as attempt 2 or later", registry=CONTROLLER_REGISTRY)
API_ERRORS = Counter(
    "batchgen_k8s_api_errors",
    "Failed Kubernetes API calls (each retry counts), by verb and HTTP status (0: no response)",
    ["verb", "status"],
    registry=CONTROLLER_REGISTRY,
)

WORKER_METRICS = (
    "batchgen_items_generated_total",
    "batchgen_items_resumed_total",
    "batchgen_items_adopted_total",
    "batchgen_items_failed_total",
    "batchgen_stage_seconds_bucket",
    "batchgen_stage_seconds_count",
    "batchgen_stage_seconds_sum",
    "batchgen_worker_current_info",
    "batchgen_gpu_memory_bytes",
)
CONTROLLER_METRICS = (
    "batchgen_run_items",
    "batchgen_run_shards",
    "batchgen_run_jobs",
    "batchgen_run_groups",
    "batchgen_job_relaunches_total",
    "batchgen_k8s_api_errors_total",
)
JOB_STATES = ("Pending", "Created", "Queued", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
GROUP_STATUSES = ("done", "running", "launch", "gave-up")


def _gpu_memory_bytes() -> float:
    # The control plane never imports torch: a process that has not loaded it has no GPU memory to report.
    # A scrape may also land while torch is still being imported, before torch.cuda exists.
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    if cuda is None or not cuda.is_available():
        return 0.0
    return float(cuda.memory_allocated())


GPU_MEMORY.set_function(_gpu_memory_bytes)


# -- serving ------------------------------------------------------------------------------------------------


def resolve_port(flag: int | None, configured: int = 0) -> int:
    """The flag if given, else the environment variable, else the config value; 0 means off."""
    if flag is not None:
        port, source = flag, "--metrics-port"
    elif os.environ.get(METRICS_PORT_ENV):
        text = os.environ[METRICS_PORT_ENV]
        if not text.isdigit():
            raise ConfigError(f"{METRICS_PORT_ENV}={text!r} must be a port number (0 = off)")
        port, source = int(text), METRICS_PORT_ENV
    else:
        port, source = configured, "worker.metrics_port"
    if not 0 <= port <= 65535:
        raise ConfigError(f"{source}={port} must be between 0 (off) and 65535")
    return port


def local_rank() -> int:
    value = os.environ.get("LOCAL_RANK", "0")
    return int(value) if value.isdigit() else 0


def serve(registry: CollectorRegistry, port: int, *, offset: int = 0, addr: str = "0.0.0.0") -> int | None:
    """Serve ``registry`` on ``port + offset`` in a daemon thread; returns the bound port (None when off)."""
    if not port:
        return None
    bound = port + offset
    try:
        start_http_server(bound, addr=addr, registry=registry)
    except OSError as e:
        raise ConfigError(f"metrics port {bound} (base {port} + {offset}) cannot be bound: {e}") from e
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound


# -- worker -------------------------------------------------------------------------------------------------


def shard_scanned(run_id: str, shard: str, resumed: int, adopted: int) -> None:
    ITEMS_RESUMED.inc(resumed)
    ITEMS_ADOPTED.inc(adopted)
    CURRENT.info({"run_id": run_id, "shard": shard, "item": ""})


def item_started(run_id: str, shard: str, item: str) -> None:
    CURRENT.info({"run_id": run_id, "shard": shard, "item": item})


def item_committed(timings: dict[str, float]) -> None:
    ITEMS_GENERATED.inc()
    for stage, seconds in timings.items():
        if stage in STAGES:
            STAGE_SECONDS.labels(stage).observe(seconds)


def item_failed(error: BaseException | None) -> None:
    ITEMS_FAILED.labels(type(error).__name__ if error is not None else "PeerFailure").inc()


# -- controller ---------------------------------------------------------------------------------------------


def controller_pass(reconciled) -> None:
    """Set the controller's gauges from one reconciliation pass (a ``Reconciled``)."""
    done, total = reconciled.done_items, reconciled.total_items
    failed = reconciled.failed_items
    RUN_ITEMS.labels("done").set(done)
    RUN_ITEMS.labels("failed").set(failed)
    RUN_ITEMS.labels("pending").set(total - done - failed)
    shards = [(shard, shard not in state.pending) for state in reconciled.groups for shard in state.group.shards]
    RUN_SHARDS.labels("finished").set(sum(1 for _, finished in shards if finished))
    RUN_SHARDS.labels("unfinished").set(sum(1 for _, finished in shards if not finished))
    jobs = [state.latest.state for state in reconciled.groups if state.latest is not None]
    for job_state in {*JOB_STATES, *jobs}:
        RUN_JOBS.labels(job_state).set(jobs.count(job_state))
    for status in GROUP_STATUSES:
        RUN_GROUPS.labels(status).set(reconciled.count(status))
    created = set(reconciled.created)
    RELAUNCHES.inc(
        sum(1 for s in reconciled.groups if s.latest is not None and s.latest.name in created and s.latest.attempt > 1)
    )


def api_error(verb: str, status: int | None) -> None:
    API_ERRORS.labels(verb, str(status or 0)).inc()
