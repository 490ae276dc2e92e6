"""Which job kind launches a run: ``--launcher trainjob``, ``pytorchjob``, or ``auto`` (ask the API server which it
serves, preferring TrainJob)."""

from __future__ import annotations

import logging
from typing import Any

from tenacity import Retrying as _Retrying
from tenacity import retry_if_exception, stop_after_attempt, wait_exponential

from batchgen.core.errors import ClusterError, TransientClusterError
from batchgen.launch.k8s.client import CustomObjectBackend, _is_retryable, _retrying_after, _short
from batchgen.launch.k8s.pytorchjob import PyTorchJobBackend
from batchgen.launch.k8s.settings import LAUNCHERS
from batchgen.launch.k8s.trainjob import TrainJobBackend

log = logging.getLogger("batchgen.k8s.backend")


BACKENDS: dict[str, type[CustomObjectBackend]] = {"trainjob": TrainJobBackend, "pytorchjob": PyTorchJobBackend}


def served_launchers(api_client: Any) -> list[str]:
    """The launchers whose kind the API server serves, from discovery (``/apis/<group>/<version>``), which every
    authenticated identity may read (the ``system:discovery`` ClusterRole): no Role rule is needed."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(api_client)
    served = []
    for launcher, backend in BACKENDS.items():
        try:
            resources = _discover(api, backend.group, backend.version)
        except ApiException as e:
            if e.status == 404:
                continue
            error = TransientClusterError if _is_retryable(e) else ClusterError
            raise error(f"discovery of {backend.group}/{backend.version} failed: {_short(e)}") from e
        if any(r.name == backend.plural for r in resources.resources or []):
            served.append(launcher)
    return served


def _discover(api: Any, group: str, version: str, attempts: int = 5) -> Any:
    """One discovery read, retried like every other call: a 503 or 429 while the API server is busy must not
    decide the launcher (or end the run)."""
    retrying = _Retrying(
        retry=retry_if_exception(_is_retryable),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.2, max=10.0),
        reraise=True,
        before_sleep=lambda state: _retrying_after("discover", f"{group}/{version}", state),
    )
    return retrying(api.get_api_resources, group, version)


def make_backend(launcher: str, namespace: str, api_client: Any) -> CustomObjectBackend:
    """The backend for ``launcher``; ``auto`` asks the API server and prefers TrainJob over PyTorchJob."""
    if launcher not in LAUNCHERS:
        raise ClusterError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if launcher == "auto":
        served = served_launchers(api_client)
        if not served:
            raise ClusterError(
                "this cluster serves neither TrainJob (trainer.kubeflow.org/v1alpha1, Kubeflow Trainer v2) nor "
                "PyTorchJob (kubeflow.org/v1, training operator v1.9): install one of them"
            )
        launcher = served[0]
        log.info("launcher auto: using %s (served: %s)", launcher, ", ".join(served))
    return BACKENDS[launcher](namespace, api_client)
