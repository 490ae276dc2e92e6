"""Exceptions and the process exit codes they map to.

Exit codes are split so Kubeflow's ``restartPolicy: ExitCode`` does the right thing: codes 1-127 are
permanent (bad input, missing permissions; retrying cannot help), codes >= 128 are retryable (signals,
preemption, storage outages that outlasted our own retries).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected internal error
EXIT_BAD_INPUT = 2  # invalid manifest, config, CLI usage or model directory
EXIT_STORAGE = 3  # permanent storage error: access denied, missing bucket, bad request
EXIT_CONFLICT = 4  # the output already holds a run planned from different inputs
EXIT_INCOMPLETE = 5  # the run finished but some items failed permanently
EXIT_PARALLEL = 6  # a parallel topology that does not fit the model, the items or the world size
EXIT_CLUSTER = 7  # permanent Kubernetes API error (403 RBAC, 422 rejected, CRD missing)
EXIT_VERIFY = 8  # batchgen verify found damaged, missing or stray objects, or an index/marker that disagrees
EXIT_INTERRUPTED = 130  # SIGINT
EXIT_TERMINATED = 143  # SIGTERM (preemption): retryable
EXIT_TRANSIENT = 200  # transient error (storage or cluster) that outlasted the retries: retryable

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILURE: "unexpected internal error",
    EXIT_BAD_INPUT: "invalid input: manifest, config, arguments or model directory",
    EXIT_STORAGE: "permanent storage error (access denied, missing bucket, bad request)",
    EXIT_CONFLICT: "output already holds a run planned from different inputs (or another export)",
    EXIT_INCOMPLETE: "run finished with permanently failed items",
    EXIT_PARALLEL: "parallel degrees do not fit the model, items or world size",
    EXIT_CLUSTER: "permanent Kubernetes API error (RBAC, rejected object, CRD missing)",
    EXIT_VERIFY: "verify found damaged, missing or stray objects, or an index that disagrees",
    EXIT_INTERRUPTED: "interrupted (SIGINT)",
    EXIT_TERMINATED: "terminated (SIGTERM), safe to rerun",
    EXIT_TRANSIENT: "transient error outlasted retries, safe to rerun",
}


class BatchgenError(Exception):
    """Base class: carries the exit code the CLI returns for it."""

    exit_code = EXIT_FAILURE


class InputError(BatchgenError):
    """Bad user input (config, arguments, model directory)."""

    exit_code = EXIT_BAD_INPUT


class ManifestError(InputError):
    """A manifest failed validation; ``problems`` lists every problem found (capped)."""

    def __init__(self, path: str, problems: list[str], truncated: int = 0):
        self.path = path
        self.problems = problems
        self.truncated = truncated
        lines = [f"{path}: {len(problems) + truncated} problem(s)"] + [f"  {p}" for p in problems]
        if truncated:
            lines.append(f"  ... and {truncated} more")
        super().__init__("\n".join(lines))


class ConfigError(InputError):
    """A configuration value is invalid; the message names the key."""


class PlanConflictError(BatchgenError):
    """The output already holds a run of the same name planned from different inputs."""

    exit_code = EXIT_CONFLICT


class ModelMismatchError(PlanConflictError):
    """The run's videos were made with other weights than this worker's: one dataset, one model."""


class StorageError(BatchgenError):
    """Permanent storage error; the message names the URI and key."""

    exit_code = EXIT_STORAGE


class TransientStorageError(StorageError):
    """A retryable storage error that outlasted the retry budget."""

    exit_code = EXIT_TRANSIENT


class NotFoundError(StorageError):
    """The object does not exist."""


class AlreadyExistsError(StorageError):
    """A conditional create lost: the object already exists."""


class ChangedError(StorageError):
    """A conditional replace lost: the object is no longer the version the writer read (or is gone)."""


class TopologyError(BatchgenError):
    """Parallel degrees that cannot work; the message lists degrees that would."""

    exit_code = EXIT_PARALLEL


class ClusterError(BatchgenError):
    """Permanent Kubernetes API error."""

    exit_code = EXIT_CLUSTER


class TransientClusterError(ClusterError):
    exit_code = EXIT_TRANSIENT


class IncompleteRunError(BatchgenError):
    exit_code = EXIT_INCOMPLETE
