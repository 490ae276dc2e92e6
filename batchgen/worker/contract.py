"""What every launcher agrees on with the worker: its command line, the shard selection and the exit codes.

``batchgen run`` (local processes), the PyTorchJob launcher and the TrainJob launcher all start the same
``batchgen worker`` through this module, so a flag added here reaches every launcher, and the split between
permanent and retryable exit codes is stated once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from batchgen.core.config import ParallelConfig, setting_argv
from batchgen.core.layout import shard_index

PERMANENT_EXIT_CODES = range(1, 128)
"""A worker (or the weights fetch) exiting 1-127 failed for a reason a retry cannot fix: bad input, RBAC, a
missing object. The launchers fail the job at once on these."""

TORCHRUN = ("-m", "batchgen.launch.k8s.torchrun")
"""torchrun, but exiting with the failing rank's own code (plain torchrun exits 1 for every child failure)."""


@dataclass(frozen=True)
class WorkerArgs:
    """The launcher-neutral part of a worker's command line."""

    output: str
    run_id: str
    shards: tuple[str, ...]
    model_dir: str
    parallel: ParallelConfig
    """Degrees as checked by the launcher, and the speed options: passed as the flags that differ from the
    defaults (``config.setting_argv``), so a setting added to ``ParallelConfig`` reaches every launcher."""
    max_attempts: int | None = None
    """Attempts per item; None keeps the worker's own default."""
    metrics_port: int | None = None
    """Prometheus port of the worker's first rank; None leaves it to BATCHGEN_METRICS_PORT and the config."""

    def argv(self) -> list[str]:
        """``worker ...``: what follows ``python -m batchgen`` (or torchrun's ``-m batchgen``)."""
        args = [
            "worker",
            "--output", self.output,
            "--run-id", self.run_id,
            "--shards", shard_selection(self.shards),
            "--model-dir", self.model_dir,
            *setting_argv(self.parallel),
        ]  # fmt: skip
        if self.max_attempts is not None:
            args += ["--max-attempts", str(self.max_attempts)]
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port)]
        return args


def shard_selection(shards: Sequence[str]) -> str:
    """The worker's ``--shards`` text: "A:B" (half-open) for a contiguous range, else "i,j,k"."""
    indices = sorted(shard_index(s) for s in shards)
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}:{indices[-1] + 1}"
    return ",".join(str(i) for i in indices)


def exit_code_of(returncode: int) -> int:
    """A child's return code as a shell reports it: killed by signal N (negative N) -> 128 + N, retryable."""
    return 128 - returncode if returncode < 0 else returncode


def is_permanent(exit_code: int) -> bool:
    return exit_code in PERMANENT_EXIT_CODES
