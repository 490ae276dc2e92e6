"""The emulator (tests/k8s_emulator.py) against the real API server: the same requests, the controller's own, sent
through the same kubernetes client to both, must get the same status codes and the same object shapes.

The sequence is what `batchgen submit` does with TrainJobs: create, create again (409: adopt), a paged list by
label, a watch from a resourceVersion that is gone (410), delete of a missing job (404), Strict field validation
(400), and the Trainer webhook's refusal of a TrainJob whose runtime is missing. The real side is the real
kube-apiserver with the real Trainer's CRDs and webhooks (v2.3.0); the emulator serves the same release's schemas.

Known differences, normalised here and nowhere else (batchgen reads none of them):
- metadata.managedFields: the real server returns them on every object; the emulator keeps no field managers.
- Status.details.causes and details.uid: the real server adds causes to 400/422 answers; batchgen reads the
  message and the reason.
- The message of a watch's 410 quotes resourceVersions; compared are the code and the reason.
- A list's remainingItemCount and an empty continue token: compared as the client reads a page (its items, and
  whether a non-empty continue token came).
- A listed TrainJob's status: the real Trainer has reconciled it by then; the emulator runs no controller.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from batchgen.launch.k8s import names
from batchgen.launch.k8s.client import load_api_client
from batchgen.launch.k8s.settings import LaunchSettings
from batchgen.launch.k8s.trainjob import GROUP, VERSION, render_trainingruntime, render_trainjob
from tests.k8s_emulator import KubeEmulator
from tests.realk8s.conftest import restricted_namespace, skip_module_unless_available

skip_module_unless_available()
pytestmark = pytest.mark.slow

PLURAL = "trainjobs"
RUN = "diff-0123456789ab"
TRAINER_RELEASE = "v2.3.0"  # what tools/kube/kubebin.py builds
IGNORED = {"metadata.managedFields", "details.causes", "details.uid"}


@dataclass
class Answer:
    code: int
    body: Any

    def shape(self) -> frozenset[str]:
        return _shape(self.body)


def _shape(value: Any, path: str = "") -> frozenset[str]:
    """Every key path of a JSON document with its value's JSON type ("spec.trainer.numNodes:int"; list items as
    "[]"): what "the same shape" means. The known differences (module docstring) are left out."""
    if isinstance(value, dict):
        paths = [
            _shape(v, f"{path}.{k}" if path else k)
            for k, v in value.items()
            if f"{path}.{k}".lstrip(".") not in IGNORED
        ]
        return frozenset().union(*paths) if paths else frozenset({f"{path}:{{}}"})
    if isinstance(value, list):
        return frozenset().union(*(_shape(v, f"{path}[]") for v in value)) if value else frozenset({f"{path}:[]"})
    return frozenset({f"{path}:{type(value).__name__}"})


class Target:
    """One API server (real or emulated) and a namespace on it, reached through batchgen's own client setup."""

    def __init__(self, kubeconfig: str, namespace: str):
        from kubernetes import client

        self.namespace = namespace
        self.api = client.CustomObjectsApi(load_api_client(kubeconfig))

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Answer:
        from kubernetes.client.exceptions import ApiException

        try:
            return Answer(200, fn(GROUP, VERSION, self.namespace, PLURAL, *args, **kwargs))
        except ApiException as e:
            return Answer(e.status, json.loads(e.body) if e.body else None)

    def create(self, body: dict, **kwargs: Any) -> Answer:
        return self.call(self.api.create_namespaced_custom_object, body, field_validation="Strict", **kwargs)

    def watch_first(self, resource_version: str) -> dict:
        """The first event of a watch from ``resource_version`` (an ERROR event carries a 410 Status)."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        stream: Iterator[dict] = watch.Watch().stream(
            self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
            resource_version=resource_version, timeout_seconds=5,
        )  # fmt: skip
        try:
            for event in stream:
                return {"type": event["type"]}
        except ApiException as e:  # the client raises an ERROR event's Status (or an HTTP error) as this
            return {"type": "ERROR", "code": e.status, "reason": str(e.reason).split(":")[0]}
        return {"type": "none"}


def _settings(namespace: str, runtime: str = "batchgen-runtime") -> LaunchSettings:
    return LaunchSettings(
        output="s3://differential/out", namespace=namespace, image="localhost/batchgen:test", gpus_per_node=1,
        num_heads=4, trainer_api="v2.3", runtime_name=runtime,
    )  # fmt: skip


def _job(namespace: str, first: int, runtime: str = "batchgen-runtime") -> dict:
    shard = f"shard-{first:06d}"
    return render_trainjob(RUN, [shard], _settings(namespace, runtime), 1, group=(shard, shard))


def _sequence(target: Target, expire: Callable[[], str]) -> dict[str, Any]:
    """The controller's requests, in its order; each step's status code and the shape of what came back."""
    ns = target.namespace
    seen: dict[str, Any] = {}
    created = target.create(_job(ns, 0))
    seen["create"] = (created.code, created.shape())
    again = target.create(_job(ns, 0))
    seen["create again"] = (again.code, again.body["reason"], again.body["details"]["kind"], again.shape())
    for first in (1, 2):
        target.create(_job(ns, first))
    selector = names.run_selector(RUN)
    page = target.call(target.api.list_namespaced_custom_object, label_selector=selector, limit=1)
    pages, token = [page.body], page.body["metadata"].get("continue")
    while token:
        nxt = target.call(target.api.list_namespaced_custom_object, label_selector=selector, limit=1, _continue=token)
        pages.append(nxt.body)
        token = nxt.body["metadata"].get("continue")
    # What the client reads: items per page and whether a continue token came (the real server sends "continue"
    # with an empty value on a last page that it could not know was last).
    seen["paged list"] = [(len(p["items"]), bool(p["metadata"].get("continue"))) for p in pages]
    # status is the Trainer's to write (the real one has reconciled by now; the emulator has no controller).
    seen["list item shape"] = _shape({k: v for k, v in pages[0]["items"][0].items() if k != "status"})
    seen["watch from a compacted version"] = target.watch_first(expire())
    missing = target.call(target.api.delete_namespaced_custom_object, "no-such-job", propagation_policy="Background")
    seen["delete missing"] = (
        missing.code,
        missing.body["reason"],
        missing.body["details"].get("kind"),
        missing.shape(),
    )
    bogus = _job(ns, 3)
    bogus["spec"]["bogus"] = 1
    strict = target.create(bogus)
    seen["strict"] = (strict.code, strict.body["reason"], 'unknown field "spec.bogus"' in strict.body["message"])
    refused = target.create(_job(ns, 4, runtime="no-such-runtime"))
    seen["webhook refusal"] = (refused.code, refused.body["reason"], "no-such-runtime" in refused.body["message"])
    return seen


@pytest.fixture
def emulator(tmp_path) -> Iterator[Target]:
    server = KubeEmulator(trainer_version=TRAINER_RELEASE).start()
    namespace = "differential"
    server.put(render_trainingruntime(_settings(namespace)))
    try:
        target = Target(str(server.write_kubeconfig(tmp_path / "emulator.kubeconfig", namespace)), namespace)
        target.server = server
        yield target
    finally:
        server.stop()


def test_the_emulator_answers_the_controllers_requests_as_the_real_server_does(control_plane, emulator):
    namespace = restricted_namespace(control_plane, f"diff-{uuid.uuid4().hex[:6]}")
    control_plane.kubectl(
        "apply", "--server-side", "-f", "-", stdin=json.dumps(render_trainingruntime(_settings(namespace)))
    )
    real = Target(str(control_plane.kubeconfig), namespace)

    def emulator_expired() -> str:
        before = emulator.server._rv
        emulator.server.compact()
        return str(before - 1)

    # The real server's watch cache starts at its own start: any version before it is gone, as after compaction.
    real_seen = _sequence(real, lambda: "1")
    emulated_seen = _sequence(emulator, emulator_expired)
    differences = {step: _difference(real_seen[step], emulated_seen[step]) for step in real_seen}
    differences = {step: d for step, d in differences.items() if d}
    assert not differences, json.dumps(differences, indent=1, default=str)[:6000]


def _difference(real: Any, emulated: Any) -> Any:
    """Nothing when equal; for shapes, the key paths only one side has; else both answers."""
    if real == emulated:
        return None
    if isinstance(real, tuple) and isinstance(emulated, tuple) and len(real) == len(emulated):
        return [_difference(r, e) for r, e in zip(real, emulated, strict=True)]
    if isinstance(real, frozenset) and isinstance(emulated, frozenset):
        return {"real only": sorted(real - emulated), "emulator only": sorted(emulated - real)}
    return {"real": real, "emulator": emulated}
