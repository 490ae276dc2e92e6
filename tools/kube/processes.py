"""Local processes the control plane runs: each one's command, log and PID file live in its own folder, and each is
stopped by that PID (after checking that the PID still runs the same program), never by name."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

LOG_TAIL_CHARS = 3000


class StartupError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log.exists() else "(no log)"


class Process:
    """One component: ``folder/<name>.log`` holds its output, ``folder/pid.json`` its PID and command."""

    def __init__(self, name: str, folder: Path):
        self.name = name
        self.folder = folder
        self.log = folder / f"{name}.log"
        self.pid_file = folder / "pid.json"

    def start(self, argv: list[str], env: dict[str, str] | None = None, launcher: list[str] = ()) -> Process:
        """``launcher`` runs first and must exec ``argv`` in the same process (the PID file names ``argv``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            # Its own session: a Ctrl-C in the shell that ran `make kube-up` does not reach it.
            proc = subprocess.Popen(
                [*launcher, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.folder,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.pid_file.write_text(json.dumps({"pid": proc.pid, "argv": argv}))
        self._popen = proc
        return self

    def running_pid(self) -> int | None:
        """The recorded PID while it still runs the recorded program (a reused PID is not ours)."""
        popen = getattr(self, "_popen", None)
        if popen is not None:  # started by this process: its own handle knows
            return popen.pid if popen.poll() is None else None
        if not self.pid_file.exists():
            return None
        record = json.loads(self.pid_file.read_text())
        argv = record["argv"]
        # A script started through its #! line shows its interpreter first: compare the tail.
        return record["pid"] if _cmdline(record["pid"])[-len(argv) :] == argv else None

    def stop(self, grace_s: float = 10.0) -> None:
        pid = self.running_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.running_pid() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.running_pid() is not None:
                os.kill(pid, signal.SIGKILL)
            popen = getattr(self, "_popen", None)
            if popen is not None:
                popen.wait()
        self.pid_file.unlink(missing_ok=True)

    def wait_until(self, check: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.running_pid() is None:
                raise StartupError(f"{self.name} exited before {what}; last of {self.log}:\n{log_tail(self.log)}")
            if check():
                return
            time.sleep(0.2)
        raise StartupError(f"{self.name}: no {what} after {timeout_s:.0f} s; last of {self.log}:\n{log_tail(self.log)}")


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def tls_context(ca: Path, client_cert: Path | None = None, client_key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(client_key))
    return context


def tls_listening(port: int, ca: Path) -> bool:
    """A webhook server is ready when it completes a TLS handshake with the certificate our CA signed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with tls_context(ca).wrap_socket(raw, server_hostname="127.0.0.1"):
                return True
    except (OSError, ssl.SSLError):
        return False
