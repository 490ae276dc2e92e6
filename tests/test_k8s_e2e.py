"""End to end on Kubernetes without a cluster: ``batchgen submit`` (a real process, through the real kubernetes
client) against the API emulator, the fake training operator running each pod's actual command (torchrun ->
``batchgen worker`` on the tiny model), and S3 on a moto server. Faults: a job's first attempt fails, a controller
is killed with SIGKILL mid-run and restarted, two controllers run the same submit at once, a pod that always exits
143 and a weights fetch that always fails (both retried forever by the real v1 operator).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.core import layout
from batchgen.core.plan import list_runs
from batchgen.launch.k8s import names
from batchgen.storage import open_storage
from tests.fake_operator import FakeOperator
from tests.k8s_manifests import CONTROLLER_VERBS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ITEMS = 12
SHARD_SIZE = 4  # 3 shards
SECRET = "s3-credentials"


@pytest.fixture
def manifest(tmp_path) -> Path:
    path = tmp_path / "k8s-prompts.parquet"
    ids = [f"clip-{i:02d}" for i in range(ITEMS)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"a tiny red fox number {i}" for i in range(ITEMS)]}), path)
    return path


@pytest.fixture
def cluster(kube, tmp_path, tiny_model_dir, s3_server, s3_credentials):
    """The emulator plus a running fake operator; yields (kube, operator factory)."""
    # A cluster with the v1 training operator only: `--launcher auto` (the default) must find PyTorchJob.
    kube.emulator.served -= {"trainjobs", "trainingruntimes"}
    operators: list[FakeOperator] = []

    def start(model_dir: Path = tiny_model_dir, **kwargs) -> FakeOperator:
        operator = FakeOperator(
            kube.kubeconfig,
            kube.namespace,
            tmp_path / "nodes",
            path_map={"/models/mochi": str(model_dir), "/scratch": str(tmp_path / "nodes" / "scratch")},
            secrets={SECRET: dict(s3_credentials)},
            # What the image provides: the interpreter's environment and the package. One thread per process
            # keeps three concurrent pods civil on a small machine.
            base_env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"},
            **kwargs,
        ).start()
        operators.append(operator)
        return operator

    yield kube, start
    for operator in operators:
        operator.stop()


def submit_command(kube, manifest: Path, output: str, endpoint: str, tiny_model_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "batchgen", "submit", str(manifest),
        "--output", output,
        "--config", str(tiny_model_dir / "batchgen-tiny.toml"), "--steps", "2", "--shard-size", str(SHARD_SIZE),
        "--kubeconfig", str(kube.kubeconfig), "--namespace", kube.namespace,
        "--image", "localhost/batchgen:test", "--gpus-per-node", "1", "--num-heads", "4",
        "--s3-endpoint", endpoint, "--s3-region", "us-east-1", "--s3-secret", SECRET,
        "--wait", "--resync-seconds", "2",
        *extra,
    ]  # fmt: skip


GET = ("get", "pytorchjobs")
# The (verb, resource) pairs the controller's identity was recorded using, per test below. A 409 on create is
# followed by a get (adoption): tests/test_controller.py::test_create_is_201_then_409_adopts_the_existing_job.
VERBS_SHOWN = {
    "relaunch": {
        ("create", "pytorchjobs"),
        ("list", "pytorchjobs"),
        ("watch", "pytorchjobs"),
        ("delete", "pytorchjobs"),
    },
    "bounded-retries": {
        ("create", "pytorchjobs"),
        ("list", "pytorchjobs"),
        ("watch", "pytorchjobs"),
        ("patch", "pytorchjobs"),
        ("delete", "pytorchjobs"),
    },
    "adoption": {GET},
}


def check_outputs(output: str, kube, operator: FakeOperator, *, controllers: int = 1) -> tuple[str, list[str]]:
    """Every item exactly once (videos, sidecars, index rows, success marker) and no duplicate job."""
    storage = open_storage(output)
    (run_id,) = list_runs(storage)
    videos = [o.key for o in storage.list(f"{run_id}/videos/")]
    sidecars = [o.key for o in storage.list(layout.meta_prefix(run_id))]
    assert len(videos) == ITEMS and len(sidecars) == ITEMS
    index = pq.read_table(io.BytesIO(storage.get_bytes(layout.index_key(run_id))))
    ids = index.column("id").to_pylist()
    assert sorted(ids) == [f"clip-{i:02d}" for i in range(ITEMS)]
    assert storage.exists(layout.success_key(run_id))

    created = kube.emulator.create_count
    assert all(count == 1 for count in created.values()), created
    assert len(operator.started_jobs) == len(set(operator.started_jobs)), operator.started_jobs
    assert all(name.startswith(run_id) for name in created)
    # Every group is done and recorded in storage: its jobs were deleted (each once).
    kube.emulator.wait_for_deletions()
    assert kube.emulator.jobs(kube.namespace) == []
    deleted = [path.split("?")[0].rsplit("/", 1)[-1] for method, path in kube.emulator.requests if method == "DELETE"]
    if controllers == 1:
        assert sorted(deleted) == sorted(created)
    else:  # each controller deletes a finished group's job once; two may both see it finished (DELETE is idempotent)
        assert set(deleted) == set(created) and len(deleted) <= controllers * len(created)
    assert not operator.errors, operator.errors
    return run_id, sorted(created)


def test_submit_runs_jobs_relaunches_a_failed_first_attempt_and_writes_the_index(
    cluster, manifest, s3_server, s3_uri, tiny_model_dir
):
    kube, start_operator = cluster
    # shard 1's job fails on its first attempt (its Master exits 1: a permanent failure for ExitCode).
    operator = start_operator(fail_first_attempt=lambda job: job["metadata"]["labels"][names.SHARD_FIRST_LABEL] == "1")
    command = submit_command(kube, manifest, s3_uri, s3_server, tiny_model_dir, "--max-jobs", "3")
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]

    run_id, jobs = check_outputs(s3_uri, kube, operator)
    assert jobs == sorted([f"{run_id}-{i}-{i}-a1" for i in range(3)] + [f"{run_id}-1-1-a2"])
    assert (
        f"job {run_id}-1-1-a1 failed (PyTorchJobFailed: Master replica 0 ({run_id}-1-1-a1-master-0) exited with "
        "code 1); relaunching shards shard-000001 as attempt 2"
    ) in done.stderr
    assert kube.emulator.controller_calls() == VERBS_SHOWN["relaunch"]

    # Submitting again: everything is done, nothing is created, the run is still complete.
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"items {ITEMS}/{ITEMS} done" in again.stdout
    check_outputs(s3_uri, kube, operator)


def test_killed_controller_and_concurrent_controllers_converge_without_duplicates(
    cluster, manifest, s3_server, s3_uri, tiny_model_dir
):
    kube, start_operator = cluster
    operator = start_operator()
    command = submit_command(kube, manifest, s3_uri, s3_server, tiny_model_dir, "--max-jobs", "2")
    logs = manifest.parent
    first = subprocess.Popen(command, stdout=open(logs / "c1.out", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    second = subprocess.Popen(command, stdout=open(logs / "c2.out", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while len(operator.started_jobs) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(operator.started_jobs) == 2, "the controllers created no jobs"
        first.send_signal(signal.SIGKILL)  # mid-run: jobs are running, nothing is finalized
        first.wait(timeout=10)
        assert first.returncode == -signal.SIGKILL
        restarted = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=ROOT)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr[-4000:]
        assert second.wait(timeout=120) == 0, (logs / "c2.out").read_text()[-4000:]
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()

    # Three controllers: one killed mid-run, one running beside it, one started after the kill.
    run_id, jobs = check_outputs(s3_uri, kube, operator, controllers=3)
    assert jobs == [f"{run_id}-{i}-{i}-a1" for i in range(3)]
    assert operator.peak_running <= 2
    # A controller whose create lost the race reads the winner's job (get); which one loses is up to timing.
    assert VERBS_SHOWN["relaunch"] <= kube.emulator.controller_calls() <= VERBS_SHOWN["relaunch"] | {GET}


def _always_fails(job: dict) -> None:
    """Shard 1's pods always exit 143 (retryable); shard 2's weights fetch reads a prefix that does not exist."""
    shard = job["metadata"]["labels"][names.SHARD_FIRST_LABEL]
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        if shard == "1":
            pod["containers"][0]["command"] = ["python", "-c", "import sys; sys.exit(143)"]
        if shard == "2":
            fetch = pod["initContainers"][0]["command"]
            fetch[fetch.index("batchgen.launch.k8s.fetch") + 1] += "-missing"


def test_retries_end_for_pods_that_always_exit_143_and_for_a_weights_fetch_that_always_fails(
    cluster, manifest, s3_server, s3_uri, tiny_model_dir, tmp_path
):
    kube, start_operator = cluster
    weights = s3_uri.rsplit("/", 1)[0] + "/weights"
    source = open_storage(weights)
    for path in sorted(p for p in tiny_model_dir.rglob("*") if p.is_file()):
        source.put_file(path.relative_to(tiny_model_dir).as_posix(), path)
    operator = start_operator(model_dir=tmp_path / "node-local-weights", sabotage=_always_fails)
    command = submit_command(
        kube, manifest, s3_uri, s3_server, tiny_model_dir,
        "--max-jobs", "3", "--max-attempts", "2", "--backoff-limit", "2", "--model-s3-uri", weights,
    )  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 5, done.stderr[-4000:]
    run_id = list_runs(open_storage(s3_uri))[0]
    assert f"run {run_id}: {ITEMS - SHARD_SIZE} item(s) not done after 2 attempt(s)" in done.stderr
    kube.emulator.wait_for_deletions()  # shard 0's job: done and recorded, so deleted
    jobs = {j["metadata"]["name"]: j for j in kube.emulator.jobs(kube.namespace)}
    assert sorted(jobs) == sorted(f"{run_id}-{s}-{s}-a{a}" for s in (1, 2) for a in (1, 2))
    assert kube.emulator.create_count[f"{run_id}-0-0-a1"] == 1
    for name, job in jobs.items():
        failed = [c for c in job["status"]["conditions"] if c["type"] == "Failed" and c["status"] == "True"]
        # Stopped by the controller, recorded on the job: why, and the operator's own Failed condition.
        ended = job["metadata"]["annotations"][names.ENDED_ANNOTATION]
        assert re.search(r"pods restarted [3-6] times, more than the backoff limit 2", ended), ended
        assert "active longer than specified deadline" in failed[0]["message"]
        run = next(r for r in operator.runs.values() if r.name == name)
        # The operator recreated the pods 3 times before the controller's stop reached it, plus what was in flight.
        assert 3 <= sum(p.recreated for p in run.pods) <= 6, [p.recreated for p in run.pods]
    fetch_log = (tmp_path / "nodes" / "logs" / f"{run_id}-2-2-a1-master-0.log").read_text()
    assert fetch_log.count("weights-missing: no model files found") >= 3  # the real fetch, failing every time
    storage = open_storage(s3_uri)
    assert len(list(storage.list(f"{run_id}/videos/"))) == SHARD_SIZE  # shard 0 finished
    assert not operator.errors, operator.errors

    # status shows why each kept job failed; cancel deletes them (foreground: they go once their pods are gone).
    cluster_args = ["--kubeconfig", str(kube.kubeconfig)]  # the namespace comes from the kubeconfig context
    status = subprocess.run(
        [sys.executable, "-m", "batchgen", "status", s3_uri, "--namespace", kube.namespace, *cluster_args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    rows = [line for line in status.stdout.splitlines() if line.startswith(run_id)]
    assert len(rows) == 4 and all("Failed" in row and "pods restarted" in row for row in rows), status.stdout
    cancel = subprocess.run(
        [sys.executable, "-m", "batchgen", "cancel", run_id, *cluster_args], capture_output=True, text=True, timeout=60
    )
    assert cancel.returncode == 0 and f"4 job(s) deleted in namespace {kube.namespace}" in cancel.stdout, cancel.stderr
    kube.emulator.wait_for_deletions()
    assert kube.emulator.jobs(kube.namespace) == []
    assert kube.emulator.controller_calls() == VERBS_SHOWN["bounded-retries"]


def test_the_role_grants_exactly_the_verbs_the_controller_was_seen_using():
    shown = set().union(*VERBS_SHOWN.values())
    for role in (ROOT / "k8s" / "base" / "role.yaml", ROOT / "charts" / "batchgen" / "templates" / "role.yaml"):
        text = "\n".join(line for line in role.read_text().splitlines() if "{{" not in line)
        # Per launcher: the PyTorchJob rule (tests/test_trainjob_e2e.py holds the TrainJob rules to that path).
        (rule,) = [r for r in yaml.safe_load(text)["rules"] if r["apiGroups"] == ["kubeflow.org"]]
        assert rule["resources"] == ["pytorchjobs"], role
        assert {(verb, "pytorchjobs") for verb in rule["verbs"]} == shown, role
    assert {(verb, "pytorchjobs") for verb in CONTROLLER_VERBS[("kubeflow.org", "pytorchjobs")]} == shown


def test_submit_refuses_degrees_that_cannot_split_an_items_tokens_before_creating_any_job(
    kube, tmp_path, s3_server, s3_uri, tiny_model_dir
):
    path = tmp_path / "long-and-short.parquet"
    # 163 frames at 480x848 split 8 ways (N = 178080); 49 frames (N = 14310) do not, which only the xfuser
    # backend (it cannot pad the sequence) refuses.
    pq.write_table(pa.table({"id": ["long", "short"], "prompt": ["a fox", "a boat"], "num_frames": [163, 49]}), path)
    command = [
        sys.executable, "-m", "batchgen", "submit", str(path), "--output", s3_uri,
        "--kubeconfig", str(kube.kubeconfig), "--namespace", kube.namespace, "--image", "localhost/batchgen:test",
        "--gpus-per-node", "8", "--ulysses-degree", "8", "--sp-backend", "xfuser", "--s3-endpoint", s3_server,
        "--s3-secret", SECRET,
    ]  # fmt: skip
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode == 6, refused.stderr[-4000:]
    assert (
        "49 frames at 480x848: N=14310; the xfuser backend cannot pad, so ulysses x ring must divide 14310 but is "
        "8x1=8 (items short)" in refused.stderr
    )
    assert kube.emulator.create_count == {} and kube.emulator.jobs(kube.namespace) == []
