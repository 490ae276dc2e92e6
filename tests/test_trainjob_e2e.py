"""End to end with the TrainJob launcher: ``batchgen submit --launcher auto`` (a real process, through the real
kubernetes client) against the API emulator serving Trainer v2 (discovery, strict CRD validation), the fake
Trainer running each pod's actual containers (the real weights fetch from S3, then torchrun -> ``batchgen
worker`` on the tiny model), and S3 on a moto server.

Faults: one group's trainer container always exits 143 (a signal: retried, but only ``backoff_limit`` times per
job), another group's weights fetch always fails (exit 3, permanent: the job fails at once). Both end in a
recorded failure within the bounds while the third group finishes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.core.plan import list_runs, load_plan
from batchgen.core.progress import scan_run
from batchgen.launch.k8s import names
from batchgen.launch.k8s.settings import LaunchSettings
from batchgen.launch.k8s.trainjob import render_trainingruntime
from batchgen.storage import open_storage
from tests.fake_trainer import FakeTrainer
from tests.k8s_manifests import TRAINJOB_VERBS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ITEMS, SHARD_SIZE = 12, 4  # 3 shards, one job each
SECRET = "s3-credentials"
IMAGE = "localhost/batchgen:test"
BACKOFF_LIMIT = 2
MAX_ATTEMPTS = 2
SIGNALLED = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]


def _wait_for(condition, timeout_s: float, what: str) -> None:
    """Poll until ``condition()``; fail naming ``what`` if it is still false after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def _shard_first(job) -> str:
    return job["metadata"]["labels"][names.SHARD_FIRST_LABEL]


def _faults(job, container):
    """Group 0: the trainer is killed by SIGTERM every time (143). Group 1: the weights are not where the fetch
    looks (the real fetch against an empty S3 prefix exits 3)."""
    if _shard_first(job) == "0" and container["name"] == "node":
        return SIGNALLED
    if _shard_first(job) == "1" and container["name"] == "fetch-model":
        source, dest = container["command"][-2:]
        return [sys.executable, "-m", "batchgen.launch.k8s.fetch", source.rstrip("/") + "-missing", dest]
    return None


@pytest.fixture
def weights_uri(s3_bucket, tiny_model_dir) -> str:
    uri = f"s3://{s3_bucket}/weights/mochi"
    storage = open_storage(uri)
    for path in sorted(tiny_model_dir.rglob("*")):
        if path.is_file():
            storage.put_file(path.relative_to(tiny_model_dir).as_posix(), path)
    return uri


def test_trainjobs_run_and_failures_end_within_bounds(
    kube, tmp_path, s3_server, s3_uri, s3_credentials, tiny_model_dir, weights_uri
):
    manifest = tmp_path / "prompts.parquet"
    ids = [f"clip-{i:02d}" for i in range(ITEMS)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"a tiny red fox number {i}" for i in range(ITEMS)]}), manifest)
    launch = [
        "--namespace", kube.namespace, "--image", IMAGE, "--gpus-per-node", "1", "--num-heads", "4",
        "--model-s3-uri", weights_uri, "--s3-endpoint", s3_server, "--s3-region", "us-east-1",
        "--s3-secret", SECRET, "--backoff-limit", str(BACKOFF_LIMIT), "--active-deadline-seconds", "600",
    ]  # fmt: skip
    # What the chart or kustomize base installs beside the controller: the runtime the TrainJobs reference.
    settings = LaunchSettings(
        output=s3_uri, namespace=kube.namespace, image=IMAGE, model_s3_uri=weights_uri, s3_endpoint=s3_server,
        s3_region="us-east-1", s3_secret=SECRET, backoff_limit=BACKOFF_LIMIT, active_deadline_seconds=600,
    )  # fmt: skip
    kube.emulator.put(render_trainingruntime(settings))
    nodes = tmp_path / "nodes"
    trainer = FakeTrainer(
        kube.kubeconfig, kube.namespace, nodes,
        path_map={"/models/mochi": str(nodes / "model"), "/scratch": str(nodes / "scratch")},
        secrets={SECRET: dict(s3_credentials)},
        base_env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"},
        override=_faults,
    ).start()  # fmt: skip
    try:
        submit = [
            sys.executable, "-m", "batchgen", "submit", str(manifest), "--output", s3_uri,
            "--config", str(tiny_model_dir / "batchgen-tiny.toml"), "--steps", "2", "--shard-size", str(SHARD_SIZE),
            "--kubeconfig", str(kube.kubeconfig), "--launcher", "auto", "--max-jobs", "3",
            "--max-attempts", str(MAX_ATTEMPTS), "--wait", "--resync-seconds", "2", *launch,
        ]  # fmt: skip
        done = subprocess.run(submit, capture_output=True, text=True, timeout=500, cwd=ROOT)
        # The run settles once storage has every shard it will get; the healthy pod may still be exiting, and
        # the trainer learns of the healthy job's deletion only on its next list, after the emulator finishes it.
        kube.emulator.wait_for_deletions()
        _wait_for(
            lambda: (
                all(run.finished for run in trainer.runs.values())
                and any(name.endswith("-2-2-a1") for name in trainer.deleted)
            ),
            timeout_s=60,
            what="every trainer run to finish and the healthy job of shard 2 (attempt 1) to be deleted",
        )
    finally:
        trainer.stop()
    assert not trainer.errors, trainer.errors
    assert done.returncode == 5, done.stdout + done.stderr[-4000:]  # incomplete: failures recorded, not lost
    assert "launcher auto: using trainjob" in done.stderr

    storage = open_storage(s3_uri)
    (run_id,) = list_runs(storage)
    progress = scan_run(storage, load_plan(storage, run_id))
    assert sorted(progress.finished_shards) == ["shard-000002"]
    assert progress.done == SHARD_SIZE

    runs = {run.name: run for run in [*trainer.runs.values(), *trainer.deleted.values()]}
    for attempt in range(1, MAX_ATTEMPTS + 1):
        signalled, unfetched = runs[f"{run_id}-0-0-a{attempt}"], runs[f"{run_id}-1-1-a{attempt}"]
        # 143 is retried on a new pod, and only backoff_limit times; exit 3 from the fetch fails at once.
        assert (signalled.finished, signalled.reason, signalled.created_pods) == (
            "Failed", "BackoffLimitExceeded", BACKOFF_LIMIT + 1,
        )  # fmt: skip
        assert (unfetched.finished, unfetched.reason, unfetched.created_pods) == ("Failed", "PodFailurePolicy", 1)
    # The healthy job ran once; once storage showed its shard done the controller deleted it (it may have been
    # deleted while its pod was still exiting, so its Complete condition is not awaited).
    assert f"{run_id}-2-2-a1" in trainer.deleted
    assert runs[f"{run_id}-2-2-a1"].pod_labels[names.RUN_LABEL] == run_id
    assert f"{run_id}-2-2-a2" not in runs and f"{run_id}-0-0-a3" not in runs

    kube.emulator.wait_for_deletions()
    jobs = kube.emulator.jobs(kube.namespace, plural="trainjobs")
    assert f"{run_id}-2-2-a1" not in {j["metadata"]["name"] for j in jobs}
    assert kube.emulator.jobs(kube.namespace) == []  # no PyTorchJob: auto preferred TrainJob
    assert all(j["metadata"]["labels"][names.RUN_LABEL] == run_id for j in jobs)
    cluster = ["--namespace", kube.namespace, "--kubeconfig", str(kube.kubeconfig), "--launcher", "auto"]
    status = subprocess.run(
        [sys.executable, "-m", "batchgen", "status", s3_uri, *cluster], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    table = {line.split()[0]: line.split()[2] for line in status.stdout.splitlines() if line.startswith(run_id)}
    assert table == {j["metadata"]["name"]: "Failed" for j in jobs} and len(jobs) == 2 * MAX_ATTEMPTS
    cancel = subprocess.run(
        [sys.executable, "-m", "batchgen", "cancel", run_id, *cluster], capture_output=True, text=True, timeout=60
    )
    assert cancel.returncode == 0 and f"{len(jobs)} job(s) deleted" in cancel.stdout, cancel.stderr
    kube.emulator.wait_for_deletions()
    assert kube.emulator.jobs(kube.namespace, plural="trainjobs") == []

    # Least privilege: what submit, status and cancel called is what the Role grants for this launcher. The grants
    # not exercised here are get on trainjobs, the adoption path (tests/test_trainjob.py creates twice), and patch,
    # which ends a job restarting too often: the runtime's Job bounds its own pod restarts, so a TrainJob needs it
    # only when the controller's count runs ahead (tests/test_trainjob.py ends one).
    used: dict[tuple[str, str], set[str]] = {}
    for call in kube.emulator.calls:
        if call.user == kube.emulator.user:
            used.setdefault((call.group, call.resource), set()).add(call.verb)
    granted = {key: set(verbs) for key, verbs in TRAINJOB_VERBS.items()}
    assert used == {
        **granted,
        ("trainer.kubeflow.org", "trainjobs"): granted[("trainer.kubeflow.org", "trainjobs")] - {"get", "patch"},
    }
