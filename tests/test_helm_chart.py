"""charts/batchgen rendered offline by the Helm v4 SDK (helm-python-sdk), every object validated against the
real schemas, plus the chart's own promises: exact namespaced RBAC, hardened pods, no secret values, names within
63 characters, a clear failure when the PyTorchJob API is missing, and launch settings that render valid jobs.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from batchgen.core.config import load_config
from batchgen.core.layout import shard_id
from batchgen.launch.k8s.names import KUEUE_QUEUE_LABEL
from batchgen.launch.k8s.pytorchjob import render_pytorchjob
from batchgen.launch.k8s.settings import LaunchSettings
from batchgen.launch.k8s.trainjob import render_trainingruntime, render_trainjob
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
)
from tests.k8s_manifests import submit_args as _submit_args
from tests.k8s_schema import TRAINER_VERSIONS, pytorchjob_problems, trainer_problems
from tests.test_trainjob import API_OF

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "batchgen"
RELEASE = "gen"
NAMESPACE = "videos"

# The least a user must give. crdCheck is off because no cluster is reachable here: the guard itself is
# tested below with it on.
REQUIRED = {
    "crdCheck": {"enabled": False},
    "run": {"manifest": "s3://videos-in/prompts.parquet", "output": "s3://videos-out/runs"},
    "model": {"pvc": {"claimName": "mochi-weights"}},
}


def merged(*overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(REQUIRED)
    for override in overrides:
        _deep_update(out, override)
    return out


def _deep_update(target: dict[str, Any], source: dict[str, Any]) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict[str, Any], *, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    return chart.render(values, name=name, namespace=namespace, is_install=True)


def objects_of(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return [obj for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt") for obj in load_all(text)]


def submit_args(objects: list[dict[str, Any]], tmp_path: Path) -> argparse.Namespace:
    return _submit_args(objects, tmp_path, NAMESPACE)


def launch_settings(objects: list[dict[str, Any]], tmp_path: Path) -> LaunchSettings:
    return controller_launch_settings(objects, tmp_path, NAMESPACE)


CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "secret-credentials": {
        "s3": {
            "endpointUrl": "https://minio.storage.svc:9000",
            "region": "eu-west-1",
            "credentialsSecret": {"name": "s3-credentials", "sessionTokenKey": "AWS_SESSION_TOKEN"},
        }
    },
    "workload-identity": {
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/batchgen"}}
    },
    "kueue": {"kueue": {"queueName": "gpu-h100"}},
    "scheduling": {
        "workers": {
            "nodes": 2,
            "ulyssesDegree": 8,
            "ringDegree": 2,
            "cpu": "64",
            "memory": "800Gi",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "rack", "operator": "In", "values": ["r1"]}]}
                        ]
                    }
                }
            },
            "priorityClassName": "batch-low",
        },
        "controller": {
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}],
            "priorityClassName": "batch-low",
        },
    },
    "rbac-off": {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "batchgen-admin-managed"}},
    "model-from-s3": {"model": {"source": "s3", "s3": {"uri": "s3://weights/mochi-1-preview"}}},
    "manifest-on-pvc": {"run": {"manifest": "/manifests/prompts.parquet", "manifestVolume": "prompt-files"}},
    "everything": {
        "image": {"repository": "registry.example.com/ml/batchgen", "tag": "0.1.0-cu124", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "run": {"name": "june-batch", "newRun": True, "maxJobs": 16, "shardsPerJob": 2, "maxJobAttempts": 5},
        "workers": {
            "cfgDegree": 2,
            "ulyssesDegree": 4,
            "activeDeadlineSeconds": 86400,
            "serviceAccount": {"create": False},
        },
        "controller": {"verbosity": 2, "activeDeadlineSeconds": 172800, "ttlSecondsAfterFinished": 3600},
    },
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_every_rendered_object_is_valid(chart, case, tmp_path):
    values = merged(CASES[case])
    objects = objects_of(render(chart, values))
    assert all_problems(objects) == []
    assert rbac_problems(objects, expect_role=values.get("rbac", {}).get("create", True)) == []
    assert pod_security_problems(controller_pod(objects), "controller Job") == []
    assert secret_env_problems(objects) == []
    for obj in objects:
        assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE

    # The chart's TrainingRuntime is the one batchgen renders from the launch settings it hands to `submit`.
    settings = launch_settings(objects, tmp_path)
    (runtime,) = by_kind(objects, "TrainingRuntime")
    assert runtime["metadata"]["name"] == settings.runtime_name
    assert runtime["spec"] == render_trainingruntime(settings)["spec"]
    for version in TRAINER_VERSIONS:
        job = render_trainjob("prompts-0123456789ab", [shard_id(0)], settings.replace(trainer_api=API_OF[version]))
        assert trainer_problems(job, version) == []
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod_security_problems(pod, "runtime") == []
    # The launch settings the chart hands to `batchgen submit` must themselves render jobs a cluster accepts.
    job = render_pytorchjob("prompts-0123456789ab", [shard_id(0), shard_id(1)], settings, attempt=1)
    assert pytorchjob_problems(job) == []
    assert pod_security_problems(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"], "worker") == []
    assert secret_env_problems([job]) == []


def test_object_set_and_names(chart):
    objects = objects_of(render(chart, merged()))
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [
        ("ConfigMap", "gen-batchgen-config"),
        ("Job", "gen-batchgen-controller"),
        ("Role", "gen-batchgen-controller"),
        ("RoleBinding", "gen-batchgen-controller"),
        ("Service", "gen-batchgen-controller"),
        ("ServiceAccount", "gen-batchgen"),
        ("ServiceAccount", "gen-batchgen-worker"),
        ("TrainingRuntime", "gen-batchgen-runtime"),
    ]
    pytorch_only = objects_of(render(chart, merged({"launcher": "pytorchjob"})))
    assert "TrainingRuntime" not in {o["kind"] for o in pytorch_only}


def test_names_stay_within_63_characters(chart):
    long_release = "a-very-long-release-name-for-a-june-batch-of-videos-x"  # Helm's maximum: 53 characters
    assert len(long_release) == 53
    helm.validate_release_name(long_release)
    values = merged({"nameOverride": "batchgen-video-generation-controller"})
    objects = objects_of(render(chart, values, name=long_release))
    assert all_problems(objects) == []  # includes DNS-1123 names <= 63 and label values <= 63
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for kind, name in names:
        assert len(name) <= 63, (kind, name)
    # Suffixes survive truncation, so the objects stay distinct and recognisable.
    suffixes = {name.rsplit("-", 1)[-1] for _, name in names}
    assert {"controller", "worker", "config", "runtime"} <= suffixes
    # Controller (Job, Role, RoleBinding), controller SA, worker SA, config, runtime: five names, no collision.
    assert len({name for _, name in names}) == 5


def test_controller_runs_submit_with_the_values(chart, tmp_path):
    values = merged(CASES["everything"])
    objects = objects_of(render(chart, values))
    pod = controller_pod(objects)
    (container,) = pod["containers"]
    args = container["args"]
    assert container["image"] == "registry.example.com/ml/batchgen:0.1.0-cu124"
    assert container["imagePullPolicy"] == "Always"
    assert args[:3] == ["-vv", "submit", "s3://videos-in/prompts.parquet"]
    assert _flag_values(args[3:]) == {
        "--output": "s3://videos-out/runs",
        "--namespace": "$(POD_NAMESPACE)",
        "--config": "/etc/batchgen/run.toml",
        "--values": "/etc/batchgen/launch.yaml",
        "--max-jobs": "16",
        "--shards-per-job": "2",
        "--max-attempts": "5",
        "--run-name": "june-batch",
        "--new-run": None,
        "--wait": None,
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/batchgen"]["readOnly"] is True

    # submit reads an s3:// manifest itself (into a temporary file on the scratch volume): no init container.
    assert "initContainers" not in pod

    # The real `batchgen submit` parser takes the command line as the pod runs it.
    parsed = submit_args(objects, tmp_path)
    assert parsed.command == "submit" and parsed.verbose == 2
    assert parsed.manifest == "s3://videos-in/prompts.parquet"
    assert (parsed.output, parsed.run_name, parsed.new_run, parsed.wait) == (
        "s3://videos-out/runs",
        "june-batch",
        True,
        True,
    )
    assert (parsed.max_jobs, parsed.shards_per_job, parsed.max_attempts) == (16, 2, 5)
    assert parsed.launch_namespace == NAMESPACE


def _flag_values(args: list[str]) -> dict[str, str | None]:
    flags: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags[args[i]] = args[i + 1]
            i += 2
        else:
            flags[args[i]] = None
            i += 1
    return flags


def test_launch_settings_follow_the_values(chart, tmp_path):
    values = merged(CASES["scheduling"], CASES["kueue"], CASES["secret-credentials"], CASES["model-from-s3"])
    settings = launch_settings(objects_of(render(chart, values)), tmp_path)
    assert settings.output == "s3://videos-out/runs"
    assert settings.namespace == NAMESPACE  # from --namespace $(POD_NAMESPACE), not the ConfigMap
    assert (settings.nodes, settings.gpus_per_node) == (2, 8)
    assert (settings.parallel.ulysses_degree, settings.parallel.ring_degree, settings.parallel.cfg_degree) == (8, 2, 0)
    assert settings.service_account == "gen-batchgen-worker"
    assert settings.queue_name == "gpu-h100"
    assert settings.s3_secret == "s3-credentials"
    assert settings.s3_session_token_key == "AWS_SESSION_TOKEN"
    assert settings.s3_endpoint == "https://minio.storage.svc:9000"
    assert settings.model_s3_uri == "s3://weights/mochi-1-preview" and settings.model_pvc is None

    job = render_pytorchjob("prompts-0123456789ab", [shard_id(3)], settings, attempt=2)
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-h100"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == values["workers"]["tolerations"]
    assert pod["priorityClassName"] == "batch-low"
    assert pod["affinity"] == values["workers"]["affinity"]
    assert pod["serviceAccountName"] == "gen-batchgen-worker"
    assert pod["initContainers"][0]["command"][-2:] == ["s3://weights/mochi-1-preview", "/models/mochi"]
    assert env_of(pod["containers"][0])["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
    }


def test_credentials_only_by_reference(chart, monkeypatch, tmp_path):
    fake_secret = "FAKE/secret+Key0123456789abcdefghijklmnop"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", fake_secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE0000")
    for case in ("secret-credentials", "workload-identity", "defaults"):
        rendered = render(chart, merged(CASES[case]))
        text = "\n".join(rendered.values())
        assert fake_secret not in text and "AKIAFAKEFAKEFAKE0000" not in text
        objects = objects_of(rendered)
        assert not by_kind(objects, "Secret")
        settings = launch_settings(objects, tmp_path)
        job_text = yaml.safe_dump(render_pytorchjob("prompts-0123456789ab", [shard_id(0)], settings))
        assert fake_secret not in job_text

    objects = objects_of(render(chart, merged(CASES["secret-credentials"])))
    env = env_of(controller_pod(objects)["containers"][0])
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "AWS_SESSION_TOKEN"
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000"


def test_workload_identity_reaches_controller_and_workers(chart, tmp_path):
    objects = objects_of(render(chart, merged(CASES["workload-identity"])))
    accounts = {o["metadata"]["name"]: o for o in by_kind(objects, "ServiceAccount")}
    for name in ("gen-batchgen", "gen-batchgen-worker"):
        assert accounts[name]["metadata"]["annotations"] == {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/batchgen"
        }
    # Workers get no API token; the controller needs one.
    assert accounts["gen-batchgen-worker"]["automountServiceAccountToken"] is False
    pod = controller_pod(objects)
    assert pod["serviceAccountName"] == "gen-batchgen" and pod["automountServiceAccountToken"] is True
    env = env_of(pod["containers"][0])
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    settings = launch_settings(objects, tmp_path)
    assert settings.s3_secret is None and settings.service_account == "gen-batchgen-worker"
    # The RoleBinding names the controller's account, not the workers'.
    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gen-batchgen", "namespace": NAMESPACE}]


def test_rbac_and_service_accounts_off(chart, tmp_path):
    objects = objects_of(render(chart, merged(CASES["rbac-off"], {"workers": {"serviceAccount": {"create": False}}})))
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "Job", "Service", "TrainingRuntime"]
    assert controller_pod(objects)["serviceAccountName"] == "batchgen-admin-managed"
    settings = launch_settings(objects, tmp_path)
    assert settings.service_account is None
    (runtime,) = by_kind(objects, "TrainingRuntime")
    assert runtime["spec"] == render_trainingruntime(settings)["spec"]
    job = render_pytorchjob("prompts-0123456789ab", [shard_id(0)], settings)
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_manifest_from_a_volume(chart):
    objects = objects_of(render(chart, merged(CASES["manifest-on-pvc"])))
    pod = controller_pod(objects)
    assert pod["containers"][0]["args"][:2] == ["submit", "/manifests/prompts.parquet"]
    assert "initContainers" not in pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["manifests"]["persistentVolumeClaim"] == {"claimName": "prompt-files", "readOnly": True}


def test_run_config_is_valid_toml_for_batchgen(chart, tmp_path):
    config = {
        "generation": {
            "num_frames": 85,
            "height": 480,
            "width": 848,
            "guidance_scale": 6,
            "negative_prompt": 'blurry "x"\\',
        },
        "worker": {"shard_size": 32, "max_attempts": 2},
    }
    objects = objects_of(render(chart, merged({"run": {"config": config}})))
    (config_map,) = by_kind(objects, "ConfigMap")
    path = tmp_path / "run.toml"
    path.write_text(config_map["data"]["run.toml"])
    loaded = load_config(path)
    assert loaded.generation.num_frames == 85 and loaded.generation.guidance_scale == 6.0
    assert loaded.generation.negative_prompt == 'blurry "x"\\'
    assert (loaded.worker.shard_size, loaded.worker.max_attempts) == (32, 2)
    # Nothing given: the file is still valid and means Mochi's defaults.
    (config_map,) = by_kind(objects_of(render(chart, merged())), "ConfigMap")
    path.write_text(config_map["data"]["run.toml"])
    assert load_config(path) == load_config(None)


def test_permanent_exit_codes_fail_the_controller_job_at_once(chart):
    from batchgen.core.errors import EXIT_CODES

    (job,) = by_kind(objects_of(render(chart, merged())), "Job")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    fail, ignore = job["spec"]["podFailurePolicy"]["rules"]
    assert fail["action"] == "FailJob" and fail["onExitCodes"]["operator"] == "In"
    # Exactly batchgen's permanent codes (1-127); retryable ones (>= 128) and evictions are retried.
    assert fail["onExitCodes"]["values"] == sorted(code for code in EXIT_CODES if 0 < code < 128)
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def test_pod_annotations_and_labels(chart):
    values = merged(
        {"controller": {"podAnnotations": {"prometheus.io/scrape": "false"}, "podLabels": {"team": "video"}}}
    )
    (job,) = by_kind(objects_of(render(chart, values)), "Job")
    meta = job["spec"]["template"]["metadata"]
    assert meta["annotations"] == {"prometheus.io/scrape": "false"}
    assert meta["labels"]["team"] == "video" and meta["labels"]["app.kubernetes.io/component"] == "controller"
    (job,) = by_kind(objects_of(render(chart, merged())), "Job")
    assert "annotations" not in job["spec"]["template"]["metadata"]


GUARD_CASES = {
    "no-job-api": ({"crdCheck": {"enabled": True}}, r"(?s)serves neither trainer\.kubeflow\.org/v1alpha1 TrainJob nor kubeflow\.org/v1 PyTorchJob.*Trainer v2.*training operator v1\.9"),
    "trainjob-api-missing": ({"crdCheck": {"enabled": True}, "launcher": "trainjob"}, r"launcher is trainjob but this cluster does not serve trainer\.kubeflow\.org/v1alpha1 TrainJob"),
    "pytorchjob-api-missing": ({"crdCheck": {"enabled": True}, "launcher": "pytorchjob"}, r"(?s)launcher is pytorchjob but this cluster does not serve kubeflow\.org/v1 PyTorchJob.*training operator v1\.9"),
    "no-output": ({"run": {"output": ""}}, r"run\.output is required"),
    "no-manifest": ({"run": {"manifest": ""}}, r"run\.manifest is required"),
    "no-weights-pvc": ({"model": {"pvc": {"claimName": ""}}}, r"model\.pvc\.claimName is required"),
    "no-weights-uri": ({"model": {"source": "s3"}}, r"model\.s3\.uri is required"),
    "manifest-path-without-volume": ({"run": {"manifest": "/data/prompts.parquet"}}, r"set run\.manifestVolume"),
    "degrees-do-not-fit": ({"workers": {"ulyssesDegree": 16}}, r"ulysses 16 x ring 0 x cfg 0 = 16 GPUs .* does not divide the 8 GPUs"),
    "cfg-and-ulysses-too-big": ({"workers": {"gpusPerNode": 4, "cfgDegree": 2, "ulyssesDegree": 4}}, r"= 8 GPUs .* does not divide the 4 GPUs"),
    "existing-sa-unnamed": ({"serviceAccount": {"create": False}}, r"serviceAccount\.name is required"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GUARD_CASES), ids=list(GUARD_CASES))
def test_guard_fails_clearly(chart, case):
    override, message = GUARD_CASES[case]
    with pytest.raises(helm.HelmError, match=message):
        render(chart, merged(override))


SCHEMA_CASES = {
    "nodes-zero": ({"workers": {"nodes": 0}}, "/workers/nodes"),
    "cfg-three": ({"workers": {"cfgDegree": 3}}, "/workers/cfgDegree"),
    "gcs-output": ({"run": {"output": "gs://bucket/out"}}, "/run/output"),
    "bucket-too-short": ({"run": {"output": "s3://b/out"}}, "/run/output"),
    "pull-policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "rbac-string": ({"rbac": {"create": "yes"}}, "/rbac/create"),
    "unknown-top-level": ({"replicas": 3}, "'replicas' not allowed"),
    "literal-secret": ({"s3": {"credentialsSecret": {"secretAccessKey": "abc"}}}, "'secretAccessKey' not allowed"),
    "frames-as-text": ({"run": {"config": {"generation": {"num_frames": "many"}}}}, "/run/config/generation/num_frames"),
    "unknown-config-key": ({"run": {"config": {"generation": {"frames": 85}}}}, "'frames' not allowed"),
    "parallel-in-config": ({"run": {"config": {"parallel": {"ulysses_degree": 8}}}}, "'parallel' not allowed"),
    "height-not-16": ({"run": {"config": {"generation": {"height": 500}}}}, "/run/config/generation/height"),
    "shm-not-quantity": ({"workers": {"shmSize": "lots"}}, "/workers/shmSize"),
    "toleration-effect": ({"workers": {"tolerations": [{"key": "a", "effect": "Sometimes"}]}}, "/workers/tolerations/0/effect"),
    "annotation-number": ({"serviceAccount": {"annotations": {"a": 1}}}, "/serviceAccount/annotations/a"),
    "verbosity": ({"controller": {"verbosity": 5}}, "/controller/verbosity"),
    "max-jobs-zero": ({"run": {"maxJobs": 0}}, "/run/maxJobs"),
    "run-name-slash": ({"run": {"name": "a/b"}}, "/run/name"),
    "root-user": ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
    "sp-backend": ({"workers": {"spBackend": "deepspeed"}}, "/workers/spBackend"),
    "model-source": ({"model": {"source": "hf"}}, "/model/source"),
    "cpu-not-quantity": ({"workers": {"cpu": "many"}}, "/workers/cpu"),
    "launcher": ({"launcher": "mpijob"}, "/launcher"),
    "trainer-release": ({"trainer": {"apiVersion": "v2.0"}}, "/trainer/apiVersion"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SCHEMA_CASES), ids=list(SCHEMA_CASES))
def test_values_schema_rejects(chart, case):
    override, where = SCHEMA_CASES[case]
    with pytest.raises(helm.HelmValuesError) as error:
        chart.validate_schema(merged(override))
    assert where in str(error.value)
    with pytest.raises(helm.HelmValuesError):  # an install would refuse them too
        render(chart, merged(override))


def test_values_schema_accepts_every_case(chart):
    chart.validate_schema(merged())
    for values in CASES.values():
        chart.validate_schema(merged(values))


def test_lint_is_clean(chart):
    for case in ("defaults", "everything", "workload-identity"):
        report = helm.lint(CHART, merged(CASES[case]), strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*path, key))]
    return [path]


def test_schema_describes_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path in _leaves(values):
        node = schema
        for key in path:
            if isinstance(node.get("additionalProperties"), dict):  # a map (resources, labels): values typed
                node = node["additionalProperties"]
                continue
            assert node.get("additionalProperties") is False, f"{'.'.join(path)}: object in the schema is not closed"
            assert key in node["properties"], f"values.yaml key {'.'.join(path)} is not in values.schema.json"
            node = node["properties"][key]
        assert node.get("type") or node.get("$ref") or node.get("allOf") or node.get("oneOf"), ".".join(path)
        assert node.get("description") or "$ref" in node, f"{'.'.join(path)}: no description in the schema"


def test_every_values_key_has_a_comment():
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    for number, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w.-]*:", line) and not lines[number - 1].lstrip().startswith("#"):
            missing.append(f"values.yaml:{number + 1}: {line.strip()}")
    assert missing == []


def test_notes_say_how_to_follow_resume_and_cancel(chart):
    notes = render(chart, merged())[f"{CHART.name}/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} logs -f job/gen-batchgen-controller" in notes
    assert "batchgen status s3://videos-out/runs --run-id <run-id>" in notes
    assert notes.index(f"helm uninstall {RELEASE} -n {NAMESPACE}") < notes.index(
        f"batchgen cancel <run-id> --namespace {NAMESPACE}"
    )
    # Each printed command is well-formed shell.
    for line in notes.splitlines():
        if line.startswith("  kubectl") or line.startswith("  batchgen"):
            shlex.split(line)


def test_values_example_in_the_docs_installs(chart, tmp_path):
    """The values file docs/kubernetes.md shows passes the schema and renders valid objects."""
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    block = re.search(r"`values-june\.yaml`:\n\n```yaml\n(.*?)```", docs, re.S)
    assert block, "values example not found in docs/kubernetes.md"
    values = yaml.safe_load(block[1])
    chart.validate_schema(values)
    objects = objects_of(render(chart, {**values, "crdCheck": {"enabled": False}}))
    assert all_problems(objects) == []
    settings = launch_settings(objects, tmp_path)
    job = render_pytorchjob("june-batch-0123456789ab", [shard_id(0), shard_id(1)], settings)
    assert pytorchjob_problems(job) == []
    assert settings.image == "registry.example.com/ml/batchgen:0.1.0"


@pytest.mark.parametrize("launcher", ["auto", "trainjob", "pytorchjob"])
def test_role_grants_exactly_the_launchers_verbs(chart, launcher, tmp_path):
    objects = objects_of(render(chart, merged({"launcher": launcher})))
    assert rbac_problems(objects, launcher=launcher) == []
    assert launch_settings(objects, tmp_path).launcher == launcher


def test_wan_chart_values_reach_config_and_launch_settings(chart, tmp_path):
    objects = objects_of(render(chart, merged({"model": {"family": "wan", "numHeads": 12}})))
    (config_map,) = by_kind(objects, "ConfigMap")
    path = tmp_path / "run.toml"
    path.write_text(config_map["data"]["run.toml"])
    loaded = load_config(path)
    assert loaded.model.family == "wan" and loaded.generation.num_frames == 81  # Wan's defaults, nothing else set
    settings = LaunchSettings.from_dict(yaml.safe_load(config_map["data"]["launch.yaml"]))
    assert (settings.family, settings.num_heads, settings.model_dir) == ("wan", 12, "/models/wan")
    # The shipped runtime mounts the weights where the launch settings say (batchgen renders the same spec).
    (runtime,) = by_kind(objects, "TrainingRuntime")
    assert runtime["spec"] == render_trainingruntime(settings)["spec"]


def test_speed_option_values_reach_the_workers_command(chart, tmp_path):
    speed = {"workers": {"compile": True, "fp8": True, "cacheThreshold": 0.1, "attention": "per-prompt"}}
    settings = launch_settings(objects_of(render(chart, merged(speed))), tmp_path)
    assert (settings.parallel.compile, settings.parallel.fp8, settings.parallel.cache_threshold) == (True, True, 0.1)
    command = render_trainjob("june-batch-0123456789ab", [shard_id(0)], settings)["spec"]["trainer"]["command"]
    assert command[-6:] == ["--cache-threshold", "0.1", "--attention", "per-prompt", "--compile", "--fp8"]
    defaults = launch_settings(objects_of(render(chart, merged({}))), tmp_path)
    assert (
        defaults.parallel.compile,
        defaults.parallel.fp8,
        defaults.parallel.cache_threshold,
        defaults.parallel.attention,
    ) == (False, False, 0.0, "auto")
