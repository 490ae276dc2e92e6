"""The run controller's metrics, scraped while ``batchgen submit --wait`` drives jobs through the API emulator and
the fake operator (the same stand-ins as tests/test_k8s_e2e.py), with two injected 503s from the API server."""

from __future__ import annotations

import json
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.core import metrics
from tests._dist import free_port_block
from tests._scrape import scrape, value
from tests.test_k8s_e2e import ROOT, cluster, submit_command  # noqa: F401 (cluster is a fixture)
from tests.test_metrics import _scrape_until_exit

pytestmark = pytest.mark.slow
ITEMS = 8  # two shards of test_k8s_e2e.SHARD_SIZE


def test_controller_and_worker_pods_serve_metrics_and_pods_log_json(
    cluster,  # noqa: F811 (the fixture imported above)
    tmp_path,
    s3_server,
    s3_uri,
    tiny_model_dir,
):
    kube, start_operator = cluster
    manifest = tmp_path / "metrics.parquet"
    pq.write_table(pa.table({"prompt": [f"a small boat number {i}" for i in range(ITEMS)]}), manifest)
    port = free_port_block(2)
    worker_port = port + 1
    # One job at a time: the fake operator runs every pod on this host, where two pods would share a port.
    observability = ["--worker-metrics-port", str(worker_port), "--worker-log-format", "json", "--max-jobs", "1"]
    # The fake operator here runs PyTorchJobs; with auto the emulator (which also serves TrainJob) would pick TrainJob.
    observability += ["--launcher", "pytorchjob"]
    command = submit_command(
        kube, manifest, s3_uri, s3_server, tiny_model_dir, "--metrics-port", str(port), *observability
    )
    # Two 503s the controller's backend retries (and counts), before the operator starts polling the same API.
    kube.emulator.fail_next(503, 503)
    with (tmp_path / "submit.log").open("w") as log_out:
        proc = subprocess.Popen(command, stdout=log_out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            samples = scrape(port)
            if samples and value(samples, "batchgen_k8s_api_errors_total") >= 2:
                break
            time.sleep(0.1)
        start_operator()
        scrapes = _scrape_until_exit(proc, [port, worker_port])
    seen, worker_seen = scrapes[port], scrapes[worker_port]
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text()[-4000:]

    assert seen, "the controller never answered on its metrics port"
    assert set(metrics.CONTROLLER_METRICS) <= set(seen[-1])
    assert value(seen[-1], "batchgen_k8s_api_errors_total", status="503") == 2
    assert all(value(s, "batchgen_run_items") in (0, ITEMS) for s in seen)  # done + failed + pending
    assert any(value(s, "batchgen_run_jobs", state="Running") + value(s, "batchgen_run_jobs", state="Created")
               + value(s, "batchgen_run_jobs", state="Pending") >= 1 for s in seen)  # fmt: skip
    assert max(value(s, "batchgen_run_items", state="done") for s in seen) >= 1
    assert worker_seen, "no worker pod answered on its metrics port"
    assert max(value(s, "batchgen_items_generated_total") for s in worker_seen) >= 1
    (current,) = worker_seen[-1]["batchgen_worker_current_info"]
    assert current.labels["shard"].startswith("shard-")
    pod_lines = [line for log in (tmp_path / "nodes" / "logs").glob("*.log") for line in log.read_text().splitlines()]
    records = [json.loads(line) for line in pod_lines if line.startswith("{")]
    scanned = [r for r in records if r["logger"] == "batchgen.worker" and "to generate" in r["message"]]
    assert scanned and all(r["rank"] == 0 and r["run_id"] == current.labels["run_id"] for r in scanned), records[:5]
    assert (
        value(seen[-1], "batchgen_run_shards", state="finished")
        + value(seen[-1], "batchgen_run_shards", state="unfinished")
        == ITEMS // 4
    )
