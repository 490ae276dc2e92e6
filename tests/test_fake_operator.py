"""The fake training operator writes only statuses the real PyTorchJob CRD accepts, and the API emulator refuses
the ones it does not (a status patch is validated like any other write): a fake that wrote an invalid status
would otherwise feed the controller objects no cluster can hold."""

from __future__ import annotations

import sys
import time
from datetime import datetime

import pytest
from kubernetes import client

from batchgen.launch.k8s.pytorchjob import render_pytorchjob
from batchgen.launch.k8s.settings import LaunchSettings
from tests.fake_operator import GROUP, PLURAL, VERSION, FakeOperator

RUN = "demo-0123456789ab"
SETTINGS = LaunchSettings(output="s3://videos/out", namespace="batch", image="registry.example.com/batchgen:1.0")


def _quick_pods(job: dict) -> None:
    """Every pod exits 0 at once: the test is about the status the operator writes, not about the work."""
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        pod.pop("initContainers", None)
        for container in pod["containers"]:
            container["command"], container["args"] = [sys.executable, "-c", "pass"], []


def _status(kube, name: str) -> dict:
    return kube.backend().api.get_namespaced_custom_object_status(GROUP, VERSION, kube.namespace, PLURAL, name)


def test_a_finished_job_gets_a_valid_completion_time(kube, tmp_path):
    job = render_pytorchjob(RUN, ["shard-000000"], SETTINGS, 1)
    name = job["metadata"]["name"]
    kube.backend().api.create_namespaced_custom_object(GROUP, VERSION, kube.namespace, PLURAL, job)
    operator = FakeOperator(kube.kubeconfig, kube.namespace, tmp_path / "nodes", sabotage=_quick_pods).start()
    try:
        deadline = time.monotonic() + 60
        while "completionTime" not in _status(kube, name).get("status", {}):
            if time.monotonic() > deadline or operator.errors:
                pytest.fail(
                    f"no completionTime on {name} after 60 s; operator errors: {[getattr(e, 'body', e) for e in operator.errors]}"
                )
            time.sleep(0.1)
    finally:
        operator.stop()
    status = _status(kube, name)["status"]
    assert not operator.errors, operator.errors
    assert isinstance(status["completionTime"], str), status
    finished = datetime.fromisoformat(status["completionTime"].replace("Z", "+00:00"))
    assert finished >= datetime.fromisoformat(status["startTime"].replace("Z", "+00:00"))
    assert [c["type"] for c in status["conditions"] if c["status"] == "True"][-1] == "Succeeded"


def test_the_emulator_refuses_a_status_the_crd_forbids(kube):
    job = render_pytorchjob(RUN, ["shard-000000"], SETTINGS, 1)
    name = job["metadata"]["name"]
    api = kube.backend().api
    api.create_namespaced_custom_object(GROUP, VERSION, kube.namespace, PLURAL, job)
    with pytest.raises(client.exceptions.ApiException) as refused:
        # What the fake once sent: the `now` function itself, which the client serialises as {}.
        api.patch_namespaced_custom_object_status(
            GROUP, VERSION, kube.namespace, PLURAL, name, {"status": {"completionTime": {}}}
        )
    assert refused.value.status == 422
    assert "status.completionTime: {} is not of type 'string'" in refused.value.body
    assert "completionTime" not in _status(kube, name).get("status", {})
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, kube.namespace, PLURAL, name, {"status": {"completionTime": "2026-01-01T00:00:00Z"}}
    )
    assert _status(kube, name)["status"]["completionTime"] == "2026-01-01T00:00:00Z"
