"""The real control plane (tools/kube/controlplane.py, the code `make kube-up` runs) as a session fixture.

`make test-kube` sets BATCHGEN_KUBE_TESTS=required: then nothing here may skip, and a missing binary fails.
`make test` leaves them out (they take longer than the rest of the suite); a plain `pytest` runs them where the
binaries are built and otherwise skips them with one line saying why (no Go needed). .ci/run builds the binaries
and runs `make test`, then `make test-kube`.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchgen.storage import open_storage
from tools.kube import controlplane, kubebin

ROOT = Path(__file__).resolve().parents[2]

RESTRICTED = "restricted"
WORKER_NODES = ("worker-node-0", "worker-node-1")
REQUIRED = os.environ.get("BATCHGEN_KUBE_TESTS") == "required"


def unavailable_reason() -> str | None:
    if not shutil.which(kubebin.GO):
        return f"real control plane: Go not found ({kubebin.GO}); install Go 1.26 and run make kube-bin"
    missing = [name for comp in kubebin.COMPONENTS if comp.required for name in kubebin.missing_binaries(comp)]
    if missing:
        return f"real control plane: not built ({', '.join(missing)}); run make kube-bin"
    return None


def skip_module_unless_available() -> None:
    """Called at the top of each test module: one skip line for all of them (same place, same reason)."""
    if REQUIRED:
        return
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> Iterator[controlplane.ControlPlane]:
    reason = unavailable_reason()
    if reason:
        pytest.fail(f"{reason} (BATCHGEN_KUBE_TESTS=required: these must run)")
    # No node agents: these tests check what the API server admits, nothing here needs a pod to run.
    plane = controlplane.ControlPlane(tmp_path_factory.mktemp("kube"), nodes=0)
    plane.start()
    yield plane
    plane.stop()


def restricted_namespace(plane: controlplane.ControlPlane, name: str) -> str:
    """A namespace whose Pod Security level is restricted for enforce, warn and audit (warn makes the API server
    report a Job's non-compliant pod template at apply time; enforce alone only refuses pods)."""
    labels = "".join(f"    pod-security.kubernetes.io/{mode}: {RESTRICTED}\n" for mode in ("enforce", "warn", "audit"))
    manifest = f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n{labels}"
    plane.kubectl("apply", "--server-side", "--field-manager=batchgen-tests", "-f", "-", stdin=manifest)
    return name


@pytest.fixture
def namespace(control_plane) -> Iterator[str]:
    name = restricted_namespace(control_plane, f"t-{uuid.uuid4().hex[:8]}")
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def worker_nodes(control_plane):
    """The session's control plane plus two node agents with 2 GPUs each (removed again after this module)."""
    if os.geteuid() != 0:
        why = "the node agent needs root (a private mount namespace per pod)"
        if os.environ.get("CI") == "true" or REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    for name in WORKER_NODES:
        control_plane.add_node(name, "--cpu", "16", "--memory", "64Gi", "--gpus", "2", "--shutdown-grace", "5")
    try:
        control_plane.wait_nodes_ready()
        yield control_plane
    finally:
        for name in WORKER_NODES:
            control_plane.remove_node(name)


@pytest.fixture(scope="session")
def weights(s3_server, s3_client, tiny_model_dir) -> dict[str, str]:
    """s3:// prefixes: the tiny model, a prefix holding no model (only a stray file), and an empty one."""
    bucket = "realk8s-weights"
    s3_client.create_bucket(Bucket=bucket)
    storage = open_storage(f"s3://{bucket}/tiny")
    for path in sorted(tiny_model_dir.rglob("*")):
        if path.is_file():
            storage.put_file(path.relative_to(tiny_model_dir).as_posix(), path)
    open_storage(f"s3://{bucket}/not-a-model").put_bytes("README.txt", b"no weights here\n")
    return {"tiny": f"s3://{bucket}/tiny", "not-a-model": f"s3://{bucket}/not-a-model", "empty": f"s3://{bucket}/none"}


def container_logs(plane: controlplane.ControlPlane, namespace: str, tail_chars: int = 1500) -> str:
    """The worker nodes' container logs of ``namespace``'s pods (what `kubectl logs` would show), for failures."""
    parts = []
    for node in WORKER_NODES:
        for log in sorted((plane.root / node / "root" / "logs").glob(f"{namespace}_*/*/*.log")):
            parts.append(f"--- {log.relative_to(plane.root)}\n{log.read_text(errors='replace')[-tail_chars:]}")
    return "\n".join(parts)


def s3_objects(s3_client, uri: str) -> dict[str, tuple[str, object]]:
    """key -> (ETag, LastModified) of every object under the s3:// ``uri``: an object written again changes both."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


def wait_for(what: str, check, timeout_s: float, explain=str, process=None):
    """``check()``'s first truthy value, polled every half second. Fails naming ``what`` (and ``explain()``) after
    ``timeout_s``, or at once when ``process`` (a subprocess.Popen the wait depends on) has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.args[3:5]} exited {process.returncode} while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout_s:.0f} s\n{explain()}")


class Poller:
    """Calls ``tick()`` every ``interval_s`` in a thread for as long as the ``with`` block runs."""

    interval_s = 0.3

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
