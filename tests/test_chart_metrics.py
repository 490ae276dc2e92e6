"""The chart's observability objects: the controller's metrics port and Service, the optional ServiceMonitor and
PodMonitor (validated against prometheus-operator's CRDs, tests/k8s_monitoring.py), the log format env, and the
Grafana dashboard next to the chart, whose every queried metric a real scrape exports."""

from __future__ import annotations

import json
import re

import helm_python as helm
import pytest

from batchgen.core import metrics
from batchgen.core.layout import shard_id
from batchgen.launch.k8s.pytorchjob import render_pytorchjob
from tests.k8s_manifests import all_problems, by_kind, controller_pod, env_of
from tests.k8s_monitoring import monitoring_problems
from tests.k8s_schema import pytorchjob_problems
from tests.test_helm_chart import CHART, chart, launch_settings, merged, objects_of, render  # noqa: F401

MONITORS = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                        "podMonitor": {"enabled": True}}}  # fmt: skip
DASHBOARD = CHART / "dashboards" / "batchgen.json"


def _selected(selector: dict, labels: dict[str, str]) -> bool:
    matches = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for expression in selector.get("matchExpressions") or []:
        assert expression["operator"] == "Exists", expression
        matches = matches and expression["key"] in labels
    return matches


def test_defaults_serve_controller_metrics_through_a_service_and_log_json(chart):  # noqa: F811
    objects = objects_of(render(chart, merged()))
    (container,) = controller_pod(objects)["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    env = env_of(container)
    assert env["BATCHGEN_METRICS_PORT"]["value"] == "9400" and env["BATCHGEN_LOG_FORMAT"]["value"] == "json"
    (service,) = by_kind(objects, "Service")
    (job,) = by_kind(objects, "Job")
    assert _selected({"matchLabels": service["spec"]["selector"]}, job["spec"]["template"]["metadata"]["labels"])
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9400, "targetPort": "metrics", "protocol": "TCP"}]
    assert not by_kind(objects, "ServiceMonitor") and not by_kind(objects, "PodMonitor")


def test_monitors_when_asked_are_valid_and_select_the_controller_and_worker_pods(chart, tmp_path):  # noqa: F811
    objects = objects_of(render(chart, merged(MONITORS, {"workers": {"gpusPerNode": 4}})))
    assert all_problems(objects) == []
    (service_monitor,) = by_kind(objects, "ServiceMonitor")
    (pod_monitor,) = by_kind(objects, "PodMonitor")
    assert monitoring_problems(service_monitor) == [] and monitoring_problems(pod_monitor) == []
    (service,) = by_kind(objects, "Service")
    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"
    assert _selected(service_monitor["spec"]["selector"], service["metadata"]["labels"])
    assert [e["port"] for e in service_monitor["spec"]["endpoints"]] == ["metrics"]
    # One endpoint per torchrun rank (port + LOCAL_RANK), on the pods of the PyTorchJobs the controller will create
    # with the chart's launch settings, which declare those ports and set the workers' port and log format.
    job = render_pytorchjob("prompts-0123456789ab", [shard_id(0)], launch_settings(objects, tmp_path), attempt=1)
    expected_ports = [{"name": f"metrics-{r}", "containerPort": 9400 + r, "protocol": "TCP"} for r in range(4)]
    assert [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]] == [p["name"] for p in expected_ports]
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert _selected(pod_monitor["spec"]["selector"], replica["template"]["metadata"]["labels"])
        (container,) = replica["template"]["spec"]["containers"]
        assert container["ports"] == expected_ports
        env = env_of(container)
        assert env["BATCHGEN_METRICS_PORT"]["value"] == "9400" and env["BATCHGEN_LOG_FORMAT"]["value"] == "json"
    assert pytorchjob_problems(job) == []


def test_the_crd_check_refuses_what_prometheus_operator_would(chart):  # noqa: F811
    (pod_monitor,) = by_kind(objects_of(render(chart, merged(MONITORS))), "PodMonitor")
    pod_monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"
    pod_monitor["spec"]["podMetricsEndpoints"][1]["port"] = 9401
    pod_monitor["spec"]["podMetricsEndpoint"] = []
    problems = monitoring_problems(pod_monitor)
    assert any("podMetricsEndpoints.0.interval" in p for p in problems), problems
    assert any("'podMetricsEndpoint' was unexpected" in p for p in problems), problems
    assert any("podMetricsEndpoints.1.port: 9401 is not of type 'string'" in p for p in problems), problems


def test_port_zero_turns_metrics_off(chart, tmp_path):  # noqa: F811
    objects = objects_of(render(chart, merged(MONITORS, {"metrics": {"port": 0}, "logFormat": "text"})))
    job = render_pytorchjob("prompts-0123456789ab", [shard_id(0)], launch_settings(objects, tmp_path), attempt=1)
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert "ports" not in container
    assert not {"BATCHGEN_METRICS_PORT", "BATCHGEN_LOG_FORMAT"} & set(env_of(container))
    (container,) = controller_pod(objects)["containers"]
    assert "ports" not in container and env_of(container)["BATCHGEN_METRICS_PORT"]["value"] == "0"
    assert env_of(container)["BATCHGEN_LOG_FORMAT"]["value"] == "text"
    assert not [o for o in objects if o["kind"] in ("Service", "ServiceMonitor", "PodMonitor")]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"metrics": {"port": -1}}, "at '/metrics/port': minimum: got -1, want 0"),
        ({"logFormat": "xml"}, "at '/logFormat': value must be one of 'json', 'text'"),
        ({"metrics": {"interval": "1x"}}, "at '/metrics/interval': '1x' does not match pattern"),
    ],
)
def test_values_schema_refuses_bad_metrics_values(chart, bad, message):  # noqa: F811
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        chart.validate_schema(merged(bad))


def _exported_names() -> set[str]:
    """Sample names the worker and controller registries export (what their /metrics endpoints serve)."""
    names = set()
    for registry in (metrics.WORKER_REGISTRY, metrics.CONTROLLER_REGISTRY):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "info": ["_info"]}
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def test_every_metric_the_dashboard_queries_is_exported():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", ())]
    queried = {name for expr in exprs for name in re.findall(r"\bbatchgen_[a-z0-9_]+", expr)}
    exported = _exported_names()
    assert exported == set(metrics.WORKER_METRICS) | set(metrics.CONTROLLER_METRICS)
    assert queried and queried <= exported, queried - exported
    assert len(exprs) >= 8
