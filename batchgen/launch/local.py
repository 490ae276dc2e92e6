"""``batchgen run`` on one machine: validate, plan, run the pending shards with N local worker processes, build
the index, print a summary.

The workers are the same ``batchgen worker`` processes a Kubernetes job runs (``torchrun`` when a worker spans
several processes), each given a disjoint set of the shards that are not finished yet. Progress comes from
storage polling (``scan_run``), the same way ``batchgen status`` sees a run, so what is shown is what is
committed. Running the same command again finds every shard finished, generates nothing and says so.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from batchgen.core import layout
from batchgen.core.config import RunConfig
from batchgen.core.errors import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    BatchgenError,
    InputError,
    NotFoundError,
)
from batchgen.core.logs import LogStream, TextSink, json_logs, log_context
from batchgen.core.plan import RunPlan, make_plan
from batchgen.core.progress import RunProgress, scan_run
from batchgen.dataset.eta import clock
from batchgen.dataset.index import FLAGGED_HINT, finalize_run, flagged_videos
from batchgen.storage import open_storage
from batchgen.storage.base import Storage
from batchgen.worker.contract import TORCHRUN, WorkerArgs, exit_code_of

log = logging.getLogger("batchgen.localrun")

STOP_GRACE_S = 60.0
"""How long workers get to finish their commit in flight after SIGTERM before they are killed."""


@dataclass
class RunOutcome:
    plan: RunPlan
    storage_uri: str
    total: int
    done: int
    failed: int
    resumed: int
    """Items already done before this invocation started."""
    generated: int
    """Items generated during this invocation."""
    seconds: float
    complete: bool
    index_rows: int | None
    flagged: int | None = None
    """Committed videos the quality gate flagged (black or frozen frames); None when the index could not be built."""
    worker_exit_codes: list[int] = field(default_factory=list)
    interrupted: int | None = None
    reused: int = 0
    """Items committed during this invocation as copies of committed videos (``worker.reuse``)."""

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return EXIT_INTERRUPTED if self.interrupted == signal.SIGINT else EXIT_TERMINATED
        broken = [c for c in self.worker_exit_codes if c not in (EXIT_OK, EXIT_INCOMPLETE)]
        if broken:
            return broken[0]
        return EXIT_OK if self.complete else EXIT_INCOMPLETE

    def summary_lines(self, storage: Storage) -> list[str]:
        rate = self.generated / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"run       {self.plan.run_id}",
            f"output    {self.storage_uri}",
            f"items     {self.total} total: {self.done} done ({self.generated} generated now, {self.reused} reused, "
            f"{self.resumed} resumed), {self.failed} failed, {self.total - self.done - self.failed} pending",
            f"time      {self.seconds:.1f} s ({rate:.2f} items/s)",
        ]
        if self.flagged is not None:
            lines.append(f"flagged   {self.flagged} of {self.done} videos ({FLAGGED_HINT})")
        if self.index_rows is not None:
            lines.append(f"index     {storage.url(layout.index_key(self.plan.run_id))} ({self.index_rows} rows)")
        if self.complete:
            lines.append(f"status    complete ({storage.url(layout.success_key(self.plan.run_id))})")
        else:
            reason = "interrupted" if self.interrupted is not None else "incomplete"
            lines.append(f"status    {reason}: run the same command again to retry what is left")
        if self.failed:
            # A folder, not an object: url() takes keys only.
            errors = storage.url(self.plan.run_id) + "/errors/"
            lines.append(f"errors    {errors} (one JSON per failed item)")
        return lines


# -- launching ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_shards(shards: Sequence[str], workers: int) -> list[list[str]]:
    """Disjoint, balanced groups (round-robin, so early shards finish first across all workers)."""
    count = max(1, min(workers, len(shards)))
    return [list(shards[i::count]) for i in range(count)]


def worker_command(
    plan: RunPlan,
    storage_uri: str,
    shards: Sequence[str],
    model_dir: str | Path,
    config: RunConfig,
    *,
    nproc: int = 1,
    degrees: tuple[int, int, int] | None = None,
    verbose: int = 0,
    metrics_port: int = 0,
) -> list[str]:
    """The command line of one local worker (``torchrun`` through batchgen.launch.k8s.torchrun when ``nproc`` > 1)."""
    if nproc > 1:
        prefix = [
            sys.executable, *TORCHRUN,
            "--nnodes=1", f"--nproc-per-node={nproc}", "--max-restarts=0",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}",
            "-m", "batchgen",
        ]  # fmt: skip
    else:
        prefix = [sys.executable, "-m", "batchgen"]
    logging_flags = ["-" + "v" * verbose] if verbose else ["-q"]
    parallel = config.parallel
    if degrees:
        ulysses, ring, cfg = degrees
        parallel = dataclasses.replace(parallel, ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg)
    worker = WorkerArgs(
        output=storage_uri, run_id=plan.run_id, shards=tuple(shards), model_dir=str(model_dir), parallel=parallel,
        max_attempts=config.worker.max_attempts, metrics_port=metrics_port,
    )  # fmt: skip
    return prefix + logging_flags + worker.argv()


# -- progress display ---------------------------------------------------------------------------------------


class ProgressDisplay:
    """One status line: items done / total, failed, resumed, rate and ETA of this invocation.

    On a terminal the line is redrawn in place; otherwise a line is written when the counts change (and at
    least every ``quiet_s`` seconds), so logs stay readable.
    """

    def __init__(self, stream: TextSink, run_id: str, resumed: int, quiet_s: float = 30.0):
        self.stream = stream
        self.run_id = run_id
        self.resumed = resumed
        self.started = time.monotonic()
        self.tty = stream.isatty()
        self.quiet_s = quiet_s
        self._last: tuple[int, int] | None = None
        self._last_at = 0.0

    def line(self, progress: RunProgress) -> str:
        elapsed = time.monotonic() - self.started
        new = max(0, progress.done - self.resumed)
        rate = new / elapsed if elapsed > 0 else 0.0
        remaining = progress.pending
        eta = clock(remaining / rate) if rate > 0 and remaining else ("-" if remaining else "0:00:00")
        return (
            f"{self.run_id}: {progress.done}/{progress.total} done ({self.resumed} resumed, {new} new), "
            f"{progress.failed} failed, {rate:.2f} items/s, ETA {eta}"
        )

    def update(self, progress: RunProgress, *, final: bool = False) -> None:
        counts = (progress.done, progress.failed)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line(progress) + ("\n" if final else ""))
        elif final or counts != self._last or now - self._last_at >= self.quiet_s:
            self.stream.write(self.line(progress) + "\n")
            self._last_at = now
        self._last = counts
        self.stream.flush()


# -- the run ------------------------------------------------------------------------------------------------


def check_parallel(plan: RunPlan, config: RunConfig, model_dir: str | Path, nproc: int):
    """Degrees for ``nproc`` processes per worker, checked against the model and every item (the plan's shapes)
    before anything starts. Returns the Topology."""
    from batchgen.core.topology import topology_for
    from batchgen.models import check_weights, uses_cfg

    spec = config.spec
    check_weights(model_dir, family=spec.family, weights=config.model.weights)
    return topology_for(
        config.parallel,
        nproc,
        num_heads=spec.num_heads(model_dir),
        use_cfg=uses_cfg(config.generation.guidance_scale),
        spec=spec,
        shapes=plan.shapes,
    )


def run_local(
    manifest: str | Path,
    output: str,
    model_dir: str | Path,
    config: RunConfig,
    *,
    workers: int = 1,
    nproc_per_worker: int = 1,
    run_name: str | None = None,
    new_run: bool = False,
    poll_s: float = 1.0,
    verbose: int = 0,
    progress_stream: TextIO | None = None,
) -> RunOutcome:
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if nproc_per_worker < 1:
        raise InputError(f"--nproc-per-worker must be >= 1, got {nproc_per_worker}")
    stream = progress_stream or (LogStream(logging.getLogger("batchgen.progress")) if json_logs() else sys.stderr)
    started = time.monotonic()
    storage = open_storage(output)
    plan = make_plan(manifest, config, storage, run_name=run_name, new_run=new_run)
    with log_context(run_id=plan.run_id):
        return _run_planned(
            plan, storage, model_dir, config, (workers, nproc_per_worker), poll_s, verbose, stream, started
        )


def _run_planned(
    plan: RunPlan,
    storage: Storage,
    model_dir: str | Path,
    config: RunConfig,
    shape: tuple[int, int],
    poll_s: float,
    verbose: int,
    stream: TextSink,
    started: float,
) -> RunOutcome:
    """The rest of ``run_local`` once the run is planned: its pending shards, the index, the outcome. ``shape``:
    (workers, processes per worker)."""
    topology = check_parallel(plan, config, model_dir, shape[1])
    before = scan_run(storage, plan)
    reused_before = _index_counts(storage, plan)[1] if before.done else 0
    codes: list[int] = []
    interrupted: int | None = None
    if not before.unfinished_shards:
        log.info("nothing to generate: all %d items of %s are already done", plan.row_count, plan.run_id)
    else:
        display = ProgressDisplay(stream, plan.run_id, before.done)
        commands = _worker_commands(plan, storage, model_dir, config, topology, before, shape, verbose)
        codes, interrupted = _supervise(commands, lambda: scan_run(storage, plan), display, poll_s)

    index_rows: int | None = None
    reused, complete = 0, False
    try:
        complete = finalize_run(storage, plan)
        index_rows, reused = _index_counts(storage, plan)
    except BatchgenError:
        if not codes or all(c in (EXIT_OK, EXIT_INCOMPLETE) for c in codes):
            raise
        log.exception("could not build the index after a worker failure")
    after = scan_run(storage, plan)
    return RunOutcome(
        plan=plan,
        storage_uri=storage.uri,
        total=after.total,
        done=after.done,
        failed=after.failed,
        resumed=before.done,
        generated=max(0, after.done - before.done - (reused - reused_before)),
        reused=max(0, reused - reused_before),
        seconds=time.monotonic() - started,
        complete=complete,
        index_rows=index_rows,
        flagged=flagged_videos(storage, plan, after) if index_rows is not None else None,
        worker_exit_codes=codes,
        interrupted=interrupted,
    )


def _worker_commands(
    plan, storage, model_dir, config, topology, before: RunProgress, shape, verbose
) -> list[list[str]]:
    """One command per worker, each given a disjoint group of the unfinished shards."""
    workers, nproc_per_worker = shape
    groups = split_shards(before.unfinished_shards, workers)
    log.info(
        "%s: %d of %d items done; %d shard(s) to process with %d worker(s) of %d process(es) (%s)",
        plan.run_id,
        before.done,
        plan.row_count,
        len(before.unfinished_shards),
        len(groups),
        nproc_per_worker,
        topology.describe(),
    )
    degrees = (topology.ulysses, topology.ring, topology.cfg)
    # Worker i serves on base + i * nproc, its ranks on that + LOCAL_RANK: no two processes share a port.
    base_port = config.worker.metrics_port
    return [
        worker_command(
            plan, storage.uri, group, model_dir, config, nproc=nproc_per_worker, degrees=degrees, verbose=verbose,
            metrics_port=base_port + index * nproc_per_worker if base_port else 0,
        )
        for index, group in enumerate(groups)
    ]  # fmt: skip


def _index_counts(storage: Storage, plan: RunPlan) -> tuple[int, int]:
    """(rows, rows that are copies of committed videos) of the run's index; (0, 0) when it has none yet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data = storage.get_bytes(layout.index_key(plan.run_id))
    except NotFoundError:
        return 0, 0
    index = pq.ParquetFile(pa.BufferReader(data))
    if "reused_from_run_id" not in index.schema_arrow.names:  # built before reuse existed
        return index.metadata.num_rows, 0
    column = index.read(columns=["reused_from_run_id"]).column(0)
    return len(column), len(column) - column.null_count


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""SIGHUP too: a closed terminal or SSH session must stop the workers, not orphan them."""


def _die_with_parent(parent_pid: int):
    """A ``preexec_fn``: the worker gets SIGTERM (a graceful stop) when this process dies, even by kill -9.

    The workers run in their own session (so a terminal's Ctrl-C reaches only us), which also takes them out of
    any process group a killer would signal; the kernel's parent-death signal is what ties them to us on Linux.
    """

    # Resolved before the fork: the child of a threaded parent should only call what needs no lock.
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def set_death_signal() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def _supervise(commands, poll, display: ProgressDisplay, poll_s: float) -> tuple[list[int], int | None]:
    """Start every worker, show progress until all exit; forward SIGTERM/SIGINT/SIGHUP. Returns (exit codes, signal).

    If polling storage for progress fails for good, the workers are stopped the same graceful way (SIGTERM: they
    finish the commit in flight and exit 143) and the poll's error is raised once they have exited.
    """
    received: list[int] = []
    poll_error: BatchgenError | None = None

    def on_signal(signum, _frame):
        if not received:
            log.warning(
                "received %s: stopping the workers (they finish the commit in flight)", signal.Signals(signum).name
            )
        received.append(signum)
        _stop(procs)

    procs: list[subprocess.Popen] = []
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        for index, command in enumerate(commands):
            log.debug("worker %d: %s", index, " ".join(command))
            procs.append(
                subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
            )
        stop_deadline: float | None = None
        while any(p.poll() is None for p in procs):
            time.sleep(poll_s)
            if (received or poll_error) and stop_deadline is None:
                stop_deadline = time.monotonic() + STOP_GRACE_S
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                for proc in procs:
                    if proc.poll() is None:
                        log.error("worker pid %d did not stop in %.0f s: killing it", proc.pid, STOP_GRACE_S)
                        proc.kill()
            if poll_error is None:
                poll_error = _show_progress(display, poll, procs)
        if poll_error is None:
            display.update(poll(), final=True)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for sig, old in previous.items():
            signal.signal(sig, old)
    codes = [exit_code_of(p.returncode) for p in procs]
    for index, (proc, code) in enumerate(zip(procs, codes, strict=True)):
        if code not in (EXIT_OK, EXIT_INCOMPLETE):
            how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with code {code}"
            log.error("worker %d (pid %d) %s", index, proc.pid, how)
    if poll_error is not None:
        raise poll_error
    return codes, (received[0] if received else None)


def _show_progress(display: ProgressDisplay, poll, procs: list[subprocess.Popen]) -> BatchgenError | None:
    try:
        display.update(poll())
    except BatchgenError as e:
        log.error("reading the run's progress failed (%s): stopping the workers (SIGTERM)", e)
        _stop(procs)
        return e
    return None
