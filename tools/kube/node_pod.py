"""One pod on the node agent: its containers as local process groups, from setup to the last status.

Modeled on the kubelet's pod worker (kubernetes pkg/kubelet/pod_workers.go: sync, then terminating, then
terminated) and its runtime manager (pkg/kubelet/kuberuntime/kuberuntime_manager.go SyncPod: init containers one
at a time, then every container; kuberuntime_container.go killContainer: SIGTERM, the grace period, SIGKILL).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import urllib3
from kubernetes.client.exceptions import ApiException

from tools.kube.node_env import ContainerConfigError, EnvSources, Image, container_argv, resolve_env
from tools.kube.node_status import ContainerRecord, PodView, now, pod_status
from tools.kube.node_volumes import (
    START_FAILED,
    Volume,
    VolumeAPI,
    VolumeError,
    container_mounts,
    hosts_file,
    mount_script,
    prepare_volumes,
)

log = logging.getLogger("node_agent")

MINIMUM_GRACE_S = 2  # kuberuntime_container.go minimumGracePeriodInSeconds
DEFAULT_GRACE_S = 30  # the API's default terminationGracePeriodSeconds
BACKOFF_INITIAL_S = 10.0  # kubelet.go: backOffPeriod, doubled per restart up to MaxContainerBackOff
BACKOFF_MAX_S = 300.0
SETUP_RETRY_S = 2.0
POLL_S = 0.1
# The API server failing a lookup is retried like a missing source; the container waits meanwhile.
TRANSIENT = (ApiException, urllib3.exceptions.HTTPError)
HOSTS_REFRESH_S = 2.0


class NodeHost(Protocol):
    """What a pod worker needs from the agent."""

    root: Path
    image: Image
    host_ip: str
    pod_ip: str
    allocatable: Mapping[str, str]
    no_run_s: float | None

    def publish(self, pod: Mapping[str, Any], status: dict) -> None: ...

    def delete(self, pod: Mapping[str, Any]) -> None: ...

    def env_sources(self, pod: Mapping[str, Any]) -> EnvSources: ...

    def volume_api(self, pod: Mapping[str, Any]) -> VolumeAPI: ...

    def dns_names(self, namespace: str) -> list[str]: ...


def grace_period(pod: Mapping[str, Any]) -> int:
    """kuberuntime_container.go setTerminationGracePeriod: deletionGracePeriodSeconds, else the spec's, at
    least MINIMUM_GRACE_S."""
    meta, spec = pod["metadata"], pod["spec"]
    grace = meta.get("deletionGracePeriodSeconds")
    if grace is None:
        grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    return max(int(grace), MINIMUM_GRACE_S)


def exit_code(returncode: int) -> int:
    """Killed by signal N: 128 + N, as container runtimes report it."""
    return 128 - returncode if returncode < 0 else returncode


class Container:
    """A container spec with its record, its live process and its restart backoff."""

    def __init__(self, spec: Mapping[str, Any], init: bool):
        self.spec = spec
        self.record = ContainerRecord(spec["name"], spec.get("image", ""), init=init)
        self.process: subprocess.Popen | None = None
        self.marker: Path | None = None
        self.next_start = 0.0
        self.backoff = 0.0
        self.started = 0.0

    def schedule_restart(self) -> None:
        """First restart at once, then 10 s doubling to 300 s (kubelet CrashLoopBackOff)."""
        self.next_start = time.monotonic() + self.backoff
        self.backoff = min(BACKOFF_MAX_S, self.backoff * 2 or BACKOFF_INITIAL_S)
        if self.next_start > time.monotonic():
            self.record.wait("CrashLoopBackOff", f"back-off restarting failed container {self.spec['name']}")

    def pending(self, restart_policy: str) -> bool:
        """Not running, and to be started: never started yet, or exited and to be restarted."""
        if self.record.state == "running":
            return False
        return self.record.state == "waiting" or self.should_restart(restart_policy)

    def should_restart(self, restart_policy: str) -> bool:
        """kubernetes pkg/kubelet/container/helpers.go ShouldContainerBeRestarted."""
        return restart_policy == "Always" or (restart_policy == "OnFailure" and self.record.exit_code != 0)


class PodWorker:
    """Runs one pod in its own thread; `update` hands it the newest API object (deletion included)."""

    def __init__(self, pod: Mapping[str, Any], host: NodeHost):
        self.pod = pod
        self.host = host
        meta = pod["metadata"]
        self.key = f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        self.dir = host.root / "pods" / self.key
        self.log_dir = host.root / "logs" / self.key
        self.init = [Container(c, True) for c in pod["spec"].get("initContainers") or []]
        self.main = [Container(c, False) for c in pod["spec"].get("containers") or []]
        if self.init:  # kubelet_pods.go convertToAPIContainerStatuses: waiting for the init containers
            for container in self.main:
                container.record.reason = "PodInitializing"
        self.stopping = threading.Event()
        self.stop_grace: int | None = None
        self.deleting = False
        self.sandbox_ready = False
        self.terminal = False
        self.start_time = now()
        self.volumes: dict[str, Volume] = {}
        self.hosts_written = 0.0
        self.published_conditions: list[dict] = []
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pod {self.key}", daemon=True)

    def start(self) -> PodWorker:
        self._thread.start()
        return self

    def update(self, pod: Mapping[str, Any]) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting = True
            self.terminate(grace_period(pod))

    def terminate(self, grace: int) -> None:
        if not self.stopping.is_set() or (self.stop_grace is not None and grace < self.stop_grace):
            self.stop_grace = grace
        self.stopping.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- the pod's life -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._publish()
            if self._setup() and self._run_init():
                self._run_main()
        except Exception:
            log.exception("pod %s: worker failed; killing its processes", self.key)
            self.stop_grace = MINIMUM_GRACE_S
            self.stopping.set()
        try:
            self._finish()
            if self.deleting:
                self.host.delete(self.pod)
        except Exception:
            log.exception("pod %s: final status or deletion not written", self.key)
        finally:
            self.done.set()

    def _finish(self) -> None:
        if self.stopping.is_set():
            self._kill_all()
            self.terminal = True
        self._publish()

    def _publish(self) -> None:
        view = PodView(
            spec=self.pod["spec"],
            api_conditions=(self.pod.get("status") or {}).get("conditions") or [],
            previous_conditions=self.published_conditions,
            host_ip=self.host.host_ip,
            pod_ip=self.host.pod_ip,
            start_time=self.start_time,
            sandbox_ready=self.sandbox_ready,
            terminal=self.terminal,
        )
        status = pod_status(view, [c.record for c in self.init], [c.record for c in self.main])
        self.published_conditions = status["conditions"]
        self.host.publish(self.pod, status)

    def _setup(self) -> bool:
        """Volumes and /etc/hosts; retried while a source is missing (the kubelet's ContainerCreating)."""
        if self.host.no_run_s is not None:
            self.sandbox_ready = True
            return True
        while not self.stopping.is_set():
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self.volumes = prepare_volumes(
                    self.pod, self.dir, self.host.volume_api(self.pod), self.host.allocatable
                )
                self._write_hosts()
                self.sandbox_ready = True
                return True
            except (VolumeError, ContainerConfigError, *TRANSIENT) as e:
                self._set_waiting("ContainerCreating", str(e))
            self.stopping.wait(SETUP_RETRY_S)
        return False

    def _write_hosts(self) -> None:
        """Rewritten in place (the bind mount follows the inode) so names created later resolve too."""
        content = hosts_file(self.pod, self.host.pod_ip, self.host.dns_names(self.pod["metadata"]["namespace"]))
        path = self.dir / "etc-hosts"
        self.hosts_written = time.monotonic()
        if not path.exists() or path.read_text() != content:
            with open(path, "w") as f:
                f.write(content)

    def _refresh_hosts(self) -> None:
        """Names created after the pod started (a peer's pod, a Service) resolve too, as DNS would serve them."""
        if self.host.no_run_s is not None or time.monotonic() - self.hosts_written < HOSTS_REFRESH_S:
            return
        try:
            self._write_hosts()
        except Exception as e:  # best effort: the file keeps its last content
            log.warning("pod %s: /etc/hosts not refreshed: %s", self.key, e)

    def _set_waiting(self, reason: str, message: str) -> None:
        changed = False
        for container in self.init + self.main:
            if container.record.state == "waiting" and (container.record.reason, container.record.message) != (
                reason,
                message,
            ):
                container.record.reason, container.record.message = reason, message
                changed = True
        if changed:
            log.warning("pod %s: %s: %s", self.key, reason, message)
            self._publish()

    def _run_init(self) -> bool:
        """Init containers one at a time; a failure with restartPolicy Never fails the pod."""
        restart_policy = self.pod["spec"].get("restartPolicy", "Always")
        for container in self.init:
            while not self.stopping.is_set():
                if not self._start_when_due(container):
                    continue
                self._publish()
                self._wait_exit([container])
                if self.stopping.is_set() or container.record.exit_code == 0:
                    break
                if restart_policy == "Never":
                    return False
                container.schedule_restart()
                self._publish()
            if self.stopping.is_set():
                return False
        return True

    def _run_main(self) -> None:
        restart_policy = self.pod["spec"].get("restartPolicy", "Always")
        for container in self.main:
            self._start_when_due(container)
        self._publish()
        while not self.stopping.is_set():
            exited = self._wait_exit([c for c in self.main if c.record.state == "running"])
            for container in exited:
                if container.should_restart(restart_policy):
                    container.schedule_restart()
            pending = [c for c in self.main if c.pending(restart_policy)]
            due = [c for c in pending if c.next_start <= time.monotonic()]
            started = [c for c in due if self._start_when_due(c)]
            if exited or started:
                self._publish()
            if not pending and all(c.record.state != "running" for c in self.main):
                return
            if not exited and not started:
                self._refresh_hosts()
                self.stopping.wait(POLL_S)

    # -- processes ------------------------------------------------------------------------------------------

    def _start_when_due(self, container: Container) -> bool:
        """Start the container once its backoff has passed; False (after a short wait) while it has not, or
        while its configuration cannot be resolved (CreateContainerConfigError, retried)."""
        if container.next_start > time.monotonic():
            self.stopping.wait(min(POLL_S * 5, container.next_start - time.monotonic()))
            return False
        try:
            self._spawn(container)
            return True
        except (ContainerConfigError, *TRANSIENT) as e:
            if container.record.state == "terminated":
                container.record.wait("CreateContainerConfigError", str(e))
            else:
                container.record.reason, container.record.message = "CreateContainerConfigError", str(e)
            log.warning("pod %s container %s: %s", self.key, container.spec["name"], e)
            self._publish()
            self.stopping.wait(SETUP_RETRY_S)
            return False

    def _spawn(self, container: Container) -> None:
        record = container.record
        attempt = record.restart_count + (1 if record.state == "terminated" else 0)
        if self.host.no_run_s is not None:
            container.process = None
            self._record_start(container, f"node-agent://no-run/{self.key}/{record.name}/{attempt}")
            return
        hostname = self.pod["spec"].get("hostname") or self.pod["metadata"]["name"]
        env = {**self.host.image.env, "HOSTNAME": hostname}
        env.update(resolve_env(self.pod, container.spec, self.host.env_sources(self.pod)))
        argv = container_argv(container.spec, env, self.host.image)
        mounts = container_mounts(container.spec, self.volumes, self.dir / "etc-hosts")
        script = mount_script(mounts, container.spec.get("workingDir") or self.host.image.workdir, hostname)
        log_path = self.log_dir / record.name / f"{attempt}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        container.marker = self.dir / "started" / f"{record.name}-{attempt}"
        container.marker.parent.mkdir(parents=True, exist_ok=True)
        marker_fd = os.open(container.marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with open(log_path, "ab") as out:
                container.process = subprocess.Popen(
                    ["unshare", "--mount", "--uts", "--propagation", "private", "--", "sh", "-c", script, "sh", *argv],
                    env=env,
                    stdin=marker_fd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: SIGTERM reaches every process of it
                )
        finally:
            os.close(marker_fd)
        self._record_start(container, f"node-agent://{container.process.pid}")
        log.info("pod %s container %s: started pid %d", self.key, record.name, container.process.pid)

    def _record_start(self, container: Container, container_id: str) -> None:
        if container.record.state == "terminated":
            container.record.restart(container_id)
        else:
            container.record.start(container_id)
        container.started = time.monotonic()

    def _wait_exit(self, containers: list[Container]) -> list[Container]:
        """Block until one of `containers` exits or the pod is stopping; returns those that exited."""
        while True:
            exited = [c for c in containers if self._finished(c)]
            if exited or self.stopping.is_set() or not containers:
                for container in exited:
                    self._record_exit(container)
                return exited
            self.stopping.wait(POLL_S)

    def _finished(self, container: Container) -> bool:
        if self.host.no_run_s is not None:
            return container.record.state == "running" and (
                container.record.init or time.monotonic() - container.started >= self.host.no_run_s
            )
        return container.process is not None and container.process.poll() is not None

    def _record_exit(self, container: Container) -> None:
        if container.process is None:  # --no-run
            container.record.terminate(0)
            return
        code = exit_code(container.process.returncode)
        started = container.marker is not None and container.marker.read_text().strip() == "started"
        if code == START_FAILED and not started:
            log_file = self.log_dir / container.record.name / f"{container.record.restart_count}.log"
            message = log_file.read_text(errors="replace").strip().splitlines()[-1:] if log_file.exists() else []
            container.record.terminate(code, "StartError", message[0] if message else "")
        else:
            container.record.terminate(code)
        container.process = None
        log.info("pod %s container %s: exit %d", self.key, container.record.name, code)

    def _kill_all(self) -> None:
        """SIGTERM every live container's process group at once, SIGKILL what is left after the grace period
        (kuberuntime_container.go killContainersWithSyncResult, killContainer)."""
        grace = self.stop_grace if self.stop_grace is not None else grace_period(self.pod)
        live = [c for c in self.init + self.main if c.record.state == "running"]
        for container in live:
            _signal_group(container.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.process is not None and c.process.poll() is None for c in live) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for container in live:
            _signal_group(container.process, signal.SIGKILL)
            if container.process is not None:
                container.process.wait()
            self._record_exit(container)
        for container in self.init + self.main:
            if container.record.state == "waiting" and container.record.last_terminated is None:
                container.record.terminate(
                    137, "ContainerStatusUnknown", "The container could not be located when the pod was terminated"
                )


def _signal_group(process: subprocess.Popen | None, signum: int) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
