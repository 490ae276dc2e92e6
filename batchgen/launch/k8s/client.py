"""The Kubernetes client side of job submission: ``JobBackend`` (the small interface the controller sees) and
``CustomObjectBackend`` over the official client's ``CustomObjectsApi``; each job kind (``pytorchjob``,
``trainjob``) adds its API coordinates, rendering and status mapping (``JobInfo``).

Every Kubernetes API error is translated here, once, into what the rest of batchgen understands:
- 409 on create: the job exists (a previous submit, or another controller, created it): read it back and adopt it;
- 403: ``ClusterError`` naming the RBAC verb and resource the controller's identity lacks, unless an admission
  webhook denied the request (webhooks built on controller-runtime deny with 403 too): then its message;
- 404 on the collection: the kind's CRD is not installed;
- 400 and 422: ``ClusterError`` with the API server's reason (objects are sent with ``fieldValidation=Strict``,
  so a misspelled field is refused with 400 instead of silently dropped);
- 5xx, 429 and connection errors: retried with exponential backoff (429 waits its ``Retry-After``), then
  ``TransientClusterError`` (retryable exit);
- 410 during a watch: list again and watch from the list's resourceVersion; 410 for a list's continue token: list
  again from the start.
Lists are paged (``LIST_PAGE`` objects per request), so a run with thousands of jobs never asks for all at once.
"""

from __future__ import annotations

import abc
import builtins
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from tenacity import RetryCallState, RetryError, retry_if_exception, stop_after_attempt, wait_exponential
from tenacity import Retrying as _Retrying

from batchgen.core import metrics
from batchgen.core.errors import ClusterError, TransientClusterError
from batchgen.launch.k8s import names

log = logging.getLogger("batchgen.k8s.backend")

FINISHED_STATES = ("Succeeded", "Failed")
LIST_PAGE = 500
WEBHOOK_DENIAL = "denied the request"
IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
T = TypeVar("T")


@dataclass(frozen=True)
class JobInfo(abc.ABC):
    """What the controller needs to know about one job, read from the cluster. Each kind's module maps its own
    status onto one set of states (``state``: Succeeded, Failed, Queued, Suspended, Restarting, Running, Created,
    Pending). Queued is a job Kueue keeps suspended until its LocalQueue's ClusterQueue has quota for it: it is
    neither finished nor failed, and it holds one of the run's ``max_jobs`` slots, like a running one."""

    name: str
    namespace: str
    uid: str
    resource_version: str
    labels: dict[str, str]
    annotations: dict[str, str]
    conditions: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    kind: ClassVar[str] = ""

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> JobInfo:
        meta = obj.get("metadata") or {}
        return cls(
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            uid=meta.get("uid", ""),
            resource_version=str(meta.get("resourceVersion", "")),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            conditions=list((obj.get("status") or {}).get("conditions") or []),
            raw=obj,
        )

    @property
    def attempt(self) -> int:
        return int(self.labels.get(names.ATTEMPT_LABEL, "0") or 0)

    @property
    def group(self) -> tuple[int, int] | None:
        try:
            return int(self.labels[names.SHARD_FIRST_LABEL]), int(self.labels[names.SHARD_LAST_LABEL])
        except (KeyError, ValueError):
            return None

    @property
    def shards(self) -> list[str]:
        text = self.annotations.get(names.SHARDS_ANNOTATION, "")
        return [s for s in text.split(",") if s]

    def condition(self, kind: str) -> dict[str, Any] | None:
        # The operator appends conditions; their order is not a contract, so look each type up.
        for c in self.conditions:
            if c.get("type") == kind and str(c.get("status")) == "True":
                return c
        return None

    @property
    @abc.abstractmethod
    def state(self) -> str:
        """Succeeded, Failed, Queued, Suspended, Restarting, Running, Created or Pending (no condition yet)."""

    @property
    @abc.abstractmethod
    def active_pods(self) -> int:
        """Pods of the job running now."""

    @property
    @abc.abstractmethod
    def failed_pods(self) -> int:
        """Pods the kind's controller currently reports failed (a retryable one is recreated right after)."""

    @abc.abstractmethod
    def condition_type(self) -> str:
        """The kind's condition type that explains ``state`` (for ``reason``)."""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def deleting(self) -> bool:
        """Deletion was requested; the object stays until its finalizers (foreground deletion) are done."""
        return bool((self.raw.get("metadata") or {}).get("deletionTimestamp"))

    @property
    def queue(self) -> str:
        """The Kueue LocalQueue the job was submitted to; empty when Kueue does not manage it."""
        return self.labels.get(names.KUEUE_QUEUE_LABEL, "")

    def reason(self) -> str:
        if self.state == "Queued":
            return f"waiting for quota: Kueue has not admitted it from LocalQueue {self.queue!r}"
        c = self.condition(self.condition_type())
        text = f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ") if c else ""
        ended = self.annotations.get(names.ENDED_ANNOTATION)
        return f"{ended} ({text})" if ended and text else ended or text


@dataclass(frozen=True)
class WatchEvent:
    type: str
    """ADDED, MODIFIED, DELETED, or RESYNC (the watch expired and the jobs were listed again)."""
    job: JobInfo | None


class JobBackend(abc.ABC):
    """Where jobs run. Names are chosen by the caller (deterministic); the backend never invents one."""

    namespace: str
    kind: str

    @abc.abstractmethod
    def render(
        self, plan: Any, shards: list[str], settings: Any, attempt: int, *, group: tuple[str, str]
    ) -> dict[str, Any]:
        """The job object for ``shards`` of ``plan`` (a pure function of its arguments)."""

    @abc.abstractmethod
    def create(self, manifest: dict[str, Any]) -> tuple[JobInfo, bool]:
        """Create the job; if one of that name exists, return it. Returns (job, created_by_this_call)."""

    @abc.abstractmethod
    def get(self, name: str) -> JobInfo | None: ...

    @abc.abstractmethod
    def list(self, label_selector: str) -> tuple[list[JobInfo], str]:
        """Jobs matching the selector, and the collection's resourceVersion to watch from."""

    @abc.abstractmethod
    def delete(self, name: str) -> bool:
        """Delete the job (and, through the operator, its pods); False if it did not exist."""

    @abc.abstractmethod
    def annotate(self, name: str, annotations: dict[str, str]) -> None:
        """Merge ``annotations`` into the job's metadata."""

    @abc.abstractmethod
    def end(self, name: str, why: str) -> None:
        """Stop a running job so that it finishes as Failed, recording ``why`` on it."""

    @abc.abstractmethod
    def watch(self, label_selector: str, resource_version: str, timeout_s: int) -> Iterator[WatchEvent]:
        """Changes after ``resource_version`` until ``timeout_s`` passes."""


def _is_retryable(error: BaseException) -> bool:
    from kubernetes.client.exceptions import ApiException

    if isinstance(error, ApiException):
        return error.status in (429, 500, 502, 503, 504) or error.status == 0
    import urllib3

    return isinstance(error, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _retry_after_or(backoff: Callable[[Any], float], cap_s: float) -> Callable[[Any], float]:
    """A tenacity wait: the server's Retry-After on a 429 (API priority and fairness), else ``backoff``."""

    def wait(state: Any) -> float:
        error = state.outcome.exception()
        headers = getattr(error, "headers", None) or {}
        if getattr(error, "status", None) == 429 and str(headers.get("Retry-After", "")).isdigit():
            return min(float(headers["Retry-After"]), cap_s)
        return backoff(state)

    return wait


def _retrying_after(verb: str, resource: str, state: RetryCallState) -> None:
    """tenacity's before_sleep: the failed attempt's error counted and logged."""
    error = state.outcome.exception() if state.outcome is not None else None
    metrics.api_error(verb, getattr(error, "status", None))
    log.warning("Kubernetes API %s %s failed (%s); retrying", verb, resource, _short(error))


def _json_object(body: object) -> dict[str, Any]:
    """A custom-object call's answer: the client types it ``object`` (the shape is the resource's own)."""
    if not isinstance(body, dict):
        raise ClusterError(f"Kubernetes API answered {type(body).__name__} where a JSON object was expected")
    return body


def _status_body(error: Any) -> dict[str, Any]:
    try:
        return json.loads(error.body or "{}")
    except (TypeError, ValueError):
        return {}


def context_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace a namespaced command uses when none is given: the kubeconfig context's, in-cluster the
    pod's own, else "default" (what kubectl does)."""
    from kubernetes import config

    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            with open(IN_CLUSTER_NAMESPACE) as f:
                return f.read().strip() or "default"
        except OSError:
            return "default"
    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except config.ConfigException as e:
        raise ClusterError(f"no Kubernetes configuration: {e} (set KUBECONFIG or run inside the cluster)") from e
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    if chosen is None:
        raise ClusterError(f"kubeconfig has no context {context!r}")
    return (chosen.get("context") or {}).get("namespace") or "default"


def load_api_client(kubeconfig: str | None = None, context: str | None = None):
    """An ApiClient from ``kubeconfig``/``KUBECONFIG``/~/.kube/config, or the pod's service account in-cluster."""
    from kubernetes import client, config

    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            return client.ApiClient()
        configuration = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
        return client.ApiClient(configuration)
    except config.ConfigException as e:
        raise ClusterError(f"no Kubernetes configuration: {e} (set KUBECONFIG or run inside the cluster)") from e


class CustomObjectBackend(JobBackend):
    """Jobs of one custom resource kind in one namespace, through ``CustomObjectsApi``."""

    group: str
    version: str
    plural: str
    install_hint: str
    """What to install when the API server does not serve the kind."""
    ending_spec: dict[str, Any]
    """The spec change (a JSON merge patch) that makes the kind's controller stop the job for good (``end``)."""
    info_class: type[JobInfo]
    """How the kind's status reads (its ``JobInfo``)."""
    deletion_propagation = "Foreground"
    """How ``delete`` cascades: Foreground keeps the job, terminating, until its pods are gone, so it still counts
    against ``max_jobs`` while they release their GPUs."""

    @property
    def resource(self) -> str:
        return f"{self.plural}.{self.group}"

    def __init__(
        self,
        namespace: str,
        api_client: Any = None,
        *,
        attempts: int = 6,
        max_wait_s: float = 10.0,
        request_timeout_s: float = 30.0,
    ):
        from kubernetes import client

        self.namespace = namespace
        self.api = client.CustomObjectsApi(api_client or load_api_client())
        self.attempts = attempts
        self.max_wait_s = max_wait_s
        self.request_timeout_s = request_timeout_s

    # -- error translation -------------------------------------------------------------------------------

    def _call(self, verb: str, fn: Callable[..., T], *args: Any, name: str | None = None, **kwargs: Any) -> T:
        from kubernetes.client.exceptions import ApiException

        retrying = _Retrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(self.attempts),
            wait=_retry_after_or(wait_exponential(multiplier=0.2, max=self.max_wait_s), cap_s=60),
            reraise=False,
            before_sleep=lambda state: _retrying_after(verb, self.resource, state),
        )
        try:
            return retrying(fn, *args, **kwargs)
        except RetryError as e:
            last = e.last_attempt.exception()
            metrics.api_error(verb, getattr(last, "status", None))
            raise TransientClusterError(
                f"Kubernetes API {verb} {self.resource} in namespace {self.namespace!r} still failing after "
                f"{self.attempts} attempts: {_short(last)}"
            ) from last
        except ApiException as e:
            metrics.api_error(verb, e.status)
            raise self._translate(verb, e, name) from e

    def _translate(self, verb: str, error: Any, name: str | None) -> ClusterError:
        body = _status_body(error)
        message = body.get("message") or error.reason or ""
        what = f"{self.resource} {name!r}" if name else self.resource
        if error.status == 403 and WEBHOOK_DENIAL in message:
            # Not RBAC: controller-runtime webhooks (the Trainer's, the training operator's) deny with 403
            # Forbidden, which the API server passes on as "admission webhook <name> denied the request: ..."
            # (controller-runtime pkg/webhook/admission/response.go ValidationResponse; apiserver
            # pkg/admission/plugin/webhook/errors/statuserror.go ToStatusErr).
            return ClusterError(f"an admission webhook refused {what}: {message}{self.rejection_hint(message)}")
        if error.status == 403:
            return ClusterError(
                f"forbidden: the controller's identity may not '{verb}' resource '{self.plural}' in API group "
                f"'{self.group}' in namespace {self.namespace!r}; grant the verb '{verb}' on '{self.plural}' in a "
                f"Role bound to it (API server: {message})"
            )
        if error.status == 401:
            return ClusterError(f"unauthorized: the Kubernetes credentials were refused ({message})")
        if error.status == 404 and _collection_missing(body):
            return ClusterError(
                f"{self.kind} API ({self.group}/{self.version}) not installed in this cluster: {self.install_hint}"
            )
        if error.status in (400, 422):
            return ClusterError(f"the API server rejected {what}: {message}{self.rejection_hint(message)}")
        return ClusterError(f"Kubernetes API {verb} {what} failed with HTTP {error.status}: {message}")

    # -- JobBackend ----------------------------------------------------------------------------------------

    def create(self, manifest: dict[str, Any]) -> tuple[JobInfo, bool]:
        name = manifest["metadata"]["name"]
        try:
            obj = self._raw_create(manifest)
            return self._info(obj), True
        except _AlreadyExists:
            existing = self.get(name)
            if existing is None:  # deleted between our create and get: try once more
                try:
                    return self._info(self._raw_create(manifest)), True
                except _AlreadyExists:
                    existing = self.get(name)
                    if existing is None:
                        raise ClusterError(f"{self.resource} {name!r} keeps appearing and disappearing") from None
            log.info("job %s already exists: adopted", name)
            return existing, False

    def _raw_create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        name = manifest["metadata"]["name"]

        def attempt() -> dict[str, Any]:
            try:
                return _json_object(self.api.create_namespaced_custom_object(
                    self.group, self.version, self.namespace, self.plural, manifest, field_validation="Strict",
                    _request_timeout=self.request_timeout_s,
                ))  # fmt: skip
            except ApiException as e:
                if e.status == 409:
                    raise _AlreadyExists() from e
                raise

        return self._call("create", attempt, name=name)

    def get(self, name: str) -> JobInfo | None:
        from kubernetes.client.exceptions import ApiException

        def attempt() -> dict[str, Any] | None:
            try:
                return _json_object(self.api.get_namespaced_custom_object(
                    self.group, self.version, self.namespace, self.plural, name,
                    _request_timeout=self.request_timeout_s,
                ))  # fmt: skip
            except ApiException as e:
                if e.status == 404 and not _collection_missing(_status_body(e)):
                    return None
                raise

        obj = self._call("get", attempt, name=name)
        return self._info(obj) if obj else None

    def list(self, label_selector: str) -> tuple[list[JobInfo], str]:
        from kubernetes.client.exceptions import ApiException

        for _ in range(self.attempts):
            try:
                return self._list_pages(label_selector)
            except ApiException as e:
                if e.status != 410:
                    raise self._translate("list", e, None) from e
                # The continue token outlived the compacted history: only a fresh list is consistent.
                log.info("list of %s expired between pages; listing again", self.resource)
        raise TransientClusterError(
            f"Kubernetes API list {self.resource}: continue token expired {self.attempts} times"
        )

    def _list_pages(self, label_selector: str) -> tuple[builtins.list[JobInfo], str]:
        from kubernetes.client.exceptions import ApiException

        def page(token: str | None) -> dict[str, Any]:
            try:
                return _json_object(self.api.list_namespaced_custom_object(
                    self.group, self.version, self.namespace, self.plural, label_selector=label_selector,
                    limit=LIST_PAGE, _continue=token, _request_timeout=self.request_timeout_s,
                ))  # fmt: skip
            except ApiException as e:
                if e.status == 410:
                    raise _Expired(e) from e
                raise

        jobs: list[JobInfo] = []
        token, version = None, ""
        while True:
            try:
                result = self._call("list", page, token)
            except _Expired as e:
                raise e.error from None
            meta = result.get("metadata") or {}
            version = version or str(meta.get("resourceVersion", ""))
            jobs += [self._info(o) for o in result.get("items", [])]
            token = meta.get("continue")
            if not token:
                return jobs, version

    def delete(self, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        def attempt() -> bool:
            try:
                self.api.delete_namespaced_custom_object(
                    self.group, self.version, self.namespace, self.plural, name,
                    propagation_policy=self.deletion_propagation, _request_timeout=self.request_timeout_s,
                )  # fmt: skip
                return True
            except ApiException as e:
                if e.status == 404 and not _collection_missing(_status_body(e)):
                    return False
                raise

        return self._call("delete", attempt, name=name)

    def end(self, name: str, why: str) -> None:
        self._patch(name, {"metadata": {"annotations": {names.ENDED_ANNOTATION: why}}, "spec": self.ending_spec})

    def annotate(self, name: str, annotations: dict[str, str]) -> None:
        self._patch(name, {"metadata": {"annotations": annotations}})

    def _patch(self, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch the job; a job deleted meanwhile (by cancel, or by another controller) is left alone."""
        from kubernetes.client.exceptions import ApiException

        def attempt() -> None:
            try:
                self.api.patch_namespaced_custom_object(
                    self.group, self.version, self.namespace, self.plural, name, patch,
                    field_validation="Strict", _request_timeout=self.request_timeout_s,
                )  # fmt: skip
            except ApiException as e:
                if e.status != 404 or _collection_missing(_status_body(e)):
                    raise
                log.info("%s %s is gone; not patching it", self.kind, name)

        self._call("patch", attempt, name=name)

    def watch(self, label_selector: str, resource_version: str, timeout_s: int) -> Iterator[WatchEvent]:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        rv = resource_version
        try:
            stream = watch.Watch().stream(
                self.api.list_namespaced_custom_object, self.group, self.version, self.namespace, self.plural,
                label_selector=label_selector, resource_version=rv, timeout_seconds=max(1, int(timeout_s)),
                allow_watch_bookmarks=True, _request_timeout=timeout_s + self.request_timeout_s,
            )  # fmt: skip
            for event in stream:
                kind = event.get("type")
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    yield WatchEvent(kind, self._info(event["object"]))
        except ApiException as e:
            if e.status != 410:
                if _is_retryable(e):
                    log.warning("watch of %s interrupted (%s); resyncing", self.resource, _short(e))
                    yield WatchEvent("RESYNC", None)
                    return
                raise self._translate("watch", e, None) from e
            # The resourceVersion we watched from was compacted away: what changed meanwhile is only
            # knowable by listing again; the caller resyncs from the listing and watches from its version.
            log.info("watch expired (410 Gone) at resourceVersion %s; listing again", rv)
            yield WatchEvent("RESYNC", None)
        except Exception as e:
            if not _is_retryable(e):
                raise
            log.warning("watch of %s interrupted (%s); resyncing", self.resource, _short(e))
            yield WatchEvent("RESYNC", None)

    def check_ready(self, settings: Any) -> None:
        """Refuse to launch, saying what to install, when something every job of the kind needs is missing."""

    def rejection_hint(self, message: str) -> str:
        """What to change when the API server refuses an object for ``message`` (empty when nothing specific)."""
        return ""

    def _info(self, obj: dict[str, Any]) -> JobInfo:
        return self.info_class.from_object(obj)


class _AlreadyExists(Exception):
    pass


class _Expired(Exception):
    """A 410 for a list's continue token, carried past the retry loop (which would translate it)."""

    def __init__(self, error: Any):
        super().__init__(str(error))
        self.error = error


def _collection_missing(body: dict[str, Any]) -> bool:
    """A 404 for the resource type (CRD absent) rather than for one named object."""
    details = body.get("details") or {}
    return not details.get("name")


def _short(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    status = getattr(error, "status", None)
    if status is not None:
        return f"HTTP {status} {getattr(error, 'reason', '')}".strip()
    return f"{type(error).__name__}: {error}"[:300]
