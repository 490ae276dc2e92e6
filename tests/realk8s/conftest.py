"""The real control plane (tools/kube/controlplane.py, the code `make kube-up` runs) as a session fixture.

`make test-kube` sets BATCHGEN_KUBE_TESTS=required: then nothing here may skip, and a missing binary fails.
Under plain `make test` these tests run where the binaries are built and otherwise skip with one line saying why
(no Go needed); .ci/run builds the binaries and runs `make test` with BATCHGEN_KUBE_TESTS=required.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.kube import controlplane, kubebin

ROOT = Path(__file__).resolve().parents[2]

RESTRICTED = "restricted"
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
