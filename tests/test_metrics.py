"""Prometheus metrics: the port setting, the controller's gauges over real HTTP, and a local run's workers
scraped while they work (with JSON logs on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchgen.core import metrics
from batchgen.core.errors import ConfigError
from batchgen.launch.k8s.controller import Group, GroupState, Reconciled
from batchgen.launch.k8s.names import ATTEMPT_LABEL
from batchgen.launch.k8s.pytorchjob import PyTorchJobInfo
from tests._dist import free_port_block
from tests._runs import SMALL_SHAPE, tiny_run_args, write_manifest
from tests._scrape import scrape, value

ROOT = Path(__file__).resolve().parents[1]


def test_port_from_flag_then_environment_then_config(monkeypatch):
    monkeypatch.delenv(metrics.METRICS_PORT_ENV, raising=False)
    assert metrics.resolve_port(None, 0) == 0
    assert metrics.resolve_port(None, 9100) == 9100
    monkeypatch.setenv(metrics.METRICS_PORT_ENV, "9200")
    assert metrics.resolve_port(None, 9100) == 9200
    assert metrics.resolve_port(9300, 9100) == 9300
    monkeypatch.setenv(metrics.METRICS_PORT_ENV, "nine")
    with pytest.raises(ConfigError, match="BATCHGEN_METRICS_PORT='nine'"):
        metrics.resolve_port(None)
    with pytest.raises(ConfigError, match="--metrics-port=70000"):
        metrics.resolve_port(70000)


def test_a_taken_port_is_a_clear_error():
    port = free_port_block(1)
    assert metrics.serve(metrics.CONTROLLER_REGISTRY, port, addr="127.0.0.1") == port
    with pytest.raises(ConfigError, match=f"metrics port {port} .* cannot be bound"):
        metrics.serve(metrics.CONTROLLER_REGISTRY, port, addr="127.0.0.1")


def job(name: str, attempt: int, condition: str | None) -> PyTorchJobInfo:
    conditions = [{"type": condition, "status": "True"}] if condition else []
    return PyTorchJobInfo(name, "ns", "uid", "1", {ATTEMPT_LABEL: str(attempt)}, {}, conditions)


def test_controller_gauges_over_http():
    groups = [
        GroupState(Group(("shard-000000",)), [], job("j0-a1", 1, "Succeeded"), "done"),
        GroupState(Group(("shard-000001",)), ["shard-000001"], job("j1-a2", 2, None), "running"),
        GroupState(Group(("shard-000002", "shard-000003")), ["shard-000003"], job("j2-a1", 1, "Running"), "running"),
    ]
    relaunches_before = metrics.RELAUNCHES._value.get()
    metrics.controller_pass(
        Reconciled(groups, created=["j1-a2"], adopted=[], done_items=9, total_items=16, failed_items=2)
    )
    port = free_port_block(1)
    metrics.serve(metrics.CONTROLLER_REGISTRY, port, addr="127.0.0.1")
    samples = scrape(port)
    assert value(samples, "batchgen_run_items", state="done") == 9
    assert value(samples, "batchgen_run_items", state="failed") == 2
    assert value(samples, "batchgen_run_items", state="pending") == 5
    assert value(samples, "batchgen_run_shards", state="finished") == 2
    assert value(samples, "batchgen_run_shards", state="unfinished") == 2
    assert value(samples, "batchgen_run_jobs", state="Succeeded") == 1
    assert value(samples, "batchgen_run_jobs", state="Pending") == 1
    assert value(samples, "batchgen_run_jobs", state="Running") == 1
    assert value(samples, "batchgen_run_jobs", state="Failed") == 0
    assert value(samples, "batchgen_run_groups", status="running") == 2
    assert value(samples, "batchgen_job_relaunches_total") == relaunches_before + 1
    assert set(metrics.CONTROLLER_METRICS) - {"batchgen_k8s_api_errors_total"} <= set(samples)


def _scrape_until_exit(proc: subprocess.Popen, ports: list[int]) -> dict[int, list[dict]]:
    """Every successful scrape of each port while ``proc`` runs (its stdout is small: no pipe fills up)."""
    scrapes: dict[int, list[dict]] = {port: [] for port in ports}
    while proc.poll() is None:
        for port, seen in scrapes.items():
            samples = scrape(port)
            if samples is not None:
                seen.append(samples)
        time.sleep(0.1)
    return scrapes


@pytest.mark.slow
def test_local_run_workers_serve_metrics_while_they_work(tmp_path, tiny_model_dir):
    # Three items per worker: after its first commit a worker still generates two, so scrapes see the commit.
    manifest = write_manifest(tmp_path / "prompts.parquet", 6)
    small = [arg for key, val in SMALL_SHAPE.items() for arg in (f"--{key.replace('_', '-')}", str(val))]
    port = free_port_block(2)  # worker i serves on port + i
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    command = [
        sys.executable, "-m", "batchgen", "-v", "--log-format", "json", "run", str(manifest), "--output", str(tmp_path / "out"),
        *tiny_run_args(tiny_model_dir), *small, "--shard-size", "3", "--workers", "2", "--metrics-port", str(port),
    ]  # fmt: skip
    log_file = tmp_path / "stderr.jsonl"
    with log_file.open("w") as log_out:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_out, text=True, env=env)
        scrapes = _scrape_until_exit(proc, [port, port + 1])
    stdout, _ = proc.communicate()
    stderr = log_file.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    run_id = next(line.split()[1] for line in stdout.splitlines() if line.startswith("run "))

    for worker_port, seen in scrapes.items():
        assert seen, f"worker on port {worker_port} never answered"
        last = seen[-1]
        # Histogram samples appear with the first observation; a worker's last answered scrape may precede its
        # first commit (a busy 2-core machine can leave a worker's endpoint unanswered while it generates).
        stage_samples = {f"batchgen_stage_seconds_{kind}" for kind in ("bucket", "count", "sum")}
        expected = set(metrics.WORKER_METRICS) - {"batchgen_items_failed_total"}
        if not value(last, "batchgen_items_generated_total"):
            expected -= stage_samples
        assert expected <= set(last)
        (current,) = last["batchgen_worker_current_info"]
        assert current.labels["run_id"] == run_id and current.labels["shard"].startswith("shard-")
        for samples in seen:  # every committed item has its stage timings observed
            generated = value(samples, "batchgen_items_generated_total")
            for stage in metrics.STAGES:
                assert value(samples, "batchgen_stage_seconds_count", stage=stage) == generated
        assert value(last, "batchgen_items_failed_total") == 0
    assert max(value(s, "batchgen_items_generated_total") for seen in scrapes.values() for s in seen) >= 1

    records = [json.loads(line) for line in stderr.splitlines()]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(records[0])
    scanned = [r for r in records if r["logger"] == "batchgen.worker" and "to generate" in r["message"]]
    assert len(scanned) == 2 and all(r["run_id"] == run_id and r["shard"] in r["message"] for r in scanned)
    assert any(r["logger"] == "batchgen.progress" and "items/s" in r["message"] for r in records)
