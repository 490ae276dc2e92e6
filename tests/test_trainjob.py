"""TrainJob launcher: rendering validated against the real Trainer v2.1 and v2.3 CRDs (strict), the failure policy,
condition mapping, and choosing the launcher from the API server's discovery."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from batchgen.core.errors import ClusterError, TransientClusterError
from batchgen.core.layout import shard_id
from batchgen.launch.k8s import names
from batchgen.launch.k8s.launchers import make_backend
from batchgen.launch.k8s.names import KUEUE_QUEUE_LABEL
from batchgen.launch.k8s.pytorchjob import PyTorchJobBackend, render_pytorchjob
from batchgen.launch.k8s.trainjob import (
    DEFAULT_DEADLINE_S,
    TrainJobBackend,
    TrainJobInfo,
    render_trainingruntime,
    render_trainjob,
)
from tests.k8s_schema import TRAINER_VERSIONS, trainer_problems
from tests.test_render import BASE, RUN, SHAPES

API_OF = {"v2.1.0": "v2.1", "v2.3.0": "v2.3"}
SHARDS = [shard_id(i) for i in range(4, 8)]


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("version", TRAINER_VERSIONS)
@pytest.mark.parametrize("case_id, changes, expected", SHAPES, ids=[s[0] for s in SHAPES])
def test_shapes_validate_against_both_trainer_crds(case_id, changes, expected, version):
    settings = BASE.replace(**changes, trainer_api=API_OF[version])
    runtime, job = render_trainingruntime(settings), render_trainjob(RUN, SHARDS, settings, attempt=2)

    assert trainer_problems(runtime, version) == []
    assert trainer_problems(job, version) == []
    nodes, nproc, ulysses, ring, cfg = expected
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, nproc)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(nproc)
    command = trainer["command"]
    assert (_flag(command, "--ulysses-degree"), _flag(command, "--ring-degree"), _flag(command, "--cfg-degree")) == (
        str(ulysses), str(ring), str(cfg),
    )  # fmt: skip
    assert _flag(command, "--shards") == "4:8"
    # The PyTorchJob launcher runs the very same worker command line (one launch contract).
    pytorch = render_pytorchjob(RUN, SHARDS, settings.replace(launcher="pytorchjob"), attempt=2)
    assert pytorch["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"] == command
    assert job["metadata"]["name"] == names.job_name(RUN, 4, 7, 2) == pytorch["metadata"]["name"]
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": "batchgen-runtime",
    }
    if settings.queue_name:
        assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == settings.queue_name


@pytest.mark.parametrize("version", TRAINER_VERSIONS)
def test_each_trainer_release_refuses_the_other_ones_pod_patch(version):
    other = next(v for v in TRAINER_VERSIONS if v != version)
    job = render_trainjob(RUN, SHARDS, BASE.replace(trainer_api=API_OF[other]))
    field = "runtimePatches" if other == "v2.3.0" else "podTemplateOverrides"
    assert any(f"'{field}' was unexpected" in p for p in trainer_problems(job, version))


@pytest.mark.parametrize("version", TRAINER_VERSIONS)
@pytest.mark.parametrize(
    "kind, where",
    [
        ("TrainJob", ("spec", "trainer")),
        ("TrainingRuntime", ("spec", "template", "spec", "replicatedJobs", 0, "template", "spec")),
    ],
)
def test_strict_validation_refuses_unknown_fields(version, kind, where):
    settings = BASE.replace(trainer_api=API_OF[version])
    obj = render_trainjob(RUN, SHARDS, settings) if kind == "TrainJob" else render_trainingruntime(settings)
    broken = copy.deepcopy(obj)
    node = broken
    for key in where:
        node = node[key]
    node["numNode"] = 2  # a misspelling a lenient API server would silently drop
    assert any("'numNode' was unexpected" in p for p in trainer_problems(broken, version))


def test_runtime_fails_permanent_exit_codes_at_once_and_bounds_the_rest():
    settings = BASE.replace(model_pvc=None, model_s3_uri="s3://weights/mochi", backoff_limit=2)
    runtime = render_trainingruntime(settings)
    replicated = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert runtime["spec"]["template"]["spec"]["failurePolicy"] == {"maxRestarts": 0}
    (node,) = replicated
    job = node["template"]["spec"]
    (rule,) = job["podFailurePolicy"]["rules"]
    # No containerName: the rule also covers the init container (the weights fetch).
    assert rule == {"action": "FailJob", "onExitCodes": {"operator": "In", "values": list(range(1, 128))}}
    assert (job["backoffLimit"], job["activeDeadlineSeconds"]) == (2, 24 * 3600)  # the settings' default
    unset = render_trainingruntime(settings.replace(active_deadline_seconds=None))
    assert unset["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["activeDeadlineSeconds"] == (
        DEFAULT_DEADLINE_S
    )
    assert (
        render_trainingruntime(settings.replace(active_deadline_seconds=600))["spec"]["template"]["spec"][
            "replicatedJobs"
        ][0]["template"]["spec"]["activeDeadlineSeconds"]
        == 600
    )
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-model"]
    assert [c["name"] for c in pod["containers"]] == ["node"]
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    assert node["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}


def test_runtime_pods_are_hardened_for_restricted_pod_security():
    pod = render_trainingruntime(BASE.replace(model_pvc=None, model_s3_uri="s3://w/m"))["spec"]["template"]["spec"][
        "replicatedJobs"
    ][0]["template"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["initContainers"] + pod["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
        assert security["readOnlyRootFilesystem"] is True
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


def _info(conditions=(), jobs_status=()):
    obj = {"metadata": {"name": "j"}, "status": {"conditions": list(conditions), "jobsStatus": list(jobs_status)}}
    return TrainJobInfo.from_object(obj)


@pytest.mark.parametrize(
    "conditions, jobs_status, state, finished",
    [
        ([], [], "Created", False),
        ([], [{"name": "node", "active": 2}], "Running", False),
        ([{"type": "Suspended", "status": "True", "reason": "Suspended"}], [], "Suspended", False),
        ([{"type": "Suspended", "status": "False", "reason": "Resumed"}], [{"name": "node", "active": 1}], "Running", False),
        ([{"type": "Complete", "status": "True", "reason": "JobSetCompleted"}], [], "Succeeded", True),
        ([{"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "m"}], [], "Failed", True),
    ],
)  # fmt: skip
def test_trainjob_conditions_map_to_controller_states(conditions, jobs_status, state, finished):
    info = _info(conditions, jobs_status)
    assert (info.state, info.finished) == (state, finished)
    if state == "Failed":
        assert info.reason() == "FailedJobs: m"


SUSPENDED = {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "TrainJob is suspended"}


@pytest.mark.parametrize(
    "spec, conditions, annotations, state",
    [
        # Kueue's webhook suspends a queued TrainJob on create, before the Trainer has set any condition.
        ({"suspend": True}, [], {}, "Queued"),
        ({"suspend": True}, [SUSPENDED], {}, "Queued"),
        # Admitted: Kueue unsuspends it; the Trainer's Suspended condition may lag one update behind.
        ({"suspend": False}, [SUSPENDED], {}, "Queued"),
        ({"suspend": False}, [{**SUSPENDED, "status": "False"}], {}, "Created"),
        # Ended by batchgen (suspended for good) is a failure, queue or not.
        ({"suspend": True}, [SUSPENDED], {names.ENDED_ANNOTATION: "batchgen stopped the job"}, "Failed"),
        ({"suspend": False}, [{"type": "Complete", "status": "True", "reason": "JobSetCompleted"}], {}, "Succeeded"),
    ],
)  # fmt: skip
def test_a_trainjob_kueue_holds_suspended_is_queued_waiting_for_quota_not_failed(spec, conditions, annotations, state):
    labels = {KUEUE_QUEUE_LABEL: "gpus"}
    obj = {"metadata": {"name": "j", "labels": labels, "annotations": annotations}, "spec": spec,
           "status": {"conditions": conditions}}  # fmt: skip
    info = TrainJobInfo.from_object(obj)
    assert info.state == state
    if state == "Queued":
        assert not info.finished
        assert info.reason() == "waiting for quota: Kueue has not admitted it from LocalQueue 'gpus'"
    # Without the queue label nobody but batchgen or a user suspends it: Suspended, as before.
    unqueued = TrainJobInfo.from_object({**obj, "metadata": {**obj["metadata"], "labels": {}}})
    assert unqueued.state != "Queued"


def test_auto_prefers_trainjob_falls_back_to_pytorchjob_and_names_both_when_neither(kube):
    api = _api(kube)
    assert isinstance(make_backend("auto", kube.namespace, api), TrainJobBackend)
    assert isinstance(make_backend("pytorchjob", kube.namespace, api), PyTorchJobBackend)
    kube.emulator.fail_next(503)  # a busy API server once: discovery is retried like every call
    assert isinstance(make_backend("auto", kube.namespace, api), TrainJobBackend)
    kube.emulator.fail_next(*[503] * 5)  # still busy after every retry: a retryable exit, not a launcher guess
    with pytest.raises(TransientClusterError, match="discovery of trainer.kubeflow.org/v1alpha1 failed: HTTP 503"):
        make_backend("auto", kube.namespace, api)
    kube.emulator.served -= {"trainjobs", "trainingruntimes"}
    assert isinstance(make_backend("auto", kube.namespace, api), PyTorchJobBackend)
    kube.emulator.served.clear()
    with pytest.raises(ClusterError, match="neither TrainJob .* nor PyTorchJob"):
        make_backend("auto", kube.namespace, api)


def test_trainjob_backend_creates_adopts_and_reports_a_missing_runtime(kube):
    backend = make_backend("trainjob", kube.namespace, _api(kube))
    settings = BASE.replace(namespace=kube.namespace)
    with pytest.raises(ClusterError, match="TrainingRuntime 'batchgen-runtime' not found"):
        backend.check_runtime(settings.runtime_name)
    manifest = backend.render(RUN, SHARDS, settings, 1, group=(SHARDS[0], SHARDS[-1]))
    # What check_runtime spares a run: every create refused, one by one. The Trainer's webhook answers 403, as a
    # missing RBAC verb would: the message must say it was the webhook, not send the user to the Role.
    refusal = r"an admission webhook refused .*specified trainingRuntime must be created before the TrainJob"
    with pytest.raises(ClusterError, match=refusal):
        backend.create(manifest)
    kube.emulator.put(render_trainingruntime(settings))
    backend.check_runtime(settings.runtime_name)
    job, created = backend.create(manifest)
    again, created_again = backend.create(manifest)
    assert (created, created_again, job.uid) == (True, False, again.uid)
    # Adoption reads the existing job back: the one TrainJob verb the end-to-end test does not see.
    assert any(call[1:] == ("get", "trainer.kubeflow.org", "trainjobs") for call in kube.emulator.calls)
    assert job.kind == "TrainJob" and job.state == "Created" and job.shards == SHARDS
    assert [j.name for j in backend.list(names.run_selector(RUN))[0]] == [job.name]
    # Background: gone at once, so the Trainer (which reconciles a TrainJob being deleted) cannot recreate its
    # JobSet; the garbage collector removes the JobSet and pods (see TrainJobBackend.deletion_propagation).
    assert backend.delete(job.name) and backend.get(job.name) is None
    assert not backend.delete(job.name)


def test_ending_a_trainjob_suspends_it_and_then_it_counts_as_failed(kube):
    """spec.activeDeadlineSeconds of a TrainJob is immutable (v2.3) or absent (v2.1); spec.suspend is not."""
    backend = make_backend("trainjob", kube.namespace, _api(kube))
    settings = BASE.replace(namespace=kube.namespace)
    kube.emulator.put(render_trainingruntime(settings))
    job, _ = backend.create(backend.render(RUN, SHARDS, settings, 1, group=(SHARDS[0], SHARDS[-1])))
    backend.end(job.name, "batchgen stopped the job: too many restarts")
    ended = backend.get(job.name)
    assert ended.raw["spec"]["suspend"] is True
    assert ended.annotations[names.ENDED_ANNOTATION] == "batchgen stopped the job: too many restarts"
    assert not ended.finished  # pods still there until the Trainer has suspended the JobSet
    suspended = {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "TrainJob is suspended",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
    with kube.emulator._lock:  # the Trainer's status update (kubeflow/trainer trainjob_controller.go)
        kind = kube.emulator.kinds[("trainer.kubeflow.org", "v1alpha1", "trainjobs")]
        patch = {"status": {"conditions": [suspended]}}
        code, body, _ = kube.emulator._patch(kind, kube.namespace, job.name, patch, "status", "Warn")
    assert code == 200, body
    failed = backend.get(job.name)
    assert (failed.state, failed.finished) == ("Failed", True)
    assert failed.reason() == "batchgen stopped the job: too many restarts (Suspended: TrainJob is suspended)"


def _api(kube):
    from batchgen.launch.k8s.client import load_api_client

    return load_api_client(str(kube.kubeconfig))


def test_render_command_prints_runtime_and_trainjobs(tmp_path):
    args = [
        sys.executable, "-m", "batchgen", "render", "--run-id", RUN, "--shards", "0:4", "--shards-per-job", "2",
        "--output", "s3://b/o", "--gpus-per-node", "8", "--trainer-api", "v2.3",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    objects = list(yaml.safe_load_all(done.stdout))
    assert [o["kind"] for o in objects] == ["TrainingRuntime", "TrainJob", "TrainJob"]
    assert all(trainer_problems(o, "v2.3.0") == [] for o in objects)
    pytorch = subprocess.run([*args, "--launcher", "pytorchjob"], capture_output=True, text=True, timeout=60)
    assert [o["kind"] for o in yaml.safe_load_all(pytorch.stdout)] == ["PyTorchJob", "PyTorchJob"]


def test_a_trainer_v2_3_api_server_takes_runtime_patches_and_refuses_pod_template_overrides(tmp_path):
    from batchgen.launch.k8s.client import load_api_client
    from tests.k8s_emulator import KubeEmulator

    emulator = KubeEmulator(trainer_version="v2.3.0").start()
    try:
        api = load_api_client(str(emulator.write_kubeconfig(tmp_path / "kubeconfig", "gen")))
        settings = BASE.replace(namespace="gen", trainer_api="v2.3")
        emulator.put(render_trainingruntime(settings))
        backend = make_backend("auto", "gen", api)
        job, created = backend.create(backend.render(RUN, SHARDS, settings, 1, group=(SHARDS[0], SHARDS[-1])))
        assert created and job.raw["spec"]["runtimePatches"][0]["manager"] == "batchgen.io/controller"
        old_shape = backend.render(RUN, SHARDS, settings.replace(trainer_api="v2.1"), 2, group=(SHARDS[0], SHARDS[-1]))
        with pytest.raises(
            ClusterError, match='strict decoding error: unknown field "spec.podTemplateOverrides".*set trainer_api'
        ):
            backend.create(old_shape)
    finally:
        emulator.stop()
