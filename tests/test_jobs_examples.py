"""jobs/: the ready-to-apply PyTorchJob examples are exactly what `batchgen render` prints, and a cluster would
accept them (CRD schema with unknown fields refused, plus the operator's webhook rules)."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from batchgen.cli import main as batchgen_main
from batchgen.launch.k8s.pytorchjob import CONTAINER_NAME
from batchgen.launch.k8s.settings import LaunchSettings
from tests.k8s_manifests import all_problems, load_all, pod_security_problems, secret_env_problems
from tests.k8s_schema import webhook_problems
from tools import k8s_examples as examples

JOBS = Path(__file__).resolve().parents[1] / "jobs"
BY_FILE = {example.filename: example for example in examples.EXAMPLES}

# The shapes issue 4 asks for: (nodes, GPUs per node, ulysses, ring, cfg).
SHAPES = {
    "1x8-ulysses8.yaml": (1, 8, 8, 1, 1),
    "2x8-cfg2-ulysses8.yaml": (2, 8, 8, 1, 2),
    "1x8-cfg2-ulysses4.yaml": (1, 8, 4, 1, 2),
    "1x1.yaml": (1, 1, 1, 1, 1),
}


def test_jobs_folder_has_no_drift():
    assert sorted(p.name for p in JOBS.glob("*.yaml")) == sorted(SHAPES)
    assert examples.drift(JOBS) == []
    assert examples.main(["--check", str(JOBS)]) == 0


@pytest.mark.parametrize("filename", sorted(SHAPES))
def test_example_is_batchgen_render_output(filename, capsys):
    header, body = examples.split_header((JOBS / filename).read_text())
    command = next(line for line in header if line.startswith("#   batchgen render "))
    argv = shlex.split(command[len("#   batchgen ") :])
    assert argv == examples.render_args(BY_FILE[filename])
    capsys.readouterr()
    assert batchgen_main(argv) == 0
    assert capsys.readouterr().out == body


@pytest.mark.parametrize("filename", sorted(SHAPES))
def test_example_is_accepted_by_a_cluster(filename):
    (job,) = load_all((JOBS / filename).read_text())
    assert all_problems([job]) == []
    assert webhook_problems(job) == []
    assert secret_env_problems([job]) == []
    nodes, gpus, ulysses, ring, cfg = SHAPES[filename]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == ({"Master", "Worker"} if nodes > 1 else {"Master"})
    assert specs["Master"]["replicas"] == 1
    assert sum(spec["replicas"] for spec in specs.values()) == nodes
    assert job["spec"]["nprocPerNode"] == str(gpus)
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    for rtype, spec in specs.items():
        assert spec["restartPolicy"] == "ExitCode"
        pod = spec["template"]["spec"]
        assert pod_security_problems(pod, f"{filename} {rtype}") == []
        (container,) = [c for c in pod["containers"] if c["name"] == CONTAINER_NAME]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        command = container["command"]
        degrees = {
            flag: command[command.index(flag) + 1] for flag in ("--ulysses-degree", "--ring-degree", "--cfg-degree")
        }
        assert degrees == {"--ulysses-degree": str(ulysses), "--ring-degree": str(ring), "--cfg-degree": str(cfg)}
        assert ulysses * ring * cfg <= nodes * gpus and (nodes * gpus) % (ulysses * ring * cfg) == 0


def test_check_reports_every_kind_of_drift(tmp_path):
    copy = tmp_path / "jobs"
    shutil.copytree(JOBS, copy)
    assert examples.drift(copy) == []

    edited = copy / "1x1.yaml"
    edited.write_text(edited.read_text().replace("ttlSecondsAfterFinished: 604800", "ttlSecondsAfterFinished: 60"))
    (copy / "1x8-ulysses8.yaml").unlink()
    (copy / "hand-written.yaml").write_text("kind: PyTorchJob\n")
    problems = examples.drift(copy)
    assert problems == [
        f"{copy / '1x8-ulysses8.yaml'}: missing",
        f"{edited}: differs from what render_pytorchjob produces",
        f"{copy / 'hand-written.yaml'}: not a generated example (remove it or add it to EXAMPLES)",
    ]
    assert examples.main(["--check", str(copy)]) == 1

    # --write repairs what it generates and leaves unrelated files to the user.
    assert examples.main(["--write", str(copy)]) == 0
    assert examples.drift(copy) == [
        f"{copy / 'hand-written.yaml'}: not a generated example (remove it or add it to EXAMPLES)"
    ]
    assert not list(copy.glob("*.tmp"))


def test_examples_need_no_values_file():
    with pytest.raises(ValueError, match="tolerations"):
        examples.render_flags(
            LaunchSettings(output="s3://bucket/out", tolerations=({"key": "gpu", "operator": "Exists"},))
        )
    assert examples.render_flags(LaunchSettings()) == []
