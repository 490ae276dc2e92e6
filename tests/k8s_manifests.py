"""Checks shared by the chart, kustomize and jobs/ tests: every object validated the way a cluster would
(core kinds against the strict JSON schemas in ../shared/schemas/k8s, PyTorchJobs against the CRD via
tests/k8s_schema.py), plus the project's own rules: exact RBAC, hardened pods, names within 63 characters.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from batchgen.launch.k8s.settings import LaunchSettings
from tests.k8s_schema import (
    SCHEMAS,
    TRAINER_PLURALS,
    TRAINER_VERSIONS,
    VENDORED_SCHEMAS,
    metadata_problems,
    pytorchjob_problems,
    trainer_problems,
)

CORE_SCHEMAS = SCHEMAS / "k8s"

# What `batchgen submit`, `status` and `cancel` call, per (apiGroup, resource): the Role must grant exactly this.
# tests/test_k8s_e2e.py records the requests the controller makes against the emulator and checks them against it.
CONTROLLER_VERBS: dict[tuple[str, str], frozenset[str]] = {
    ("kubeflow.org", "pytorchjobs"): frozenset({"create", "get", "list", "watch", "patch", "delete"}),
}
# The TrainJob launcher's path (backend.TrainJobBackend): the jobs (patch: end), and a get of the runtime they
# reference.
TRAINJOB_VERBS: dict[tuple[str, str], frozenset[str]] = {
    ("trainer.kubeflow.org", "trainjobs"): frozenset({"create", "get", "list", "watch", "patch", "delete"}),
    ("trainer.kubeflow.org", "trainingruntimes"): frozenset({"get"}),
}
LAUNCHER_VERBS = {
    "pytorchjob": CONTROLLER_VERBS,
    "trainjob": TRAINJOB_VERBS,
    "auto": {**TRAINJOB_VERBS, **CONTROLLER_VERBS},
}


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def schema_file(obj: dict[str, Any]) -> Path:
    """kubeconform's naming: ``<kind>-<group's first label>-<version>.json`` (``<kind>-<version>`` for core)."""
    group, _, version = obj["apiVersion"].rpartition("/")
    kind = obj["kind"].lower()
    name = f"{kind}-{group.split('.')[0]}-{version}.json" if group else f"{kind}-{version}.json"
    vendored = VENDORED_SCHEMAS / "k8s" / name
    return vendored if vendored.exists() else CORE_SCHEMAS / name


@functools.cache
def _validator(path: Path) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(path.read_text()))


def object_problems(obj: dict[str, Any]) -> list[str]:
    """Why a cluster would refuse ``obj`` (empty when it would accept it)."""
    where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    if obj.get("kind") == "PyTorchJob":
        return [f"{where}: {p}" for p in pytorchjob_problems(obj)]
    if obj.get("kind") in TRAINER_PLURALS:  # shipped objects must suit every supported Trainer release
        return [f"{where} (Trainer {v}): {p}" for v in TRAINER_VERSIONS for p in trainer_problems(obj, v)]
    if obj.get("apiVersion", "").startswith("monitoring.coreos.com/"):
        from tests.k8s_monitoring import monitoring_problems

        return monitoring_problems(obj)
    path = schema_file(obj)
    if not path.exists():
        return [f"{where}: no schema {path.name} in {CORE_SCHEMAS} (unexpected kind)"]
    problems = [
        f"{where}: {'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in _validator(path).iter_errors(obj)
    ]
    problems += [f"{where}: {p}" for p in metadata_problems(obj.get("metadata") or {})]
    return problems


def all_problems(objects: Iterable[dict[str, Any]]) -> list[str]:
    return [p for obj in objects for p in object_problems(obj)]


def rbac_problems(objects: list[dict[str, Any]], *, expect_role: bool = True, launcher: str = "auto") -> list[str]:
    """No cluster-wide grants, no wildcards, and (when a Role is expected) exactly the launcher's verbs."""
    problems = []
    kinds = [o["kind"] for o in objects]
    for kind in ("ClusterRole", "ClusterRoleBinding"):
        if kind in kinds:
            problems.append(f"{kind} present: the controller needs namespaced permissions only")
    roles = [o for o in objects if o["kind"] == "Role"]
    granted: dict[tuple[str, str], set[str]] = {}
    for role in roles:
        for rule in role.get("rules") or []:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                if "*" in (rule.get(field) or []):
                    problems.append(f"Role {role['metadata']['name']}: wildcard in {field}")
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    granted.setdefault((group, resource), set()).update(rule.get("verbs") or [])
    if expect_role:
        if len(roles) != 1:
            problems.append(f"expected exactly one Role, found {len(roles)}")
        expected = LAUNCHER_VERBS[launcher]
        if granted != {k: set(v) for k, v in expected.items()}:
            problems.append(f"Role grants {granted}, expected exactly {dict(expected)}")
        bindings = [o for o in objects if o["kind"] == "RoleBinding"]
        if len(bindings) != 1 or bindings[0]["roleRef"] != {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[0]["metadata"]["name"] if roles else None,
        }:  # fmt: skip
            problems.append("expected one RoleBinding referring to the Role")
    elif roles or any(o["kind"] == "RoleBinding" for o in objects):
        problems.append("RBAC objects rendered although RBAC is switched off")
    return problems


def pod_security_problems(pod_spec: dict[str, Any], where: str) -> list[str]:
    """Non-root, no privilege escalation, all capabilities dropped, read-only root with writable /tmp."""
    problems = []
    pod_sc = pod_spec.get("securityContext") or {}
    if pod_sc.get("runAsNonRoot") is not True or not pod_sc.get("runAsUser"):
        problems.append(f"{where}: pod securityContext must set runAsNonRoot and a non-zero runAsUser")
    empty_dirs = {v["name"] for v in pod_spec.get("volumes") or [] if "emptyDir" in v}
    for container in (pod_spec.get("initContainers") or []) + pod_spec["containers"]:
        sc = container.get("securityContext") or {}
        name = f"{where} container {container['name']}"
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or (sc.get("capabilities") or {}).get("add"):
            problems.append(f"{name}: capabilities must drop ALL and add none")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem must be true")
        tmp = [m for m in container.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
        if not tmp or tmp[0]["name"] not in empty_dirs:
            problems.append(f"{name}: /tmp must be a writable emptyDir (the root filesystem is read-only)")
    return problems


def secret_env_problems(objects: Iterable[dict[str, Any]]) -> list[str]:
    """Credential-like environment variables must come from secretKeyRef, never a literal value."""
    problems = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "env" and isinstance(value, list):
                    for var in value:
                        name = var.get("name", "")
                        if any(w in name for w in ("SECRET", "ACCESS_KEY", "TOKEN", "PASSWORD")):
                            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                            if "value" in var or not ref:
                                problems.append(f"{where}: env {name} must come from a secretKeyRef")
                walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for obj in objects:
        walk(obj, f"{obj['kind']}/{obj['metadata']['name']}")
    return problems


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def controller_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = by_kind(objects, "Job")
    return job["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in container.get("env") or []}


def submit_args(objects: list[dict[str, Any]], tmp_path: Path, namespace: str) -> argparse.Namespace:
    """The controller's command line parsed by the real ``batchgen submit`` parser, as the pod would run it in
    ``namespace``: ``$(POD_NAMESPACE)`` expanded by the kubelet, the ConfigMap's files at their mount path."""
    from batchgen.cli import build_parser

    (container,) = controller_pod(objects)["containers"]
    assert env_of(container)["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    (config_map,) = by_kind(objects, "ConfigMap")
    folder = tmp_path / "etc-batchgen"
    folder.mkdir(exist_ok=True)
    for name, text in config_map["data"].items():
        (folder / name).write_text(text)
    args = [arg.replace("$(POD_NAMESPACE)", namespace).replace(mount, str(folder)) for arg in container["args"]]
    return build_parser().parse_args(args)


def controller_launch_settings(objects: list[dict[str, Any]], tmp_path: Path, namespace: str) -> LaunchSettings:
    """The launch settings `batchgen submit` in the controller pod would create PyTorchJobs with."""
    from batchgen.launch.k8s.options import settings_from_args

    args = submit_args(objects, tmp_path, namespace)
    return settings_from_args(args, output=args.output)
