"""A pod's status as the kubelet writes it: container statuses, phase and conditions, from the agent's records.

Pure: the node agent keeps one ``ContainerRecord`` per container and calls ``pod_status`` whenever one changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

# pkg/kubelet/types/pod_status.go PodConditionsByKubelet: the conditions the kubelet owns (and rewrites).
KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerRecord:
    """One container's current state, as the runtime would report it."""

    name: str
    image: str
    init: bool = False
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"  # waiting reason or terminated reason
    message: str = ""
    exit_code: int = 0
    started_at: str = ""
    finished_at: str = ""
    container_id: str = ""
    restart_count: int = 0
    last_terminated: dict[str, Any] | None = None

    def start(self, container_id: str) -> None:
        self.state, self.reason, self.message = "running", "", ""
        self.container_id, self.started_at, self.finished_at = container_id, now(), ""

    def terminate(self, exit_code: int, reason: str = "", message: str = "") -> None:
        """kubelet/kuberuntime: reason Completed for exit 0, Error otherwise (OOMKilled is not detected here)."""
        self.state, self.exit_code, self.message = "terminated", exit_code, message
        self.reason = reason or ("Completed" if exit_code == 0 else "Error")
        self.finished_at = now()
        self.started_at = self.started_at or self.finished_at

    def wait(self, reason: str, message: str = "") -> None:
        """Waiting again (for example CrashLoopBackOff): the last run becomes lastState."""
        if self.state == "terminated":
            self.last_terminated = self._terminated()
            self.restart_count += 1
        self.state, self.reason, self.message = "waiting", reason, message

    def restart(self, container_id: str) -> None:
        self.wait("")
        self.start(container_id)

    @property
    def ready(self) -> bool:
        """No readiness probes: a running container is ready; an init container is ready once it succeeded."""
        if self.init:
            return self.state == "terminated" and self.exit_code == 0
        return self.state == "running"

    def _terminated(self) -> dict[str, Any]:
        terminated = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": self.container_id,
        }
        if self.message:
            terminated["message"] = self.message
        return terminated

    def api_status(self) -> dict[str, Any]:
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self._terminated()}
        else:
            state = {"waiting": {"reason": self.reason, **({"message": self.message} if self.message else {})}}
        status = {
            "name": self.name,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
            "ready": self.ready,
            "started": self.state == "running",
            "restartCount": self.restart_count,
            "image": self.image,
            "imageID": "",
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


def _failed_before(record: ContainerRecord) -> bool:
    """Terminated in failure now, or waiting to restart after a failure."""
    if record.state == "terminated":
        return record.exit_code != 0
    return record.state == "waiting" and bool(record.last_terminated) and record.last_terminated["exitCode"] != 0


def get_phase(
    spec: Mapping[str, Any],
    init: Mapping[str, ContainerRecord],
    regular: Mapping[str, ContainerRecord],
    terminal: bool,
) -> str:
    """kubernetes pkg/kubelet/kubelet_pods.go getPhase, without restartable (sidecar) init containers and without
    the ContainerRestartRules gate."""
    restart_policy = spec.get("restartPolicy", "Always")
    pending_init = failed_init = 0
    for container in spec.get("initContainers") or []:
        record = init.get(container["name"])
        if record is None or record.state == "running":
            pending_init += 1
        elif _failed_before(record):
            failed_init += 1
        elif record.state != "terminated":
            pending_init += 1
    if failed_init and restart_policy == "Never":
        return "Failed"
    unknown = running = waiting = stopped = succeeded = 0
    for container in spec.get("containers") or []:
        record = regular.get(container["name"])
        if record is None:
            unknown += 1
        elif record.state == "running":
            running += 1
        elif record.state == "terminated":
            stopped += 1
            succeeded += record.exit_code == 0
        elif record.last_terminated:
            stopped += 1
        else:
            waiting += 1
    if pending_init or waiting:
        return "Pending"
    if running and not unknown:
        return "Running"
    if not running and stopped and not unknown:
        if terminal:
            return "Succeeded" if stopped == succeeded else "Failed"
        if restart_policy == "Always":
            return "Running"
        if stopped == succeeded:
            return "Succeeded"
        return "Failed" if restart_policy == "Never" else "Running"
    return "Pending"


def _condition(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    condition: dict[str, Any] = {"type": kind, "status": "True" if ok else "False"}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def _not_ready_message(unknown: list[str], others: list[str], state: str) -> str:
    """generate.go's message: "containers with unknown status: [a], containers with <state> status: [b]"."""
    parts = [f"containers with unknown status: [{' '.join(unknown)}]"] if unknown else []
    if others:
        parts.append(f"containers with {state} status: [{' '.join(others)}]")
    return ", ".join(parts)


def _containers_ready(spec: Mapping[str, Any], regular: Mapping[str, ContainerRecord], phase: str) -> dict:
    """kubernetes pkg/kubelet/status/generate.go GenerateContainersReadyCondition."""
    if phase in ("Succeeded", "Failed"):
        return _condition("ContainersReady", False, "PodCompleted" if phase == "Succeeded" else "PodFailed")
    names = [c["name"] for c in spec.get("containers") or []]
    unknown = [n for n in names if n not in regular]
    unready = [n for n in names if n in regular and not regular[n].ready]
    message = _not_ready_message(unknown, unready, "unready")
    if message:
        return _condition("ContainersReady", False, "ContainersNotReady", message)
    return _condition("ContainersReady", True)


def _initialized(spec: Mapping[str, Any], init: Mapping[str, ContainerRecord], started: bool, phase: str) -> dict:
    """kubernetes pkg/kubelet/status/generate.go GeneratePodInitializedCondition."""
    names = [c["name"] for c in spec.get("initContainers") or []]
    unknown = [n for n in names if n not in init]
    if (phase == "Succeeded" and not unknown) or started:
        return _condition("Initialized", True, "PodCompleted" if phase == "Succeeded" else "")
    incomplete = [n for n in names if n in init and not init[n].ready]
    message = _not_ready_message(unknown, incomplete, "incomplete")
    if message:
        return _condition("Initialized", False, "ContainersNotInitialized", message)
    return _condition("Initialized", True)


def kubelet_conditions(
    spec: Mapping[str, Any],
    init: Mapping[str, ContainerRecord],
    regular: Mapping[str, ContainerRecord],
    phase: str,
    sandbox_ready: bool,
) -> list[dict[str, Any]]:
    """pkg/kubelet/kubelet_pods.go generateAPIPodStatus: the kubelet-owned conditions, in its order."""
    started = any(r.state == "running" or r.last_terminated or r.state == "terminated" for r in regular.values())
    containers_ready = _containers_ready(spec, regular, phase)
    ready = {**containers_ready, "type": "Ready"}
    return [
        _condition("PodReadyToStartContainers", sandbox_ready),
        _initialized(spec, init, started, phase),
        ready,
        containers_ready,
        _condition("PodScheduled", True),
    ]


def with_transition_times(
    conditions: Sequence[dict[str, Any]], previous: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """A condition keeps its lastTransitionTime while its status stays the same."""
    before = {c["type"]: c for c in previous}
    stamped = []
    for condition in conditions:
        old = before.get(condition["type"])
        same = old is not None and old.get("status") == condition["status"] and old.get("lastTransitionTime")
        stamped.append({**condition, "lastProbeTime": None, "lastTransitionTime": same or now()})
    return stamped


@dataclass
class PodView:
    """What the status needs besides the container records."""

    spec: Mapping[str, Any]
    api_conditions: Sequence[Mapping[str, Any]]
    previous_conditions: Sequence[Mapping[str, Any]]
    """What we last wrote (the kubelet's status cache): transition times survive a watch that lags behind."""
    host_ip: str
    pod_ip: str
    start_time: str
    sandbox_ready: bool
    terminal: bool


def pod_status(view: PodView, init: Sequence[ContainerRecord], regular: Sequence[ContainerRecord]) -> dict:
    """The body of a pods/status merge patch: lists are replaced whole, so states never mix."""
    init_by_name = {r.name: r for r in init}
    regular_by_name = {r.name: r for r in regular}
    phase = get_phase(view.spec, init_by_name, regular_by_name, view.terminal)
    ours = kubelet_conditions(view.spec, init_by_name, regular_by_name, phase, view.sandbox_ready)
    others = [dict(c) for c in view.api_conditions if c.get("type") not in KUBELET_CONDITIONS]
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": others + with_transition_times(ours, view.previous_conditions or view.api_conditions),
        "hostIP": view.host_ip,
        "hostIPs": [{"ip": view.host_ip}],
        "startTime": view.start_time,
        "containerStatuses": [r.api_status() for r in regular],
    }
    if view.sandbox_ready:
        status.update(podIP=view.pod_ip, podIPs=[{"ip": view.pod_ip}])
    if init:
        status["initContainerStatuses"] = [r.api_status() for r in init]
    return status
