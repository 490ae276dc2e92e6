"""A Kubernetes API emulator for custom resources, over real HTTP on 127.0.0.1: kubeflow.org/v1 PyTorchJobs and
trainer.kubeflow.org/v1alpha1 TrainJobs and TrainingRuntimes, each validated against its real CRD schema. Modelled on
what the real API server does (kubernetes/kubernetes, staging/src/k8s.io/apiserver):

- create (201, 409, 422 from the kind's rules and, for PyTorchJobs, the training operator's webhook rules; 403
  "admission webhook ... denied the request" from the Trainer's runtime check for TrainJobs), get, list with labelSelector, delete, merge-patch, the status
  subresource, watch from a resourceVersion (410 Gone once the history was compacted, ``compact()``);
- the CRD schema's defaults, and the Trainer's defaulting webhook (runtime patches' ``time``), on create;
- field validation (``pkg/endpoints/handlers/rest.go`` ``fieldValidation``): ``fieldValidation=Strict`` refuses
  unknown fields with 400 BadRequest ("strict decoding error: unknown field ..."); ``Warn``, the default when the
  parameter is absent, drops them and says so in a ``Warning: 299`` header; ``Ignore`` drops them silently;
- paged lists (``limit``/``continue``, ``pkg/storage/etcd3/store.go`` ``GetList``): every page reports the first
  page's resourceVersion, ``remainingItemCount``, and a continue token from before a compaction is 410 Expired;
- deletion that takes a while: ``propagationPolicy=Foreground`` sets ``deletionTimestamp`` and the
  ``foregroundDeletion`` finalizer, and the garbage collector removes the object only ``gc_delay_s`` later
  (``pkg/registry/generic/registry/store.go`` ``Delete``, ``updateForGracefulDeletionAndFinalizers``); meanwhile a
  create of the same name is 409 and a second delete answers 200 with the object;
- 429 TooManyRequests with ``Retry-After`` (``throttle``), as API priority and fairness answers;
- every request recorded as ``calls`` (user, verb, API group, resource), the user taken from the bearer token,
  so tests can hold RBAC Roles to exactly what a client used;
- discovery (``/apis/<group>/<version>``) of the kinds whose CRD is installed (``served``).

Kinds are registered with ``register(Kind(...))`` (group, version, plural, schema, extra rules); objects are keyed
by (plural, namespace, name). ``put()`` installs an object as an administrator would. RBAC denials (``deny``), a
missing CRD (``crd_installed = False``, or a plural left out of ``served``) and transient 5xx (``fail_next``) can
be switched on. kmock answers 200 to creates, ignores label selectors and keeps no resourceVersions, hence this
emulator.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.k8s_schema import crd, pytorchjob_problems, trainer_crd, trainer_problems

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
TRAINER_GROUP, TRAINER_VERSION = "trainer.kubeflow.org", "v1alpha1"
_PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?/?$"
)
_DISCOVERY = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/?$")
CONTROLLER_TOKEN, OPERATOR_TOKEN, TRAINER_TOKEN = "emulator-token", "operator-token", "trainer-token"
FOREGROUND = "foregroundDeletion"
TRAINJOB_WEBHOOK = "validator.trainjob.trainer.kubeflow.org"  # the Trainer's manifests/base/webhook/manifests.yaml


@dataclass(frozen=True)
class Kind:
    """A served custom resource: its CRD schema (for pruning unknown fields) and the rules a create or update
    must pass (schema types, admission webhooks), as a list of problems."""

    group: str
    version: str
    plural: str
    kind: str
    schema: dict[str, Any]
    problems: Callable[[dict[str, Any]], list[str]]

    @property
    def resource(self) -> str:
        return f"{self.plural}.{self.group}"


class Call(NamedTuple):
    """One request as RBAC sees it."""

    user: str
    verb: str
    group: str
    resource: str


def _served_schema(crd_doc: dict[str, Any], version: str) -> dict[str, Any]:
    return next(v for v in crd_doc["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def pytorchjob_kind() -> Kind:
    return Kind(GROUP, VERSION, PLURAL, KIND, _served_schema(crd(), VERSION), pytorchjob_problems)


def trainer_kinds(trainer_version: str) -> list[Kind]:
    """TrainJob and TrainingRuntime as Kubeflow Trainer ``trainer_version`` (e.g. "v2.1.0") installs them."""
    problems = functools.partial(trainer_problems, version=trainer_version)
    return [
        Kind(
            TRAINER_GROUP,
            TRAINER_VERSION,
            plural,
            kind,
            _served_schema(trainer_crd(trainer_version, kind), TRAINER_VERSION),
            problems,
        )
        for kind, plural in (("TrainJob", "trainjobs"), ("TrainingRuntime", "trainingruntimes"))
    ]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of the fields that structural-schema pruning would drop (metadata is ObjectMeta, checked apart)."""
    if isinstance(obj, list):
        items = schema.get("items") or {}
        return [p for i, v in enumerate(obj) for p in unknown_fields(v, items, f"{path}[{i}]")]
    if not isinstance(obj, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    properties = schema.get("properties")
    additional = schema.get("additionalProperties")
    found = []
    for key, value in obj.items():
        where = f"{path}.{key}" if path else key
        if not path and key in ("apiVersion", "kind", "metadata"):
            continue
        if properties is not None and key in properties:
            found += unknown_fields(value, properties[key], where)
        elif isinstance(additional, dict):
            found += unknown_fields(value, additional, where)
        elif properties is not None and not additional:
            found.append(where)
    return found


def _drop(obj: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    pruned = copy.deepcopy(obj)
    for path in paths:
        parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
        node: Any = pruned
        for part in parts[:-1]:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        node.pop(parts[-1], None)
    return pruned


def apply_defaults(obj: Any, schema: dict[str, Any]) -> None:
    """The CRD schema's ``default`` values filled in where the object leaves a field out, at every level the
    object has (apiextensions-apiserver pkg/apiserver/schema/defaulting/algorithm.go Default)."""
    if isinstance(obj, list):
        for item in obj:
            apply_defaults(item, schema.get("items") or {})
        return
    if not isinstance(obj, dict):
        return
    for key, sub in (schema.get("properties") or {}).items():
        if key not in obj and "default" in sub:
            obj[key] = copy.deepcopy(sub["default"])
        if key in obj:
            apply_defaults(obj[key], sub)


def _trainjob_defaulter(job: dict[str, Any]) -> None:
    """The Trainer's mutating webhook stamps each runtime patch it has not seen (kubeflow/trainer v2.3
    pkg/webhooks/trainjob_webhook.go TrainJobDefaulter.Default)."""
    for patch in (job.get("spec") or {}).get("runtimePatches") or []:
        patch.setdefault("time", _now())


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def parse_selector(text: str) -> list[tuple[str, str, str | None]]:
    """'a=b,c!=d,e,!f' -> [(key, op, value)]; ops: =, !=, exists, !exists."""
    requirements = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append((key.strip(), "!=", value.strip()))
        elif "=" in part:
            key, value = part.split("=", 1)
            requirements.append((key.strip().rstrip("="), "=", value.strip().lstrip("=")))
        elif part.startswith("!"):
            requirements.append((part[1:].strip(), "!exists", None))
        else:
            requirements.append((part, "exists", None))
    return requirements


def selector_matches(requirements: list[tuple[str, str, str | None]], labels: dict[str, str]) -> bool:
    for key, op, value in requirements:
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!exists" and key in labels:
            return False
    return True


class KubeEmulator:
    def __init__(
        self,
        *,
        user: str = "system:serviceaccount:batch:batchgen-controller",
        gc_delay_s: float = 0.3,
        trainer_version: str = "v2.1.0",
    ):
        self.user = user
        self.users = {
            CONTROLLER_TOKEN: user,
            OPERATOR_TOKEN: "system:serviceaccount:kubeflow:training-operator",
            TRAINER_TOKEN: "system:serviceaccount:kubeflow-system:kubeflow-trainer-controller-manager",
        }
        self.crd_installed = True
        self.gc_delay_s = gc_delay_s
        self.deny: set[tuple[str, str]] = set()
        """(verb, resource) pairs refused with 403, e.g. ("create", "pytorchjobs")."""
        self.kinds: dict[tuple[str, str, str], Kind] = {}
        self._fail_next: list[int] = []
        self._throttle: list[int] = []
        self._lock = threading.Condition()
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        """(plural, namespace, name) -> object."""
        self._history: list[tuple[int, str, str, dict[str, Any]]] = []
        self._rv = 100
        self._compacted_rv = 0
        self.requests: list[tuple[str, str]] = []
        self.calls: list[Call] = []
        """Every request to a served kind, as RBAC would see it."""
        self.create_count: dict[str, int] = {}
        """name -> successful creates (201): a duplicate job would show as a count > 1 or as extra names."""
        for kind in (pytorchjob_kind(), *trainer_kinds(trainer_version)):
            self.register(kind)
        self.served = {kind.plural for kind in self.kinds.values()}
        """Plurals whose CRD is installed: drop "trainjobs" and "trainingruntimes" for a v1-only cluster."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kube-emulator", daemon=True)
        self._stopping = False

    def register(self, kind: Kind) -> None:
        self.kinds[(kind.group, kind.version, kind.plural)] = kind

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> KubeEmulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def write_kubeconfig(self, path: Path, namespace: str | None = "default", token: str = CONTROLLER_TOKEN) -> Path:
        """A kubeconfig for this emulator; ``namespace=None`` leaves the context without one."""
        context = {"cluster": "emulator", "user": "controller"}
        if namespace is not None:
            context["namespace"] = namespace
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "controller", "user": {"token": token}}],
                    "contexts": [{"name": "emulator", "context": context}],
                    "current-context": "emulator",
                }
            )
        )
        return path

    # -- test controls ---------------------------------------------------------------------------------------

    def fail_next(self, *statuses: int) -> None:
        """Answer the next requests with these HTTP statuses (e.g. 503, 500) before serving normally."""
        with self._lock:
            self._fail_next.extend(statuses)

    def throttle(self, requests: int, retry_after_s: int = 1) -> None:
        """Answer the next ``requests`` with 429 TooManyRequests and ``Retry-After: retry_after_s``."""
        with self._lock:
            self._throttle.extend([retry_after_s] * requests)

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: older watches and continue tokens get 410 Gone."""
        with self._lock:
            self._compacted_rv = self._rv
            self._history.clear()
            self._lock.notify_all()

    def objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(o)
                for (kind, ns, _), o in sorted(self._objects.items())
                if kind == plural and namespace in (None, ns)
            ]

    def jobs(self, namespace: str | None = None, plural: str = PLURAL) -> list[dict[str, Any]]:
        return self.objects(plural, namespace)

    def put(self, obj: dict[str, Any]) -> None:
        """Install an object as an administrator would (kubectl apply), e.g. a TrainingRuntime."""
        kind = next(k for k in self.kinds.values() if k.kind == obj["kind"])
        with self._lock:
            code, body, _ = self._create(kind, obj["metadata"]["namespace"], obj, "Strict")
        if code != 201:
            raise ValueError(f"emulator refused {obj['kind']}: {body['message']}")

    def wait_for_deletions(self, timeout_s: float = 10.0) -> None:
        """Until no object is terminating (the garbage collector has finished every foreground deletion)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while any(o["metadata"].get("deletionTimestamp") for o in self._objects.values()):
                if not self._lock.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("objects still terminating")

    def controller_calls(self) -> set[tuple[str, str]]:
        """(verb, resource) the controller's identity used."""
        return {(c.verb, c.resource) for c in self.calls if c.user == self.user}

    # -- state changes (under the lock) ----------------------------------------------------------------------

    def _bump(self, event: str, kind: Kind, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._history.append((self._rv, kind.plural, event, copy.deepcopy(obj)))
        self._lock.notify_all()

    def _prune(self, kind: Kind, body: dict[str, Any], validation: str, name: str) -> tuple[Any, list[str]]:
        """(object or an error answer, warnings) after field validation."""
        unknown = unknown_fields(body, kind.schema)
        if unknown and validation == "Strict":
            fields = ", ".join(f'unknown field "{u}"' for u in unknown)
            message = f'{kind.kind} in version "{kind.version}" cannot be handled as a {kind.kind}: strict decoding error: {fields}'
            return (400, _status(400, "BadRequest", message, name, kind)), []
        warnings = [f'unknown field "{u}"' for u in unknown] if validation == "Warn" else []
        return _drop(body, unknown), warnings

    def _create(
        self, kind: Kind, ns: str, body: dict[str, Any], validation: str
    ) -> tuple[int, dict[str, Any], list[str]]:
        meta = body.get("metadata") or {}
        name = meta.get("name")
        if not name:
            return (
                422,
                _status(422, "Invalid", f"{kind.kind}.{kind.group} is invalid: metadata.name: Required value"),
                [],
            )
        if meta.get("namespace") not in (None, ns):
            message = "the namespace of the provided object does not match the namespace sent on the request"
            return 400, _status(400, "BadRequest", message), []
        pruned, warnings = self._prune(kind, body, validation, name)
        if isinstance(pruned, tuple):
            return *pruned, []
        apply_defaults(pruned, kind.schema)
        if kind.kind == "TrainJob":
            _trainjob_defaulter(pruned)
        problems = kind.problems({**pruned, "metadata": {**meta, "namespace": ns}})
        if problems:
            return _invalid(kind, name, problems)
        denied = self._trainer_webhook(ns, pruned) if kind.kind == "TrainJob" else []
        if denied:
            # Validating webhooks run after the schema (422 above). A controller-runtime webhook denies with 403
            # Forbidden, and the API server prefixes whose denial it is (apiserver pkg/admission/plugin/webhook/
            # errors/statuserror.go ToStatusErr): what tests/realk8s/test_emulator_differential.py saw.
            message = f'admission webhook "{TRAINJOB_WEBHOOK}" denied the request: ' + "; ".join(denied)
            return 403, _status(403, "Forbidden", message), []
        if (kind.plural, ns, name) in self._objects:
            return 409, _status(409, "AlreadyExists", f'{kind.resource} "{name}" already exists', name, kind), []
        obj = pruned
        obj.pop("status", None)  # the main resource ignores status when a status subresource exists
        obj["metadata"] = {
            **meta,
            "namespace": ns,
            "uid": str(uuid.uuid4()),
            "creationTimestamp": _now(),
            "generation": 1,
        }
        self._objects[(kind.plural, ns, name)] = obj
        self.create_count[name] = self.create_count.get(name, 0) + 1
        self._bump("ADDED", kind, obj)
        return 201, copy.deepcopy(obj), warnings

    def _trainer_webhook(self, ns: str, job: dict[str, Any]) -> list[str]:
        """The Trainer's TrainJob admission webhook refuses a job whose namespaced runtime does not exist
        (kubeflow/trainer pkg/runtime/core/trainingruntime.go, ValidateObjects)."""
        ref = (job.get("spec") or {}).get("runtimeRef") or {}
        if ref.get("kind") != "TrainingRuntime" or ("trainingruntimes", ns, ref.get("name")) in self._objects:
            return []
        return [
            f'spec.runtimeRef: Invalid value: trainingruntimes.trainer.kubeflow.org "{ref.get("name")}" not found: '
            "specified trainingRuntime must be created before the TrainJob is created"
        ]

    def _patch(self, kind: Kind, ns: str, name: str, patch: Any, sub: str | None, validation: str):
        obj = self._objects.get((kind.plural, ns, name))
        if obj is None:
            return 404, _status(404, "NotFound", f'{kind.resource} "{name}" not found', name, kind), []
        if not isinstance(patch, dict):
            return 400, _status(400, "BadRequest", "merge patch body must be an object"), []
        warnings: list[str] = []
        if sub == "status":
            patched = merge_patch(obj, {"status": patch.get("status")}) if "status" in patch else obj
            # The API server validates a status update against the CRD's status schema as any other write.
            problems = [p for p in kind.problems(patched) if p.startswith("status")]
            if problems:
                return _invalid(kind, name, problems)
        else:
            patched = merge_patch(obj, {k: v for k, v in patch.items() if k != "status"})
            patched, warnings = self._prune(kind, patched, validation, name)
            if isinstance(patched, tuple):
                return *patched, []
            problems = kind.problems({k: v for k, v in patched.items() if k != "status"})
            if problems:
                return _invalid(kind, name, problems)
        patched["metadata"]["uid"] = obj["metadata"]["uid"]
        self._objects[(kind.plural, ns, name)] = patched
        self._bump("MODIFIED", kind, patched)
        return 200, copy.deepcopy(patched), warnings

    def _delete(self, kind: Kind, ns: str, name: str, policy: str | None) -> tuple[int, dict[str, Any], list[str]]:
        key = (kind.plural, ns, name)
        obj = self._objects.get(key)
        if obj is None:
            return 404, _status(404, "NotFound", f'{kind.resource} "{name}" not found', name, kind), []
        if obj["metadata"].get("deletionTimestamp"):
            return 200, copy.deepcopy(obj), []  # already being deleted
        if policy == "Foreground" and self.gc_delay_s > 0:
            # The object stays, marked, until the garbage collector has deleted its dependents (the pods).
            obj["metadata"]["deletionTimestamp"] = _now()
            obj["metadata"]["finalizers"] = [*obj["metadata"].get("finalizers", []), FOREGROUND]
            self._bump("MODIFIED", kind, obj)
            threading.Timer(self.gc_delay_s, self._collect, (kind, key)).start()
            return 200, copy.deepcopy(obj), []
        del self._objects[key]
        self._bump("DELETED", kind, obj)
        return 200, copy.deepcopy(obj), []

    def _collect(self, kind: Kind, key: tuple[str, str, str]) -> None:
        with self._lock:
            obj = self._objects.pop(key, None)
            if obj is not None and not self._stopping:
                obj["metadata"]["finalizers"] = [f for f in obj["metadata"]["finalizers"] if f != FOREGROUND]
                self._bump("DELETED", kind, obj)

    def _list(self, kind: Kind, ns: str, query: dict[str, str]) -> tuple[int, dict[str, Any], list[str]]:
        requirements = parse_selector(query.get("labelSelector", ""))
        list_rv, after = self._rv, ""
        if query.get("continue"):
            token = json.loads(base64.urlsafe_b64decode(query["continue"]))
            list_rv, after = token["rv"], token["start"]
            if list_rv < self._compacted_rv:
                message = (
                    "The provided continue parameter is too old to display a consistent list result. You can start "
                    "a new list without the continue parameter."
                )
                return 410, _status(410, "Expired", message), []
        items = [
            copy.deepcopy(o)
            for (plural, ons, name), o in sorted(self._objects.items())
            if plural == kind.plural and ons == ns and name > after
            and selector_matches(requirements, o["metadata"].get("labels") or {})
        ]  # fmt: skip
        metadata: dict[str, Any] = {"resourceVersion": str(list_rv)}
        limit = int(query.get("limit") or 0)
        if limit and len(items) > limit:
            items, rest = items[:limit], len(items) - limit
            start = items[-1]["metadata"]["name"]
            metadata["continue"] = base64.urlsafe_b64encode(
                json.dumps({"rv": list_rv, "start": start}).encode()
            ).decode()
            metadata["remainingItemCount"] = rest
        body = {
            "apiVersion": f"{kind.group}/{kind.version}",
            "kind": f"{kind.kind}List",
            "metadata": metadata,
            "items": items,
        }
        return 200, body, []

    def _watch(
        self, kind: Kind, ns: str, selector: str, since: str | None, timeout_s: float
    ) -> Iterator[dict[str, Any]]:
        requirements = parse_selector(selector)

        def relevant(plural: str, obj: dict[str, Any]) -> bool:
            return (
                plural == kind.plural
                and obj["metadata"]["namespace"] == ns
                and selector_matches(requirements, obj["metadata"].get("labels") or {})
            )

        deadline = time.monotonic() + timeout_s
        with self._lock:
            if since in (None, "", "0"):
                # "Get state and start at most recent": synthetic ADDED for what exists now.
                cursor = self._rv
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(o)}
                    for (plural, _, _), o in self._objects.items()
                    if relevant(plural, o)
                ]
            else:
                cursor = int(since)
                initial = []
                if cursor < self._compacted_rv:
                    message = f"too old resource version: {cursor} ({self._compacted_rv})"
                    initial = [{"type": "ERROR", "object": _status(410, "Expired", message)}]
        yield from initial
        if initial and initial[0]["type"] == "ERROR":
            return
        while True:
            with self._lock:
                while not self._stopping:
                    if cursor < self._compacted_rv:
                        events = None
                        break
                    events = [entry for entry in self._history if entry[0] > cursor]
                    if events:
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    self._lock.wait(min(remaining, 0.5))
                if self._stopping:
                    return
            if events is None:
                yield {"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {cursor}")}
                return
            for rv, plural, event, obj in events:
                cursor = rv
                if relevant(plural, obj):
                    yield {"type": event, "object": copy.deepcopy(obj)}

    def _discover(self, group: str, version: str) -> tuple[int, dict[str, Any]]:
        """``/apis/<group>/<version>``: the APIResourceList of the kinds served there (404 when none is)."""
        served = [
            k for k in self.kinds.values()
            if (k.group, k.version) == (group, version) and k.plural in self.served and self.crd_installed
        ]  # fmt: skip
        if not served:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        verbs = ["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"]
        resources = [
            {"name": k.plural, "singularName": k.kind.lower(), "namespaced": True, "kind": k.kind, "verbs": verbs}
            for k in served
        ]
        return 200, {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}",
            "resources": resources,
        }

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _handler_class(self):
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes; with Nagle on, each answer on a kept-alive connection would
            # wait for the client's delayed ACK (about 40 ms).
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
                pass

            def _send(self, code: int, body: dict[str, Any], warnings: list[str] = (), retry_after: int = 0) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for warning in warnings:
                    # RFC 7234 warn-text is a quoted-string (k8s.io/apiserver pkg/warning, headerescape).
                    escaped = warning.replace("\\", "\\\\").replace('"', '\\"')
                    self.send_header("Warning", f'299 - "{escaped}"')
                if retry_after:
                    self.send_header("Retry-After", str(retry_after))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"null") if length else None

            def _route(self, method: str) -> None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                body = self._body() if method in ("POST", "PATCH", "PUT", "DELETE") else None
                emulator.requests.append((method, self.path))
                discovery = _DISCOVERY.match(parts.path)
                if discovery and method == "GET":
                    with emulator._lock:
                        injected = emulator._fail_next.pop(0) if emulator._fail_next else None
                    if injected:
                        return self._send(injected, _status(injected, "InternalError", "injected failure"))
                    return self._send(*emulator._discover(discovery["group"], discovery["version"]))
                match = _PATH.match(parts.path)
                kind = emulator.kinds.get((match["group"], match["version"], match["plural"])) if match else None
                if kind is None or kind.plural not in emulator.served or not emulator.crd_installed:
                    return self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
                ns, name, sub = match["ns"], match["name"], match["sub"]
                watching = query.get("watch") in ("true", "1")
                verb = {
                    "POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update",
                    "GET": ("watch" if watching else "list") if name is None else "get",
                }[method]  # fmt: skip
                resource = kind.plural + ("/status" if sub else "")
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                user = emulator.users.get(token, "system:anonymous")
                with emulator._lock:
                    emulator.calls.append(Call(user, verb, kind.group, resource))
                    injected = emulator._fail_next.pop(0) if emulator._fail_next else None
                    retry_after = emulator._throttle.pop(0) if emulator._throttle and not injected else 0
                if injected:
                    return self._send(injected, _status(injected, "InternalError", "injected failure"))
                if retry_after:
                    status = _status(429, "TooManyRequests", "Too many requests, please try again later.")
                    status["details"] = {"retryAfterSeconds": retry_after}
                    return self._send(429, status, retry_after=retry_after)
                if (verb, resource) in emulator.deny:
                    message = (
                        f'{kind.resource}{" " + repr(name) if name else ""} is forbidden: User "{user}" cannot {verb} '
                        f'resource "{resource}" in API group "{kind.group}" in the namespace "{ns}"'
                    )
                    return self._send(403, _status(403, "Forbidden", message))
                if watching and name is None and method == "GET":
                    return self._stream(kind, ns, query)
                # rest.go fieldValidation: an absent directive means Warn.
                validation = query.get("fieldValidation") or "Warn"
                with emulator._lock:
                    if method == "POST" and name is None:
                        return self._send(*emulator._create(kind, ns, body or {}, validation))
                    if method == "GET" and name is None:
                        return self._send(*emulator._list(kind, ns, query))
                    if method == "GET":
                        obj = emulator._objects.get((kind.plural, ns, name))
                        if obj is None:
                            return self._send(
                                404, _status(404, "NotFound", f'{kind.resource} "{name}" not found', name, kind)
                            )
                        return self._send(200, copy.deepcopy(obj))
                    if method == "PATCH":
                        content_type = self.headers.get("Content-Type", "")
                        if "merge-patch" not in content_type:
                            return self._send(
                                415, _status(415, "UnsupportedMediaType", f"unsupported patch type {content_type}")
                            )
                        return self._send(*emulator._patch(kind, ns, name, body, sub, validation))
                    if method == "DELETE" and name is not None:
                        policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
                        return self._send(*emulator._delete(kind, ns, name, policy))
                return self._send(405, _status(405, "MethodNotAllowed", f"{method} not allowed on {parts.path}"))

            def _stream(self, kind: Kind, ns: str, query: dict[str, str]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                timeout = float(query.get("timeoutSeconds") or 300)
                try:
                    for event in emulator._watch(
                        kind, ns, query.get("labelSelector", ""), query.get("resourceVersion"), timeout
                    ):
                        line = json.dumps(event).encode() + b"\n"
                        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802
                self._route("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._route("POST")

            def do_PATCH(self) -> None:  # noqa: N802
                self._route("PATCH")

            def do_DELETE(self) -> None:  # noqa: N802
                self._route("DELETE")

            def do_PUT(self) -> None:  # noqa: N802
                self._route("PUT")

        return Handler


def _invalid(kind: Kind, name: str, problems: list[str]) -> tuple[int, dict[str, Any], list[str]]:
    message = f'{kind.kind}.{kind.group} "{name}" is invalid: ' + "; ".join(problems)
    return 422, _status(422, "Invalid", message, name, kind), []


def _status(code: int, reason: str, message: str, name: str | None = None, kind: Kind | None = None) -> dict[str, Any]:
    details = {"name": name, "group": kind.group if kind else GROUP, "kind": kind.plural if kind else PLURAL}
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details if name else {},
        "code": code,
    }
