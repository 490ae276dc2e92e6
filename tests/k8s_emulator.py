"""A Kubernetes API emulator for kubeflow.org/v1 PyTorchJobs and trainer.kubeflow.org/v1alpha1 TrainJobs and
TrainingRuntimes (``RESOURCES``), over real HTTP on 127.0.0.1.

Enough of the API server for the official ``kubernetes`` client and the controller: create (201, 409, 422 from
the real CRD schema with strict field validation and the operator's webhook rules), get, list with
labelSelector, delete, merge-patch, the status subresource, watch from a resourceVersion (410 Gone once the
history was compacted, which a test triggers with ``compact()``), uids and resourceVersions. RBAC denials
(``deny``), a missing CRD (``crd_installed = False``) and transient 5xx (``fail_next``) can be switched on.
kmock answers 200 to creates, ignores label selectors and keeps no resourceVersions, hence this emulator.
"""

from __future__ import annotations

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
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.k8s_schema import pytorchjob_problems, trainer_problems

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
TRAINER_GROUP, TRAINER_VERSION = "trainer.kubeflow.org", "v1alpha1"


@dataclass(frozen=True)
class Resource:
    """One served custom resource: what discovery lists and how a create or patch is validated."""

    group: str
    version: str
    plural: str
    kind: str
    problems: Callable[[dict[str, Any]], list[str]]


def _resources(trainer_version: str) -> dict[str, Resource]:
    trainer = functools.partial(trainer_problems, version=trainer_version)
    return {
        PLURAL: Resource(GROUP, VERSION, PLURAL, KIND, pytorchjob_problems),
        "trainjobs": Resource(TRAINER_GROUP, TRAINER_VERSION, "trainjobs", "TrainJob", trainer),
        "trainingruntimes": Resource(TRAINER_GROUP, TRAINER_VERSION, "trainingruntimes", "TrainingRuntime", trainer),
    }


_PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?/?$"
)
_DISCOVERY = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/?$")


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
    def __init__(self, *, user: str = "system:serviceaccount:batch:batchgen-controller", trainer_version="v2.1.0"):
        self.user = user
        self.crd_installed = True
        self.resources = _resources(trainer_version)
        self.served = set(self.resources)
        """Plurals whose CRD is installed: drop "trainjobs" and "trainingruntimes" for a v1-only cluster."""
        self.deny: set[tuple[str, str]] = set()
        """(verb, resource) pairs refused with 403, e.g. ("create", "pytorchjobs")."""
        self._fail_next: list[int] = []
        self._lock = threading.Condition()
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        """(plural, namespace, name) -> object."""
        self._history: list[tuple[int, str, str, dict[str, Any]]] = []
        self._rv = 100
        self._compacted_rv = 0
        self.requests: list[tuple[str, str]] = []
        self.calls: list[tuple[str, str, str, str]] = []
        """(User-Agent, verb, API group, resource) of every request to a served kind: what RBAC would check."""
        self.create_count: dict[str, int] = {}
        """name -> successful creates (201): a duplicate job would show as a count > 1 or as extra names."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kube-emulator", daemon=True)
        self._stopping = False

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

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "controller", "user": {"token": "emulator-token"}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {"cluster": "emulator", "user": "controller", "namespace": namespace},
                        }
                    ],
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

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: older watches get 410 Gone."""
        with self._lock:
            self._compacted_rv = self._rv
            self._history.clear()
            self._lock.notify_all()

    def jobs(self, namespace: str | None = None, plural: str = PLURAL) -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(o)
                for (p, ns, _), o in sorted(self._objects.items())
                if p == plural and namespace in (None, ns)
            ]

    def put(self, obj: dict[str, Any]) -> None:
        """Install an object as an administrator would (kubectl apply), e.g. a TrainingRuntime."""
        plural = next(p for p, r in self.resources.items() if r.kind == obj["kind"])
        with self._lock:
            code, body = self._create(self.resources[plural], obj["metadata"]["namespace"], obj)
        if code != 201:
            raise ValueError(f"emulator refused {obj['kind']}: {body['message']}")

    # -- state changes (under the lock) ----------------------------------------------------------------------

    def _bump(self, kind: str, plural: str, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._history.append((self._rv, plural, kind, copy.deepcopy(obj)))
        self._lock.notify_all()

    def _create(self, res: Resource, ns: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        meta = body.get("metadata") or {}
        name = meta.get("name")
        if not name:
            return 422, _status(422, "Invalid", f"{res.kind}.{res.group} is invalid: metadata.name: Required value")
        if meta.get("namespace") not in (None, ns):
            return 400, _status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        problems = res.problems({**body, "metadata": {**meta, "namespace": ns}})
        if res.kind == "TrainJob":
            problems += self._trainer_webhook(ns, body)
        if problems:
            message = f'{res.kind}.{res.group} "{name}" is invalid: ' + "; ".join(problems)
            return 422, _status(422, "Invalid", message, name)
        if (res.plural, ns, name) in self._objects:
            return 409, _status(409, "AlreadyExists", f'{res.plural}.{res.group} "{name}" already exists', name)
        obj = copy.deepcopy(body)
        obj.pop("status", None)  # the main resource ignores status when a status subresource exists
        obj["metadata"] = {
            **meta,
            "namespace": ns,
            "uid": str(uuid.uuid4()),
            "creationTimestamp": _now(),
            "generation": 1,
        }
        self._objects[(res.plural, ns, name)] = obj
        self.create_count[name] = self.create_count.get(name, 0) + 1
        self._bump("ADDED", res.plural, obj)
        return 201, copy.deepcopy(obj)

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

    def _patch(self, res: Resource, ns: str, name: str, patch: Any, sub: str | None) -> tuple[int, dict[str, Any]]:
        obj = self._objects.get((res.plural, ns, name))
        if obj is None:
            return 404, _status(404, "NotFound", f'{res.plural}.{res.group} "{name}" not found', name)
        if not isinstance(patch, dict):
            return 400, _status(400, "BadRequest", "merge patch body must be an object")
        if sub == "status":
            patched = merge_patch(obj, {"status": patch.get("status")}) if "status" in patch else obj
        else:
            patched = merge_patch(obj, {k: v for k, v in patch.items() if k != "status"})
            problems = res.problems({k: v for k, v in patched.items() if k != "status"})
            if problems:
                message = f'{res.kind}.{res.group} "{name}" is invalid: ' + "; ".join(problems)
                return 422, _status(422, "Invalid", message, name)
        patched["metadata"]["uid"] = obj["metadata"]["uid"]
        self._objects[(res.plural, ns, name)] = patched
        self._bump("MODIFIED", res.plural, patched)
        return 200, copy.deepcopy(patched)

    def _delete(self, res: Resource, ns: str, name: str) -> tuple[int, dict[str, Any]]:
        obj = self._objects.pop((res.plural, ns, name), None)
        if obj is None:
            return 404, _status(404, "NotFound", f'{res.plural}.{res.group} "{name}" not found', name)
        self._bump("DELETED", res.plural, obj)
        return 200, copy.deepcopy(obj)

    def _list(self, res: Resource, ns: str, selector: str) -> dict[str, Any]:
        requirements = parse_selector(selector)
        items = [
            copy.deepcopy(o)
            for (plural, ons, _), o in sorted(self._objects.items())
            if plural == res.plural and ons == ns and selector_matches(requirements, o["metadata"].get("labels") or {})
        ]
        return {
            "apiVersion": f"{res.group}/{res.version}",
            "kind": f"{res.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _watch(
        self, res: Resource, ns: str, selector: str, since: str | None, timeout_s: float
    ) -> Iterator[dict[str, Any]]:
        requirements = parse_selector(selector)

        def relevant(obj: dict[str, Any]) -> bool:
            return (
                obj["kind"] == res.kind
                and obj["metadata"]["namespace"] == ns
                and selector_matches(requirements, obj["metadata"].get("labels") or {})
            )

        deadline = time.monotonic() + timeout_s
        with self._lock:
            if since in (None, "", "0"):
                # "Get state and start at most recent": synthetic ADDED for what exists now.
                cursor = self._rv
                initial = [{"type": "ADDED", "object": copy.deepcopy(o)} for o in self._objects.values() if relevant(o)]
            else:
                cursor = int(since)
                initial = []
                if cursor < self._compacted_rv:
                    initial = [
                        {
                            "type": "ERROR",
                            "object": _status(
                                410, "Expired", f"too old resource version: {cursor} ({self._compacted_rv})"
                            ),
                        }
                    ]
        yield from initial
        if initial and initial[0]["type"] == "ERROR":
            return
        while True:
            with self._lock:
                while not self._stopping:
                    if cursor < self._compacted_rv:
                        events = None
                        break
                    events = [(rv, kind, obj) for rv, _plural, kind, obj in self._history if rv > cursor]
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
            for rv, kind, obj in events:
                cursor = rv
                if relevant(obj):
                    yield {"type": kind, "object": copy.deepcopy(obj)}

    def _discover(self, group: str, version: str) -> tuple[int, dict[str, Any]]:
        """``/apis/<group>/<version>``: the APIResourceList of the kinds served there (404 when none is)."""
        served = [
            r for r in self.resources.values()
            if (r.group, r.version) == (group, version) and r.plural in self.served and self.crd_installed
        ]  # fmt: skip
        if not served:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        verbs = ["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"]
        resources = [
            {"name": r.plural, "singularName": r.kind.lower(), "namespaced": True, "kind": r.kind, "verbs": verbs}
            for r in served
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

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
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
                with emulator._lock:
                    injected = emulator._fail_next.pop(0) if emulator._fail_next else None
                if injected:
                    return self._send(injected, _status(injected, "InternalError", "injected failure"))
                discovery = _DISCOVERY.match(parts.path)
                if discovery and method == "GET":
                    return self._send(*emulator._discover(discovery["group"], discovery["version"]))
                match = _PATH.match(parts.path)
                res = emulator.resources.get(match["plural"]) if match else None
                if res is None or (res.group, res.version) != (match["group"], match["version"]):
                    res = None
                if res is None or res.plural not in emulator.served or not emulator.crd_installed:
                    return self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
                ns, name, sub = match["ns"], match["name"], match["sub"]
                watching = query.get("watch") in ("true", "1")
                verb = {
                    "POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update",
                    "GET": ("watch" if watching else "list") if name is None else "get",
                }[method]  # fmt: skip
                resource = res.plural + ("/status" if sub else "")
                emulator.calls.append((self.headers.get("User-Agent", ""), verb, res.group, resource))
                if (verb, resource) in emulator.deny:
                    return self._send(
                        403,
                        _status(
                            403,
                            "Forbidden",
                            f"{res.plural}.{res.group}{' ' + repr(name) if name else ''} is forbidden: User "
                            f'"{emulator.user}" cannot {verb} resource "{resource}" in API group "{res.group}" in '
                            f'the namespace "{ns}"',
                        ),
                    )
                if watching and name is None and method == "GET":
                    return self._stream(res, ns, query)
                with emulator._lock:
                    if method == "POST" and name is None:
                        return self._send(*emulator._create(res, ns, body or {}))
                    if method == "GET" and name is None:
                        return self._send(200, emulator._list(res, ns, query.get("labelSelector", "")))
                    if method == "GET":
                        obj = emulator._objects.get((res.plural, ns, name))
                        if obj is None:
                            return self._send(
                                404, _status(404, "NotFound", f'{res.plural}.{res.group} "{name}" not found', name)
                            )
                        return self._send(200, copy.deepcopy(obj))
                    if method == "PATCH":
                        content_type = self.headers.get("Content-Type", "")
                        if "merge-patch" not in content_type:
                            return self._send(
                                415, _status(415, "UnsupportedMediaType", f"unsupported patch type {content_type}")
                            )
                        return self._send(*emulator._patch(res, ns, name, body, sub))
                    if method == "DELETE" and name is not None:
                        return self._send(*emulator._delete(res, ns, name))
                return self._send(405, _status(405, "MethodNotAllowed", f"{method} not allowed on {parts.path}"))

            def _stream(self, res: Resource, ns: str, query: dict[str, str]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                timeout = float(query.get("timeoutSeconds") or 300)
                try:
                    for event in emulator._watch(
                        res, ns, query.get("labelSelector", ""), query.get("resourceVersion"), timeout
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


def _status(code: int, reason: str, message: str, name: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "group": GROUP, "kind": PLURAL} if name else {},
        "code": code,
    }
