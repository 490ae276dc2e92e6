"""Validation of prometheus-operator objects (ServiceMonitor, PodMonitor) against the real CRDs of
prometheus-operator/prometheus-operator (example/prometheus-operator-crd/monitoring.coreos.com_*.yaml, copied to
tests/schemas, see SOURCE.md there), with the API server's strict field validation."""

from __future__ import annotations

import copy
import functools
from typing import Any

import jsonschema
import yaml

from tests.k8s_schema import VENDORED_SCHEMAS, _strict, metadata_problems

CRDS = {
    "ServiceMonitor": VENDORED_SCHEMAS / "monitoring.coreos.com_servicemonitors.yaml",
    "PodMonitor": VENDORED_SCHEMAS / "monitoring.coreos.com_podmonitors.yaml",
}


@functools.cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRDS[kind].read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(copy.deepcopy(version["schema"]["openAPIV3Schema"])))


def monitoring_problems(obj: dict[str, Any]) -> list[str]:
    """Why a cluster with the prometheus-operator CRDs would refuse ``obj`` (empty when it would accept it)."""
    where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    if obj.get("apiVersion") != "monitoring.coreos.com/v1" or obj.get("kind") not in CRDS:
        return [f"{where}: not a monitoring.coreos.com/v1 ServiceMonitor or PodMonitor"]
    problems = [
        f"{where}: {'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in _validator(obj["kind"]).iter_errors(obj)
    ]
    return problems + [f"{where}: {p}" for p in metadata_problems(obj.get("metadata") or {})]
