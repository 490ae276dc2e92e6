"""PyTorchJob rendering: every shape validates against the real CRD (strict) and the operator's webhook rules."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import helm_python as helm
import pytest
import tomllib
import yaml

from batchgen.cli import build_parser, main
from batchgen.cli._options import config_from_args
from batchgen.core.config import RunConfig, load_config
from batchgen.core.errors import ConfigError, TopologyError
from batchgen.core.item import ShapeGroup
from batchgen.core.layout import shard_id
from batchgen.core.topology import Topology, check_shapes
from batchgen.launch.k8s import names
from batchgen.launch.k8s.options import settings_from_args
from batchgen.launch.k8s.pytorchjob import render_pytorchjob
from batchgen.launch.k8s.settings import LaunchSettings, parse_shard_indices
from batchgen.worker.contract import shard_selection
from tests.k8s_manifests import load_all, submit_args
from tests.k8s_schema import pytorchjob_problems, strict_schema
from tests.test_kustomize import kustomize
from tools import k8s_examples as examples

ROOT = Path(__file__).resolve().parents[1]

RUN = "prompts-0123456789ab"
SECRET_VALUE = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
BASE = LaunchSettings(
    output="s3://videos/out",
    namespace="gen",
    image="registry.example.com/batchgen:1.0",
    s3_endpoint="https://s3.example.com",
    s3_region="eu-west-1",
    s3_secret="s3-credentials",
    model_pvc="mochi-weights",
)

# (id, settings changes, expected (nodes, nproc, ulysses, ring, cfg))
SHAPES = [
    ("1x8-ulysses8", dict(nodes=1, gpus_per_node=8, ulysses_degree=8, cfg_degree=1), (1, 8, 8, 1, 1)),
    ("2x8-cfg2-ulysses8", dict(nodes=2, gpus_per_node=8, ulysses_degree=8, ring_degree=1, cfg_degree=2), (2, 8, 8, 1, 2)),
    ("1x8-cfg2-ulysses4", dict(nodes=1, gpus_per_node=8, ulysses_degree=4, cfg_degree=2), (1, 8, 4, 1, 2)),
    ("1x1", dict(nodes=1, gpus_per_node=1), (1, 1, 1, 1, 1)),
    ("1x8-auto", dict(nodes=1, gpus_per_node=8), (1, 8, 4, 1, 2)),
    (
        "2x8-s3-model-kueue",
        dict(
            nodes=2, gpus_per_node=8, ulysses_degree=8, ring_degree=2, cfg_degree=1, model_pvc=None,
            model_s3_uri="s3://weights/mochi-1-preview", queue_name="gpu-queue", priority_class="batch-low",
            node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
            affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}},
            cpu="64", memory="800Gi", active_deadline_seconds=86400, image_pull_secrets=("regcred",),
            service_account="batchgen-worker", s3_secret=None,
        ),
        (2, 8, 8, 2, 1),
    ),
]  # fmt: skip


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _containers(job):
    for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items():
        pod = spec["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield rtype, pod, c


@pytest.mark.parametrize("case_id, changes, expected", SHAPES, ids=[s[0] for s in SHAPES])
def test_shapes_validate_against_crd_and_webhook(case_id, changes, expected):
    settings = BASE.replace(**changes)
    shards = [shard_id(i) for i in range(4, 8)]
    job = render_pytorchjob(RUN, shards, settings, attempt=2)

    assert pytorchjob_problems(job) == []
    nodes, nproc, ulysses, ring, cfg = expected
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert specs.get("Worker", {}).get("replicas", 0) == nodes - 1
    assert job["spec"]["nprocPerNode"] == str(nproc)
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    assert {s["restartPolicy"] for s in specs.values()} == {"ExitCode"}

    container = specs["Master"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:3] == ["python", "-m", "batchgen.launch.k8s.torchrun"]
    assert command[command.index("-m", 3) : command.index("-m", 3) + 3] == ["-m", "batchgen", "worker"]
    assert _flag(command, "--shards") == "4:8"
    assert _flag(command, "--run-id") == RUN
    assert _flag(command, "--output") == "s3://videos/out"
    assert (
        int(_flag(command, "--ulysses-degree")),
        int(_flag(command, "--ring-degree")),
        int(_flag(command, "--cfg-degree")),
    ) == (ulysses, ring, cfg)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(nproc)

    pod = specs["Master"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True
    for _rtype, _pod, c in _containers(job):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounted = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/scratch"} <= mounted  # writable scratch, the root filesystem being read-only
        env = {e["name"]: e for e in c["env"]}
        assert env["HOME"]["value"] == "/scratch"
    labels = job["metadata"]["labels"]
    assert labels[names.RUN_LABEL] == RUN and labels[names.ATTEMPT_LABEL] == "2"
    assert (labels[names.SHARD_FIRST_LABEL], labels[names.SHARD_LAST_LABEL]) == ("4", "7")
    assert specs["Master"]["template"]["metadata"]["labels"][names.RUN_LABEL] == RUN


def test_model_from_s3_is_fetched_once_per_pod_by_an_init_container():
    settings = BASE.replace(model_pvc=None, model_s3_uri="s3://weights/mochi")
    pod = render_pytorchjob(RUN, [shard_id(0)], settings)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][-2:] == ["s3://weights/mochi", settings.model_dir]
    model_volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert "medium" not in model_volume["emptyDir"]  # node-local disk, not RAM
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": settings.model_dir, "readOnly": True}


def test_pvc_model_is_mounted_read_only():
    pod = render_pytorchjob(RUN, [shard_id(0)], BASE.replace(model_pvc_subpath="mochi"))["spec"]["pytorchReplicaSpecs"][
        "Master"
    ]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "mochi-weights", "readOnly": True}} in pod[
        "volumes"
    ]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] is True and mount["subPath"] == "mochi"
    assert "initContainers" not in pod


def test_credentials_only_as_secret_references(monkeypatch):
    # Credentials in the controller's own environment must not leak into what it renders.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    for settings in (BASE, BASE.replace(model_pvc=None, model_s3_uri="s3://weights/mochi")):
        job = render_pytorchjob(RUN, [shard_id(0)], settings)
        rendered = yaml.safe_dump(job)
        assert SECRET_VALUE not in rendered and "AKIAEXAMPLEKEYID0000" not in rendered
        for _rtype, _pod, container in _containers(job):
            env = {e["name"]: e for e in container["env"]}
            assert env["AWS_ACCESS_KEY_ID"] == {
                "name": "AWS_ACCESS_KEY_ID",
                "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}},
            }
            assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
            assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.example.com"


def test_workload_identity_uses_the_service_account_and_no_secret():
    job = render_pytorchjob(RUN, [shard_id(0)], BASE.replace(s3_secret=None, service_account="batchgen-irsa"))
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["serviceAccountName"] == "batchgen-irsa"
    assert not [e for e in pod["containers"][0]["env"] if "valueFrom" in e]


def test_strict_schema_refuses_unknown_fields():
    # The validator itself must be able to fail: a typo in a field name is what strict validation catches.
    job = render_pytorchjob(RUN, [shard_id(0)], BASE)
    job["spec"]["runPolicy"]["cleanPodPolicyy"] = "Running"
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    problems = pytorchjob_problems(job)
    assert len(problems) == 2 and all("cleanPodPolicyy" in p or "imagePullPolicyy" in p for p in problems)
    assert strict_schema()["properties"]["spec"]["additionalProperties"] is False


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].update(
                name="main"
            ),
            "no container named 'pytorch'",
        ),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2), "Master].replicas: must be 1"),
        (
            lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Master"]),
            "must be Master or Worker",
        ),
        (
            lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].pop("image"),
            "has no image",
        ),
    ],
    ids=["container-name", "master-replicas", "replica-type", "image"],
)
def test_webhook_rules_catch_violations(mutate, expected):
    job = render_pytorchjob(RUN, [shard_id(0)], BASE)
    mutate(job)
    assert any(expected in p for p in pytorchjob_problems(job))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(nodes=1, gpus_per_node=8, ulysses_degree=12), "= 12 does not divide the world size 8"),
        (dict(nodes=1, gpus_per_node=8, ulysses_degree=5), "does not divide the model's 24 attention heads"),
        (
            dict(nodes=1, gpus_per_node=8, ulysses_degree=4, ring_degree=2, cfg_degree=2),
            "= 16 does not divide the world size 8",
        ),
        (dict(nodes=2, gpus_per_node=4, ulysses_degree=3, ring_degree=2), "= 6 does not divide the world size 8"),
    ],
)
def test_degrees_that_do_not_fit_are_refused(changes, message):
    with pytest.raises(TopologyError, match=message) as refused:
        render_pytorchjob(RUN, [shard_id(0)], BASE.replace(**changes))
    assert "(cfg x ulysses x ring) that fit world size 8: 1x8x1, 2x4x1, 1x4x2," in str(refused.value)


def test_degrees_that_cannot_split_an_items_tokens_are_refused_before_the_cluster_is_touched(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Mochi's defaults (163 frames at 480x848, N = 178080) split 8 and 16 ways; 49-frame rows (N = 14310) do not:
    # the xfuser backend refuses them, the native one pads.
    rows = 5
    frames = [49 if i % 2 else None for i in range(rows)]
    manifest = tmp_path / "mixed.parquet"
    pq.write_table(
        pa.table({"id": [f"clip-{i}" for i in range(rows)], "prompt": ["a fox"] * rows, "num_frames": frames}), manifest
    )
    common = [
        sys.executable,
        "-m",
        "batchgen",
        "render",
        "--manifest",
        str(manifest),
        "--output",
        str(tmp_path / "out"),
        "--shards",
        "all",
        "--image",
        "img:1",
        "--model-pvc",
        "w",
        "--launcher",
        "pytorchjob",
    ]
    bad = subprocess.run(
        [*common, "--gpus-per-node", "8", "--ulysses-degree", "8", "--sp-backend", "xfuser"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 6, bad.stderr
    assert (
        "49 frames at 480x848: N=14310; the xfuser backend cannot pad, so ulysses x ring must divide 14310 but is "
        "8x1=8 (items clip-1, clip-3)" in bad.stderr
    )
    assert "163 frames" not in bad.stderr
    assert "(cfg x ulysses x ring) that fit world size 8 and every item: 2x2x1, 2x1x2, 1x2x1," in bad.stderr
    assert bad.stdout == ""
    padded = subprocess.run(
        [*common, "--gpus-per-node", "8", "--ulysses-degree", "8"], capture_output=True, text=True, timeout=60
    )
    assert padded.returncode == 0, padded.stderr  # the native backend pads 14310 tokens to 14312
    good = subprocess.run(
        [*common, "--gpus-per-node", "8", "--ulysses-degree", "2", "--cfg-degree", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert good.returncode == 0, good.stderr
    (job,) = list(yaml.safe_load_all(good.stdout))
    assert pytorchjob_problems(job) == []
    only_long = subprocess.run(
        [*common, "--gpus-per-node", "8", "--ulysses-degree", "8", "--sp-backend", "xfuser", "--num-frames", "163"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert only_long.returncode == 6 and "(items clip-1, clip-3)" in only_long.stderr  # per-row overrides win
    too_big = subprocess.run(
        [*common, "--gpus-per-node", "8", "--ulysses-degree", "12"], capture_output=True, text=True
    )
    assert too_big.returncode == 6
    assert "= 12 does not divide the world size 8" in too_big.stderr
    assert "that fit world size 8: 1x8x1, 2x4x1, 1x4x2, 2x2x2, 1x2x4, 2x1x4, 1x1x8, 1x4x1, 2x2x1," in too_big.stderr
    too_big_xfuser = subprocess.run(
        [*common, "--gpus-per-node", "8", "--ulysses-degree", "12", "--sp-backend", "xfuser"],
        capture_output=True,
        text=True,
    )
    assert too_big_xfuser.returncode == 6
    assert "that fit world size 8 and every item: 2x2x1, 2x1x2, 1x2x1, 2x1x1, 1x1x2, 1x1x1" in too_big_xfuser.stderr
    # Automatic degrees come from the plan's shape tally: the 49-frame rows get a layout that splits them.
    auto = subprocess.run([*common, "--gpus-per-node", "8"], capture_output=True, text=True, timeout=60)
    assert auto.returncode == 0, auto.stderr
    command = next(iter(yaml.safe_load_all(auto.stdout)))["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    command = command["spec"]["containers"][0]["command"]
    degrees = [int(command[command.index(f"--{axis}-degree") + 1]) for axis in ("cfg", "ulysses", "ring")]
    assert degrees == [2, 4, 1]  # cfg 2 x ulysses 4: the native backend pads 14310 tokens to 14312
    auto_xfuser = subprocess.run(
        [*common, "--gpus-per-node", "8", "--sp-backend", "xfuser"], capture_output=True, text=True, timeout=60
    )
    assert auto_xfuser.returncode == 0, auto_xfuser.stderr
    command = next(iter(yaml.safe_load_all(auto_xfuser.stdout)))["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    command = command["spec"]["containers"][0]["command"]
    degrees = [int(command[command.index(f"--{axis}-degree") + 1]) for axis in ("cfg", "ulysses", "ring")]
    assert degrees == [2, 2, 1]  # xfuser cannot pad: 14310 and 44520 both split in two, not in four


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(nodes=0), "nodes must be >= 1"),
        (dict(cfg_degree=3), "cfg_degree must be 0, 1 or 2"),
        (dict(image_pull_policy="Sometimes"), "image_pull_policy"),
        (dict(shm_size="lots"), "shm_size 'lots' is not a Kubernetes quantity"),
        (dict(model_s3_uri="s3://w/m"), "exclusive"),
        (dict(namespace="Not_A_Namespace"), "DNS-1123"),
    ],
)
def test_bad_settings_are_refused_by_name(changes, message):
    with pytest.raises(ConfigError, match=message):
        BASE.replace(**changes)


def test_names_are_valid_deterministic_and_distinct():
    long_run = "a-very-long-manifest-name-that-goes-on-and-on-and-on-and-on-0123456789ab"
    other_long = long_run.replace("on-and-on-0", "on-and-no-0")
    cases = [
        (RUN, 0, 0, 1),
        (RUN, 0, 0, 2),
        (RUN, 3, 5, 1),
        (long_run, 0, 2, 1),
        (other_long, 0, 2, 1),
        ("9lives_Run-00ff", 1, 1, 1),
    ]
    got = [names.job_name(*c) for c in cases]
    assert got == [names.job_name(*c) for c in cases]  # pure function
    assert len(set(got)) == len(got)
    for name in got:
        assert names.is_dns_label(name, names.MAX_JOB_NAME), name
        assert names.is_dns_label(name + "-worker-1234567"), "pod Service names must stay DNS-1035 labels"
    assert got[0] == "prompts-0123456789ab-0-0-a1"
    assert names.job_name(RUN, shard_id(3), shard_id(5), 1) == got[2]
    assert names.label_value(long_run) != names.label_value(other_long)
    assert names.is_label_value(names.label_value(long_run)) and names.is_label_value(
        names.label_value("x" * 200 + "!")
    )


def test_render_is_deterministic_and_relaunch_keeps_the_group_name():
    shards = [shard_id(i) for i in (0, 1, 2)]
    assert render_pytorchjob(RUN, shards, BASE) == render_pytorchjob(RUN, list(reversed(shards)), BASE)
    relaunch = render_pytorchjob(RUN, [shard_id(0), shard_id(2)], BASE, 2, group=(shard_id(0), shard_id(2)))
    assert relaunch["metadata"]["name"] == "prompts-0123456789ab-0-2-a2"
    command = relaunch["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert _flag(command, "--shards") == "0,2"


@pytest.mark.parametrize("text, indices", [("0:3", [0, 1, 2]), ("4", [4]), ("1,3,7", [1, 3, 7]), ("2:3", [2])])
def test_shard_selection_round_trip(text, indices):
    shards = parse_shard_indices(text)
    assert shards == [shard_id(i) for i in indices]
    assert parse_shard_indices(shard_selection(shards)) == shards


def test_values_file_keys_are_checked():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['gpus'\]"):
        LaunchSettings.from_dict({"gpus": 8})
    with pytest.raises(ConfigError, match="nodes must be an integer"):
        LaunchSettings.from_dict({"nodes": "2"})
    assert LaunchSettings.from_dict(BASE.to_dict()) == BASE


def test_render_command_prints_valid_yaml(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {"nodes": 2, "gpus_per_node": 8, "ulysses_degree": 8, "ring_degree": 2, "cfg_degree": 1, "model_pvc": "w"}
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "batchgen", "render", "--run-id", RUN, "--shards", "0:2", "--output", "s3://b/o", "--values", str(values), "--image", "img:1", "--launcher", "pytorchjob"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (job,) = list(yaml.safe_load_all(out.stdout))
    assert pytorchjob_problems(job) == []
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"] == "img:1"
    bad = subprocess.run(
        [sys.executable, "-m", "batchgen", "render", "--run-id", RUN, "--shards", "0:2", "--output", "s3://b/o", "--gpus-per-node", "8", "--ulysses-degree", "7"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 6 and "24 attention heads" in bad.stderr


@pytest.mark.parametrize(
    "child, expected",
    [
        ("raise SystemExit(0)", 0),
        ("raise SystemExit(3)", 3),  # permanent: the operator's ExitCode policy fails the job
        ("raise SystemExit(200)", 200),  # retryable (transient storage outage)
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 143),  # preempted: retryable, not torchrun's 1
    ],
)
def test_launcher_exits_with_the_workers_code(child, expected, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The variables the training operator injects; torchrun reads them instead of flags.
    env = {
        "PATH": os.environ["PATH"], "PET_NNODES": "1", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),  # this checkout's batchgen, not only the installed one
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "batchgen.launch.k8s.torchrun", "--max-restarts=0", "--no-python", sys.executable, "-c", child],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == expected, done.stderr[-2000:]


# -- every layout the project documents or ships passes the workers' shape check --------------------------------


def _shape_tally(config) -> tuple:
    g = config.generation
    return (ShapeGroup(g.num_frames, g.height, g.width, items=1, examples=("default",)),)


def _worker_topology(job: dict):
    """The degrees the pods get, read back from the rendered job (not from how render chose them)."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    world = sum(s["replicas"] for s in specs.values()) * int(job["spec"]["nprocPerNode"])
    command = specs["Master"]["template"]["spec"]["containers"][0]["command"]
    cfg, ulysses, ring = (int(command[command.index(f"--{axis}-degree") + 1]) for axis in ("cfg", "ulysses", "ring"))
    return Topology(world, world // (cfg * ulysses * ring), cfg, ulysses, ring)


def _check_layout(settings: LaunchSettings, config) -> None:
    plan = SimpleNamespace(run_id=RUN, config=config, shapes=_shape_tally(config))
    job = render_pytorchjob(plan, [shard_id(0)], settings.replace(output=settings.output or "s3://b/o"))
    # What `batchgen worker` runs on every rank before loading weights (check_items -> check_shapes).
    check_shapes(_worker_topology(job), plan.shapes, num_heads=settings.num_heads)


def _shipped_controllers() -> dict[str, list[dict]]:
    """The objects of every shipped controller: chart defaults, the docs' values file, the kustomize base and
    overlay. Each carries its launch settings and the run config it ships beside the layout."""
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    june = yaml.safe_load(docs.split("`values-june.yaml`:\n\n```yaml\n", 1)[1].split("```", 1)[0])
    no_cluster = {"crdCheck": {"enabled": False}}
    required = {
        **no_cluster,
        "run": {"manifest": "s3://videos-in/prompts.parquet", "output": "s3://videos-out/runs"},
        "model": {"pvc": {"claimName": "w"}},
    }
    objects = {}
    with helm.Chart.load(ROOT / "charts" / "batchgen") as chart:
        for name, values in (("chart-defaults", required), ("docs-values-june", {**june, **no_cluster})):
            rendered = chart.render(values, name="gen", namespace="videos", is_install=True)
            objects[name] = [o for p, t in sorted(rendered.items()) if not p.endswith("NOTES.txt") for o in load_all(t)]
    objects["kustomize-base"] = kustomize(ROOT / "k8s" / "base")
    objects["kustomize-overlay"] = kustomize(ROOT / "k8s" / "overlays" / "example")
    return objects


def test_every_shipped_controller_layout_passes_the_workers_shape_check(tmp_path):
    for name, objects in _shipped_controllers().items():
        (tmp_path / name).mkdir()
        args = submit_args(objects, tmp_path / name, "videos")
        _check_layout(settings_from_args(args, output=args.output), config_from_args(args))


@pytest.mark.parametrize("example", examples.EXAMPLES, ids=lambda e: e.filename)
def test_every_jobs_example_passes_the_workers_shape_check(example):
    _check_layout(example.settings, RunConfig())  # jobs/ render a plan's shards: Mochi's defaults unless changed


def test_readme_layouts_pass_the_workers_shape_check(tmp_path):
    readme = (ROOT / "README.md").read_text()
    toml_text = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "run.toml").write_text(toml_text)
    readme_config = load_config(tmp_path / "run.toml")
    assert readme_config.generation.num_frames == tomllib.loads(toml_text)["generation"]["num_frames"] == 49
    submits = [b.split("```", 1)[0] for b in readme.split("```bash\n")[1:] if b.startswith("batchgen submit")]
    assert submits
    for block in submits:
        args = build_parser().parse_args(shlex.split(block.replace("\\\n", " "))[1:])
        settings = settings_from_args(args, output=args.output)
        for config in (RunConfig(), readme_config):  # Mochi's defaults, and the README's own 49-frame config
            _check_layout(settings, config)


def _worker_flags(command: list[str]) -> argparse.Namespace:
    """The worker's own parser reading what the job's container runs (after torchrun's ``-m batchgen``)."""
    return build_parser().parse_args(command[command.index("worker") :])


@pytest.mark.parametrize("launcher", ["pytorchjob", "trainjob"])
def test_speed_options_reach_the_workers_from_the_plan_or_the_launch_settings(launcher, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["a fox"]}), manifest)
    config = tmp_path / "run.toml"
    config.write_text('[parallel]\ncache_threshold = 0.05\nattention = "per-prompt"\n')
    render = ["render", "--manifest", str(manifest), "--output", str(tmp_path / "out"), "--shards", "all"]
    render += ["--config", str(config), "--gpus-per-node", "1", "--model-pvc", "w", "--launcher", launcher]

    def worker_of(*flags: str) -> argparse.Namespace:
        assert main([*render, *flags]) == 0
        # A TrainJob comes with the TrainingRuntime it references.
        (job,) = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o["kind"] != "TrainingRuntime"]
        if launcher == "trainjob":
            return _worker_flags(job["spec"]["trainer"]["command"])
        return _worker_flags(
            job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
        )

    from_plan = worker_of()
    assert (from_plan.cache_threshold, from_plan.compile, from_plan.fp8) == (0.05, None, None)
    assert from_plan.attention == "per-prompt"
    given = worker_of("--compile", "--fp8", "--cache-threshold", "0.1", "--attention", "joint")
    assert (given.cache_threshold, given.compile, given.fp8, given.attention) == (0.1, True, True, "joint")
    values = tmp_path / "launch.yaml"
    values.write_text("compile: true\ncache_threshold: 0.2\nattention: auto\n")
    from_values = worker_of("--values", str(values))
    assert (from_values.cache_threshold, from_values.compile, from_values.fp8) == (0.2, True, None)
    assert from_values.attention == "per-prompt"  # auto, the default, leaves the plan's (as 0 degrees do)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"compile": "yes"}, "compile must be true or false, got 'yes'"),
        ({"fp8": 1}, "fp8 must be true or false, got 1"),
        ({"cache_threshold": "0.1"}, "cache_threshold must be a number, got '0.1'"),
        ({"cache_threshold": True}, "cache_threshold must be a number, got True"),
        ({"cache_threshold": 1.5}, "cache_threshold must be between 0 and 1, got 1.5"),
        ({"attention": "fast"}, "attention must be 'auto', 'joint' or 'per-prompt', got 'fast'"),
    ],
)
def test_bad_speed_options_in_a_values_file_are_refused_by_key(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        LaunchSettings.from_dict(values, source="launch.yaml")


@pytest.mark.parametrize("launcher", ["pytorchjob", "trainjob"])
def test_offload_reaches_the_workers_from_the_plan_or_the_launch_settings(launcher, tmp_path, capsys):
    """Issue 19 item 3: a plan's ``[parallel] offload = "model"`` reaches the workers' command; a launch setting
    overrides it; with neither, the workers get ParallelConfig's default, auto."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["a fox"]}), manifest)
    config = tmp_path / "run.toml"
    config.write_text('[parallel]\noffload = "model"\n')

    def offload_of(output: str, *flags: str) -> str:
        render = ["render", "--manifest", str(manifest), "--output", str(tmp_path / output), "--shards", "all"]
        assert main([*render, "--gpus-per-node", "1", "--model-pvc", "w", "--launcher", launcher, *flags]) == 0
        (job,) = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o["kind"] != "TrainingRuntime"]
        if launcher == "trainjob":
            return _worker_flags(job["spec"]["trainer"]["command"]).offload
        master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        return _worker_flags(master["command"]).offload

    assert offload_of("planned", "--config", str(config)) == "model"
    assert offload_of("planned", "--config", str(config), "--offload", "none") == "none"
    values = tmp_path / "launch.yaml"
    values.write_text("offload: auto\n")  # the shipped chart's and kustomize base's value, the default: the plan's
    assert offload_of("planned", "--config", str(config), "--values", str(values)) == "model"
    assert offload_of("default") is None  # ParallelConfig's default, auto: left off the command line
    assert LaunchSettings().parallel.offload == RunConfig().parallel.offload == "auto"
