"""Validation of PyTorchJobs the way a cluster would: the real CRD schema with strict field validation, plus the
training operator's admission webhook rules. Shared by test_render.py and the API emulator (which answers 422).
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parents[1].parent / "shared" / "schemas"
CRD_PATH = SCHEMAS / "kubeflow.org_pytorchjobs.yaml"
VENDORED_SCHEMAS = Path(__file__).resolve().parent / "schemas"
"""Upstream schemas that ../shared/schemas lacks (prometheus-operator CRDs, core Service); see schemas/SOURCE.md."""

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _strict(node: Any) -> Any:
    """What ``kubectl --validate=strict`` / the API server's strict field validation does: an object that
    declares its properties refuses any other, unless it preserves unknown fields."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@functools.cache
def strict_schema() -> dict[str, Any]:
    version = next(v for v in crd()["spec"]["versions"] if v["name"] == "v1")
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict_schema())


def metadata_problems(metadata: dict[str, Any]) -> list[str]:
    problems = []
    name = metadata.get("name", "")
    if not name or len(name) > 63 or not _DNS_SUBDOMAIN.match(name):
        problems.append(f"metadata.name {name!r} is not a DNS-1123 name of at most 63 characters")
    for where in ("labels", "annotations"):
        for key, value in (metadata.get(where) or {}).items():
            if not _LABEL_NAME.match(key) or len(key.split("/")[-1]) > 63:
                problems.append(f"metadata.{where} key {key!r} is invalid")
            if not isinstance(value, str):
                problems.append(f"metadata.{where}[{key}] must be a string")
            elif where == "labels" and (len(value) > 63 or not _LABEL_VALUE.match(value)):
                problems.append(f"metadata.labels[{key}] value {value!r} is invalid")
    return problems


def webhook_problems(job: dict[str, Any]) -> list[str]:
    """The operator's validating webhook (training-operator 1.9)."""
    problems = []
    specs = (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}
    if not specs:
        problems.append("spec.pytorchReplicaSpecs: must be set")
    for rtype, spec in specs.items():
        if rtype not in ("Master", "Worker"):
            problems.append(f"spec.pytorchReplicaSpecs[{rtype}]: replica type must be Master or Worker")
            continue
        containers = (((spec or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        pytorch = [c for c in containers if c.get("name") == "pytorch"]
        if not pytorch:
            problems.append(f"spec.pytorchReplicaSpecs[{rtype}]: no container named 'pytorch'")
        for c in containers:
            if not c.get("image"):
                problems.append(f"spec.pytorchReplicaSpecs[{rtype}]: container {c.get('name')!r} has no image")
        if rtype == "Master" and spec.get("replicas", 1) != 1:
            problems.append("spec.pytorchReplicaSpecs[Master].replicas: must be 1")
    return problems


def pytorchjob_problems(job: dict[str, Any]) -> list[str]:
    """Every reason a cluster would refuse ``job`` (empty when it would accept it)."""
    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in _validator().iter_errors(job)
    ]
    if job.get("apiVersion") != "kubeflow.org/v1" or job.get("kind") != "PyTorchJob":
        problems.append("apiVersion/kind must be kubeflow.org/v1 PyTorchJob")
    problems += metadata_problems(job.get("metadata") or {})
    problems += webhook_problems(job)
    return problems


# -- Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1) ---------------------------------------------------------

TRAINER_VERSIONS = ("v2.1.0", "v2.3.0")
TRAINER_PLURALS = {"TrainJob": "trainjobs", "TrainingRuntime": "trainingruntimes"}
_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@functools.cache
def trainer_crd(version: str, kind: str) -> dict[str, Any]:
    path = SCHEMAS / f"trainer-{version}" / f"trainer.kubeflow.org_{TRAINER_PLURALS[kind]}.yaml"
    return yaml.safe_load(path.read_text())


@functools.cache
def _trainer_validator(version: str, kind: str) -> jsonschema.Draft7Validator:
    crd_doc = trainer_crd(version, kind)
    served = next(v for v in crd_doc["spec"]["versions"] if v["name"] == "v1alpha1")
    return jsonschema.Draft7Validator(_strict(copy.deepcopy(served["schema"]["openAPIV3Schema"])))


def trainer_problems(obj: dict[str, Any], version: str) -> list[str]:
    """Every reason a cluster running Kubeflow Trainer ``version`` would refuse a TrainJob or TrainingRuntime:
    its CRD schema with strict field validation, plus the CRD's CEL rule on TrainJob names (jsonschema cannot
    evaluate CEL; kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go states it)."""
    kind = obj.get("kind")
    if obj.get("apiVersion") != "trainer.kubeflow.org/v1alpha1" or kind not in TRAINER_PLURALS:
        return [f"apiVersion/kind {obj.get('apiVersion')}/{kind} is not a trainer.kubeflow.org/v1alpha1 kind"]
    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in _trainer_validator(version, kind).iter_errors(obj)
    ]
    metadata = obj.get("metadata") or {}
    problems += metadata_problems(metadata)
    if kind == "TrainJob" and not _RFC1035.match(metadata.get("name", "")):
        problems.append("metadata.name must match RFC 1035 DNS label format")
    return problems
