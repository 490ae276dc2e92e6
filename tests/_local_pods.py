"""What the fake operator (PyTorchJob) and the fake trainer (TrainJob) share: pods as local process trees.

A kubelet runs a pod's containers with their ``env`` (``secretKeyRef`` resolved from Secrets, a missing one being
CreateContainerConfigError: kubernetes ``pkg/kubelet/kubelet_pods.go`` ``makeEnvironmentVariables``) and its
volumes mounted; here each container is a local process in its own session (so a kill reaches torchrun's
children), image paths are mapped to local ones through ``path_map`` and ``python`` is this interpreter. The
controller loop polls the API emulator every ``poll_s``; errors surface to the test through ``errors``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubernetes import client, config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalPodController:
    """Base of the fake controllers: API access under its own identity, the loop, and container processes."""

    name = "fake controller"

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        workdir: Path,
        *,
        token: str,
        path_map: dict[str, str] | None = None,
        secrets: dict[str, dict[str, str]] | None = None,
        base_env: dict[str, str] | None = None,
        poll_s: float = 0.2,
    ):
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        # Its own identity, so the emulator's record of the controller's calls holds only the controller's.
        configuration.api_key = {"BearerToken": f"Bearer {token}"}
        configuration.refresh_api_key_hook = None  # it would put the kubeconfig's token back
        self.api = client.CustomObjectsApi(client.ApiClient(configuration))
        self.namespace = namespace
        self.workdir = workdir
        self.path_map = dict(path_map or {})
        self.secrets = secrets or {}
        self.base_env = base_env or {}
        self.poll_s = poll_s
        self.started_jobs: list[str] = []
        """Names of every job that got pods, in order (one entry per uid)."""
        self.errors: list[BaseException] = []
        self.peak_running = 0
        """Most jobs with live pods at once (the controller's --max-jobs bound)."""
        self._log = logging.getLogger(f"tests.{self.name.replace(' ', '_')}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for process in self._processes():
            kill_process_tree(process)

    def _processes(self) -> Iterator[subprocess.Popen]:
        """Every container process started so far (stopped ones included)."""
        raise NotImplementedError

    def _tick(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as e:  # surfaced by the test through .errors
                self._log.exception("%s error", self.name)
                self.errors.append(e)
            self._stop.wait(self.poll_s)

    # -- containers ------------------------------------------------------------------------------------------

    def map_path(self, value: str) -> str:
        for image_path, local_path in self.path_map.items():
            if value == image_path or value.startswith(image_path + "/"):
                return local_path + value[len(image_path) :]
        return value

    def container_env(self, container: dict[str, Any]) -> dict[str, str]:
        env = dict(self.base_env)
        for entry in container.get("env") or []:
            if "value" in entry:
                env[entry["name"]] = self.map_path(str(entry["value"]))
            elif "secretKeyRef" in (entry.get("valueFrom") or {}):
                ref = entry["valueFrom"]["secretKeyRef"]
                try:
                    env[entry["name"]] = self.secrets[ref["name"]][ref["key"]]
                except KeyError:
                    raise RuntimeError(
                        f"secret {ref['name']}/{ref['key']} not found (CreateContainerConfigError)"
                    ) from None
        return env

    def container_argv(self, argv: list[str]) -> list[str]:
        argv = [self.map_path(a) for a in argv]
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        return argv

    def mount_volumes(self, containers: list[dict[str, Any]]) -> None:
        for mount in [m for c in containers for m in c.get("volumeMounts") or []]:
            local = self.map_path(mount["mountPath"])
            if local != mount["mountPath"]:
                Path(local).mkdir(parents=True, exist_ok=True)

    def log_path(self, pod_name: str) -> Path:
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        return log_dir / f"{pod_name}.log"

    def spawn(self, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
            )


def kill_process_tree(process: subprocess.Popen | None) -> None:
    """SIGTERM the container's session, SIGKILL after 10 s (the pod's grace period, shortened)."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
