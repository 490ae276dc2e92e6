"""Everything batchgen ships or renders, admitted by a real API server: kubectl's strict field validation, the CRDs'
schemas and CEL rules, the JobSet and Trainer webhooks and Pod Security admission at `restricted`. A rejection
fails, and so does any warning the server returns (a Job whose pod template breaks `restricted` is a warning)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.realk8s.conftest import ROOT, restricted_namespace, skip_module_unless_available

skip_module_unless_available()

OVERLAYS = sorted(p.parent for p in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [ROOT / "k8s" / "base", *OVERLAYS]
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))
CHART = ROOT / "charts" / "batchgen"
RUN_ID = "prompts-0123456789ab"


def dry_run_apply(plane, *source: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return plane.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--validate=strict",
        "--field-manager=batchgen-tests",
        *source,
        stdin=stdin,
        check=False,
    )


def assert_admitted_cleanly(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, f"{what} rejected by the API server:\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), f"{what}: the API server warned:\n{result.stderr}"


def namespaces_of(yaml_text: str) -> set[str]:
    return {
        doc["metadata"]["namespace"]
        for doc in yaml.safe_load_all(yaml_text)
        if doc and doc["metadata"].get("namespace")
    }


def test_server_reports_the_release_it_was_built_from(control_plane):
    from tools.kube import kubebin

    version = yaml.safe_load(control_plane.kubectl("version", "-o", "yaml").stdout)["serverVersion"]
    assert version["gitVersion"] == kubebin.version_of("kubernetes")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomizations_are_admitted(control_plane, kustomization: Path):
    rendered = control_plane.kubectl("kustomize", str(kustomization)).stdout
    for name in namespaces_of(rendered):
        restricted_namespace(control_plane, name)
    assert_admitted_cleanly(dry_run_apply(control_plane, "-k", str(kustomization)), str(kustomization))


@pytest.mark.parametrize("job_file", JOB_FILES, ids=lambda p: p.name)
def test_example_jobs_are_admitted(control_plane, job_file: Path):
    for name in namespaces_of(job_file.read_text()):
        restricted_namespace(control_plane, name)
    assert_admitted_cleanly(dry_run_apply(control_plane, "-f", str(job_file)), str(job_file))


def batchgen_render(namespace: str, *launch: str) -> str:
    command = [
        sys.executable,
        "-m",
        "batchgen",
        "render",
        "--run-id",
        RUN_ID,
        "--shards",
        "0:4",
        "--shards-per-job",
        "2",
        "--output",
        "s3://videos-out/runs",
        "--namespace",
        namespace,
        "--model-pvc",
        "mochi-weights",
        "--gpus-per-node",
        "2",
        "--nodes",
        "2",
        *launch,
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def split_runtime(rendered: str) -> tuple[str, str]:
    """`batchgen render --launcher trainjob` prints the TrainingRuntime, then the TrainJobs."""
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    runtimes = [d for d in docs if d["kind"] == "TrainingRuntime"]
    jobs = [d for d in docs if d["kind"] != "TrainingRuntime"]
    return yaml.safe_dump_all(runtimes), yaml.safe_dump_all(jobs)


def test_rendered_pytorchjobs_are_admitted(control_plane, namespace):
    rendered = batchgen_render(namespace, "--launcher", "pytorchjob")
    assert_admitted_cleanly(dry_run_apply(control_plane, "-f", "-", stdin=rendered), "batchgen render (pytorchjob)")


def test_rendered_trainjobs_are_admitted(control_plane, namespace):
    """The Trainer's webhook refuses a TrainJob whose runtime does not exist, even in a dry run: the rendered
    TrainingRuntime is created for real first (as submit and the chart do), then the TrainJobs are checked."""
    runtime, jobs = split_runtime(batchgen_render(namespace, "--launcher", "trainjob", "--trainer-api", "v2.3"))
    assert_admitted_cleanly(dry_run_apply(control_plane, "-f", "-", stdin=runtime), "rendered TrainingRuntime")
    created = control_plane.kubectl("apply", "--server-side", "--validate=strict", "-f", "-", stdin=runtime)
    assert "warning" not in created.stderr.lower(), created.stderr
    assert_admitted_cleanly(dry_run_apply(control_plane, "-f", "-", stdin=jobs), "batchgen render (trainjob v2.3)")


def test_trainer_v21_shape_is_refused_by_a_v23_server_naming_the_field(control_plane, namespace):
    """The built Trainer is v2.3: podTemplateOverrides is gone from its TrainJob schema, so the server refuses the
    v2.1 shape and names the field, the message batchgen's rejection hint keys on (backend.rejection_hint)."""
    runtime, jobs = split_runtime(batchgen_render(namespace, "--launcher", "trainjob", "--trainer-api", "v2.1"))
    control_plane.kubectl("apply", "--server-side", "-f", "-", stdin=runtime)
    result = dry_run_apply(control_plane, "-f", "-", stdin=jobs)
    assert result.returncode != 0
    assert ".spec.podTemplateOverrides: field not declared in schema" in result.stderr, result.stderr


# -- the chart with the built helm ----------------------------------------------------------------------------
def helm(plane, *args: str) -> subprocess.CompletedProcess:
    env = {"KUBECONFIG": str(plane.kubeconfig), "PATH": f"{plane.bin}:/usr/bin:/bin", "HOME": str(plane.root)}
    return subprocess.run([str(plane.bin / "helm"), *args], capture_output=True, text=True, env=env, check=False)


CHART_VALUES = (
    "--set",
    "run.manifest=s3://videos-in/prompts.parquet",
    "--set",
    "run.output=s3://videos-out/runs",
    "--set",
    "model.pvc.claimName=mochi-weights",
    "--set",
    "trainer.apiVersion=v2.3",
)


def release_objects(plane, namespace: str, release: str) -> list[str]:
    kinds = "jobs,configmaps,serviceaccounts,roles,rolebindings,services,trainingruntimes"
    listing = plane.kubectl("get", kinds, "-n", namespace, "-l", f"app.kubernetes.io/instance={release}", "-o", "name")
    return listing.stdout.split()


def wait_for_pod(plane, namespace: str, timeout_s: float = 60) -> None:
    """The Job controller creates the controller pod only if Pod Security (enforce=restricted) admits it."""
    deadline = time.monotonic() + timeout_s
    while not plane.kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.strip():
        assert time.monotonic() < deadline, plane.kubectl("get", "events", "-n", namespace).stdout
        time.sleep(0.5)


def controller_args(plane, namespace: str, release: str) -> list[str]:
    job = f"{release}-batchgen-controller"
    return yaml.safe_load(plane.kubectl("get", "job", job, "-n", namespace, "-o", "yaml").stdout)["spec"]["template"][
        "spec"
    ]["containers"][0]["args"]


def test_chart_install_upgrade_uninstall(control_plane, namespace):
    release, chart_args = "gen", ["--namespace", namespace, *CHART_VALUES]
    assert_admitted_cleanly(
        helm(control_plane, "install", release, str(CHART), "--dry-run=server", *chart_args),
        "helm install --dry-run=server",
    )
    assert release_objects(control_plane, namespace, release) == []
    assert_admitted_cleanly(helm(control_plane, "install", release, str(CHART), *chart_args), "helm install")
    objects = release_objects(control_plane, namespace, release)
    assert f"job.batch/{release}-batchgen-controller" in objects
    assert any(o.startswith("trainingruntime.trainer.kubeflow.org/") for o in objects), objects
    wait_for_pod(control_plane, namespace)
    assert_admitted_cleanly(helm(control_plane, "upgrade", release, str(CHART), *chart_args), "helm upgrade (same)")
    # A changed value needs a new controller Job (its pod template is immutable): NOTES.txt and docs say delete
    # the Job, then upgrade. The server enforces the first half...
    changed = [*chart_args, "--set", "run.maxJobs=2"]
    refused = helm(control_plane, "upgrade", release, str(CHART), *changed)
    assert refused.returncode != 0 and "field is immutable" in refused.stderr, refused.stderr
    # ...and the documented way works.
    control_plane.kubectl("delete", "job", f"{release}-batchgen-controller", "-n", namespace, "--wait=true")
    assert_admitted_cleanly(helm(control_plane, "upgrade", release, str(CHART), *changed), "helm upgrade (changed)")
    args = controller_args(control_plane, namespace, release)
    assert args[args.index("--max-jobs") + 1] == "2"
    assert_admitted_cleanly(
        helm(control_plane, "uninstall", release, "--namespace", namespace, "--wait"), "helm uninstall"
    )
    assert release_objects(control_plane, namespace, release) == []


def pod_security_refusals(plane, namespace: str, timeout_s: float = 90) -> list[str]:
    """The events in which the training operator reports a pod the API server refused for Pod Security."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = yaml.safe_load(plane.kubectl("get", "events", "-n", namespace, "-o", "yaml").stdout)["items"]
        refusals = [e["message"] for e in events if "violates PodSecurity" in e.get("message", "")]
        if refusals:
            return refusals
        time.sleep(1)
    return []


def test_pytorchjob_init_container_is_the_one_pod_security_refusal(control_plane, namespace):
    """The documented exception (README, docs/kubernetes.md): the v1 training operator adds its own `init-pytorch`
    container (no securityContext) to the Worker pods of a multi-node PyTorchJob, which `restricted` refuses.
    Asserted on the real operator: that container, and nothing of ours, is what the server names."""
    if not (control_plane.bin / "training-operator.v1").exists():
        pytest.fail("training-operator.v1 was not built (see the .failed file in the kube-bin cache)")
    rendered = batchgen_render(namespace, "--launcher", "pytorchjob")
    control_plane.kubectl("apply", "--server-side", "--validate=strict", "-f", "-", stdin=rendered)
    refusals = pod_security_refusals(control_plane, namespace)
    assert refusals, control_plane.kubectl("get", "events", "-n", namespace).stdout
    for message in refusals:
        assert 'container "init-pytorch"' in message or 'containers "init-pytorch"' in message, message
        named = set(re.findall(r'containers? "([^"]+)"', message))
        assert named == {"init-pytorch"}, message
    pods = control_plane.kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.split()
    assert pods and all("-master-" in pod for pod in pods), pods  # the Master pods have no init container
