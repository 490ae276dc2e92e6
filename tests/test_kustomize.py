"""k8s/: the kustomize base and the example overlay built with `kubectl kustomize` (offline), every object
validated against the real schemas; the base holds the same objects as the Helm chart, and the launch settings the
controller would read render PyTorchJobs a cluster accepts."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from batchgen.core.config import RunConfig, load_config
from batchgen.core.layout import shard_id
from batchgen.launch.k8s.names import KUEUE_QUEUE_LABEL
from batchgen.launch.k8s.pytorchjob import render_pytorchjob
from batchgen.launch.k8s.settings import LaunchSettings
from batchgen.launch.k8s.trainjob import render_trainingruntime, render_trainjob
from tests.fixtures.ci import required_tool
from tests.k8s_manifests import (
    all_problems,
    by_kind,
    controller_launch_settings,
    controller_pod,
    env_of,
    load_all,
    pod_security_problems,
    rbac_problems,
    secret_env_problems,
    submit_args,
)
from tests.k8s_schema import pytorchjob_problems, trainer_problems

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "k8s" / "base"
OVERLAY = ROOT / "k8s" / "overlays" / "example"


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = required_tool("kubectl")
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return load_all(result.stdout)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize(BASE)


@pytest.fixture(scope="module")
def overlay() -> list[dict[str, Any]]:
    return kustomize(OVERLAY)


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_every_object_is_valid(which, request, tmp_path):
    objects = request.getfixturevalue(which)
    namespace = {"base": "batchgen", "overlay": "videos"}[which]
    assert sorted(o["kind"] for o in objects) == [
        "ConfigMap", "Job", "Role", "RoleBinding", "Service", "ServiceAccount", "ServiceAccount", "TrainingRuntime",
    ]  # fmt: skip
    assert all_problems(objects) == []
    assert rbac_problems(objects) == []
    assert pod_security_problems(controller_pod(objects), f"{which} controller") == []
    assert secret_env_problems(objects) == []
    for obj in objects:
        assert obj["metadata"]["namespace"] == namespace
    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "batchgen", "namespace": namespace}]

    settings = controller_launch_settings(objects, tmp_path, namespace)
    args = submit_args(objects, tmp_path, namespace)
    assert settings.output == args.output, "launch.yaml's output must be the controller's --output"
    assert settings.namespace == namespace
    assert settings.service_account == "batchgen-worker"
    (config_map,) = by_kind(objects, "ConfigMap")
    (tmp_path / "run.toml").write_text(config_map["data"]["run.toml"])
    load_config(tmp_path / "run.toml")
    job = render_pytorchjob("prompts-0123456789ab", [shard_id(0), shard_id(1)], settings)
    assert pytorchjob_problems(job) == []
    assert pod_security_problems(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"], "worker") == []
    # The shipped runtime is the one batchgen renders from the same launch settings (no drift between the two).
    (runtime,) = by_kind(objects, "TrainingRuntime")
    assert runtime["metadata"]["name"] == settings.runtime_name
    assert runtime["spec"] == render_trainingruntime(settings)["spec"]
    trainjob = render_trainjob("prompts-0123456789ab", [shard_id(0), shard_id(1)], settings)
    assert trainer_problems(trainjob, "v2.1.0") == []


def _normalised(obj: dict[str, Any]) -> dict[str, Any]:
    """What differs only by tool: namespace (set at install), who manages it, Helm's chart label, key order and
    comments (gone after parsing)."""
    obj = copy.deepcopy(obj)
    meta = obj["metadata"]
    meta.pop("namespace", None)
    for key in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
        meta.get("labels", {}).pop(key, None)
    if obj["kind"] == "ConfigMap":  # compared by meaning below: the kustomize files carry comments
        obj["data"] = {
            "run.toml": _toml_meaning(obj["data"]["run.toml"]),
            "launch.yaml": LaunchSettings.from_dict(yaml.safe_load(obj["data"]["launch.yaml"])).to_dict(),
        }
    return obj


def _toml_meaning(text: str) -> dict[str, Any]:
    import tomllib

    return RunConfig.from_dict(tomllib.loads(text)).to_dict()


def test_base_is_the_chart(base):
    """The base equals `helm template batchgen charts/batchgen` with the values that describe it."""
    values = {
        "crdCheck": {"enabled": False},
        "run": {"manifest": "s3://my-bucket/manifests/prompts.parquet", "output": "s3://my-bucket/videos"},
        "model": {"pvc": {"claimName": "mochi-weights"}},
        "s3": {"credentialsSecret": {"name": "s3-credentials"}},
    }
    with helm.Chart.load(ROOT / "charts" / "batchgen") as chart:
        rendered = chart.render(values, name="batchgen", namespace="batchgen", is_install=True)
    from_chart = [obj for path, text in rendered.items() if not path.endswith("NOTES.txt") for obj in load_all(text)]

    def keyed(objects):
        return {(o["kind"], o["metadata"]["name"]): _normalised(o) for o in objects}

    chart_objects, base_objects = keyed(from_chart), keyed(base)
    assert sorted(chart_objects) == sorted(base_objects)
    for key in chart_objects:
        assert base_objects[key] == chart_objects[key], key
    for obj in base:
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kustomize"


def test_overlay_customises_the_run(overlay, tmp_path):
    accounts = {o["metadata"]["name"]: o for o in by_kind(overlay, "ServiceAccount")}
    for name in ("batchgen", "batchgen-worker"):
        assert accounts[name]["metadata"]["annotations"] == {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/batchgen-videos"
        }
    pod = controller_pod(overlay)
    assert "initContainers" not in pod
    for container in pod["containers"]:
        assert container["image"] == "registry.example.com/ml/batchgen:0.1.0-cu124"
        env = env_of(container)
        # Workload identity: no static credentials left from the base.
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
        assert env["AWS_REGION"]["value"] == "us-east-1"
    args = submit_args(overlay, tmp_path, "videos")
    assert args.manifest == "s3://acme-video-prompts/2025-06/june-batch.parquet"
    assert (args.max_jobs, args.shards_per_job, args.wait) == (8, 2, True)

    settings = controller_launch_settings(overlay, tmp_path, "videos")
    assert settings.image == "registry.example.com/ml/batchgen:0.1.0-cu124"
    assert settings.s3_secret is None
    job = render_pytorchjob("june-batch-0123456789ab", [shard_id(4), shard_id(5)], settings)
    assert pytorchjob_problems(job) == []
    assert job["metadata"]["namespace"] == "videos"
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-h100"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 1)
    pod = specs["Worker"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "batchgen-worker"
    command = pod["containers"][0]["command"]
    assert command[command.index("--ulysses-degree") + 1 :][:5] == ["8", "--ring-degree", "1", "--cfg-degree", "2"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env_of(pod["containers"][0]))

    (config_map,) = by_kind(overlay, "ConfigMap")
    (tmp_path / "run.toml").write_text(config_map["data"]["run.toml"])
    config = load_config(tmp_path / "run.toml")
    assert (config.generation.num_frames, config.worker.shard_size) == (163, 32)
