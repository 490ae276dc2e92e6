"""The worker loop: for each shard it is given, find what is already done, generate the rest, commit each
item (video, then sidecar), and write the shard's stats last.

Everything durable is an object in storage; nothing is remembered between runs. Per shard:

1. Scan (rank 0 only, then broadcast so every rank agrees): the shard's items from the plan, one listing of
   ``meta/<shard>/`` (the done set), one of ``errors/<shard>/``, and one of ``videos/<shard>/`` only when
   some item is not done (orphan videos can only belong to items without a sidecar).
2. Orphans (a video without a sidecar: a crash between the two writes) are adopted: probed, hashed and
   given a sidecar with ``"adopted": true``; an undecodable one is deleted and its item generated again.
3. Pending items are dealt round-robin to data-parallel groups; ``generator.prepare`` runs once per shard.
4. Per item, the group's writer rank encodes the MP4 and commits it (``Committer.commit``). Any exception in
   generation or encoding is an item failure: retried up to ``worker.max_attempts`` times, then recorded
   in ``errors/<shard>/<id>.json``; it never stops the shard. Storage errors that outlast the backend's own
   retries are not item failures: the worker stops with the storage error's exit code.
5. The shard's index part (``index/parts/<shard>-<digest>.parquet``, from the sidecars this process wrote and reads
   of the others), then ``stats/<shard>.json`` last (a cache of the shard's counts, never trusted for progress).

Ranks of a torchrun job stay in lockstep: every round of items ends with ``context.all_true`` on the
outcome, so a failure on one rank is retried (or recorded) by its whole group, and a rank whose collectives
broke fails the process with a message naming it instead of leaving the others waiting.

The commit itself (video, sidecar, adoption, the weights' pin, error records, stats) is ``worker.commit``; the
crash test hook is ``worker.faults``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from batchgen.core import layout, metrics
from batchgen.core.errors import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_TRANSIENT,
    BatchgenError,
    InputError,
    ModelMismatchError,
    StorageError,
)
from batchgen.core.item import Item
from batchgen.core.logs import log_context
from batchgen.core.plan import RunPlan, load_shard_items
from batchgen.core.progress import ids_under
from batchgen.core.reuse import Source, load_shard_sources
from batchgen.models.api import VideoGenerator
from batchgen.storage.base import Storage
from batchgen.worker.commit import Committer, describe
from batchgen.worker.context import ProcessContext
from batchgen.worker.faults import fault
from batchgen.worker.reuse import commit_copy

log = logging.getLogger("batchgen.worker")

ATTEMPT_ENV = "BATCHGEN_ATTEMPT"
"""Set by launchers: how many times this worker's job was launched before (0 for the first launch)."""


class WorkerInterrupted(BaseException):
    """Raised by the signal handler to abandon an item mid-generation (nothing of it was written).

    A BaseException, so the per-item ``except Exception`` that records item failures does not swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class GroupFailure(BatchgenError):
    """A rank's collectives failed (another rank probably died): the job cannot continue here, but a
    relaunch can, so the exit code is retryable."""

    exit_code = EXIT_TRANSIENT


class PeerError(BatchgenError):
    """Another rank hit a permanent error (it logs the details); this rank stops too."""


# -- results ------------------------------------------------------------------------------------------------


@dataclass
class ShardResult:
    shard: str
    total: int
    resumed: int = 0
    """Items already done when the shard was scanned."""
    adopted: int = 0
    """Orphan videos adopted by this worker."""
    reused: int = 0
    """Items this worker committed as copies of committed videos (``worker.reuse``)."""
    generated: int = 0
    """Items this worker's group(s) generated and committed (or found committed by a concurrent worker)."""
    failed: int = 0
    """Items recorded in errors/ by this worker after exhausting their attempts."""
    seconds: float = 0.0
    finished: bool = False
    """The shard was processed to the end and its stats written."""


@dataclass
class WorkerSummary:
    shards: list[ShardResult] = field(default_factory=list)
    interrupted: int | None = None
    """Signal number that stopped the worker, if any."""

    def _sum(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.shards)

    @property
    def generated(self) -> int:
        return self._sum("generated")

    @property
    def resumed(self) -> int:
        return self._sum("resumed")

    @property
    def adopted(self) -> int:
        return self._sum("adopted")

    @property
    def reused(self) -> int:
        return self._sum("reused")

    @property
    def failed(self) -> int:
        return self._sum("failed")

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return EXIT_INTERRUPTED if self.interrupted == signal.SIGINT else EXIT_TERMINATED
        return EXIT_INCOMPLETE if self.failed else EXIT_OK


# -- stopping -----------------------------------------------------------------------------------------------


class StopRequest(threading.Event):
    """A stop event that SIGTERM/SIGINT set.

    Between items the worker checks it and stops. While an item is being generated (nothing written yet) the
    handler also raises ``WorkerInterrupted`` so the item is abandoned at once instead of running for minutes
    past a preemption notice; during a commit it only sets the event, so the commit's few puts finish.
    """

    def __init__(self) -> None:
        super().__init__()
        self.signum: int | None = None
        self._abandonable = False

    def request(self, signum: int) -> None:
        self.signum = signum
        self.set()
        if self._abandonable:
            self._abandonable = False
            raise WorkerInterrupted(signum)

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        if self.is_set():
            raise WorkerInterrupted(self.signum or signal.SIGTERM)
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False

    @contextmanager
    def handling_signals(self) -> Iterator[StopRequest]:
        """Route SIGTERM and SIGINT to ``request`` (main thread only), restoring the old handlers after."""

        def handler(signum, _frame):
            log.warning("received %s: stopping after the current commit", signal.Signals(signum).name)
            self.request(signum)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


@contextmanager
def _abandonable(stop: threading.Event) -> Iterator[None]:
    if isinstance(stop, StopRequest):
        with stop.abandonable():
            yield
    else:
        yield


def _stop_signal(stop: threading.Event) -> int:
    return getattr(stop, "signum", None) or signal.SIGTERM


# -- helpers ------------------------------------------------------------------------------------------------


def _launch_attempt() -> int:
    value = os.environ.get(ATTEMPT_ENV, "0") or "0"
    try:
        attempt = int(value)
    except ValueError:
        raise InputError(f"{ATTEMPT_ENV}={value!r} must be a non-negative integer") from None
    if attempt < 0:
        raise InputError(f"{ATTEMPT_ENV}={value!r} must be a non-negative integer")
    return attempt


# -- scan ---------------------------------------------------------------------------------------------------


@dataclass
class ShardScan:
    """Rank 0's view of a shard, broadcast to every rank so all agree on the work list."""

    shard: str
    items: list[Item]
    done: set[str]
    errored: set[str]
    orphans: set[str]
    stats_exists: bool
    adopted: set[str] = field(default_factory=set)
    """Orphans rank 0 adopted before broadcasting (also in ``done``)."""
    sources: dict[str, Source] = field(default_factory=dict)
    """Items the plan copies from committed videos (``plan/reuse/<shard>.parquet``), by id."""
    copied: set[str] = field(default_factory=set)
    """Items rank 0 committed as copies (also in ``done``)."""

    @property
    def pending(self) -> list[Item]:
        return [item for item in self.items if item.id not in self.done]


def scan_shard(storage: Storage, run_id: str, shard: str, *, reuse: bool = False) -> ShardScan:
    """The shard's items and which are done, from listings (never a request per item); with ``reuse``, also the
    items to copy."""
    items = load_shard_items(storage, run_id, shard)
    ids = {item.id for item in items}
    done = ids_under(storage, layout.sidecars_prefix(run_id, shard), ".json", ids, by_ranges=True)
    # errors/ is empty in the common case: one plain listing, not one per key range.
    errored = ids_under(storage, layout.errors_prefix(run_id, shard), ".json", ids, by_ranges=False)
    orphans: set[str] = set()
    if done != ids:
        orphans = ids_under(storage, layout.videos_prefix(run_id, shard), ".mp4", ids, by_ranges=True) - done
    stats_exists = storage.head(layout.stats_key(run_id, shard)) is not None if done == ids else False
    sources = load_shard_sources(storage, run_id, shard) if reuse and done != ids else {}
    return ShardScan(shard, items, done, errored, orphans, stats_exists, sources=sources)


# -- the loop -----------------------------------------------------------------------------------------------

_OK, _ITEM_FAILED, _FATAL = "ok", "item_failed", "fatal"


def run_worker(
    storage: Storage,
    plan: RunPlan,
    shards: list[str],
    generator: VideoGenerator,
    context: ProcessContext,
    *,
    stop: threading.Event | None = None,
) -> WorkerSummary:
    """Process ``shards`` of ``plan`` (every rank of the job calls this with the same arguments)."""
    known = set(plan.shards)
    unknown = [s for s in shards if s not in known]
    if unknown:
        raise InputError(f"run {plan.run_id} has no shard(s) {unknown[:5]} (it has {len(plan.shards)})")
    loop = _WorkerLoop(storage, plan, generator, context, stop or threading.Event())
    summary = WorkerSummary()
    try:
        for shard in shards:
            if not loop.keep_going():
                break
            with log_context(shard=shard):
                summary.shards.append(loop.run_shard(shard))
    except WorkerInterrupted as e:
        summary.interrupted = e.signum
        log.warning("rank %d: abandoned the item in progress (nothing of it was written)", context.rank)
    if summary.interrupted is None and loop.stop.is_set():
        summary.interrupted = _stop_signal(loop.stop)
    return summary


class _WorkerLoop:
    def __init__(
        self,
        storage: Storage,
        plan: RunPlan,
        generator: VideoGenerator,
        context: ProcessContext,
        stop: threading.Event,
    ) -> None:
        self.storage = storage
        self.plan = plan
        self.generator = generator
        self.ctx = context
        self.stop = stop
        self.max_attempts = plan.config.worker.max_attempts
        self.committer = Committer(
            storage, plan, model_identity=getattr(generator, "model_identity", None), rank=context.rank,
            world_size=context.world_size, dp_size=context.dp_size, launch_attempt=_launch_attempt(),
        )  # fmt: skip

    # -- agreement across ranks ------------------------------------------------------------------------

    def _all_true(self, flag: bool, what: str) -> bool:
        try:
            return self.ctx.all_true(flag)
        except Exception as e:
            raise GroupFailure(
                f"rank {self.ctx.rank}: collective failed while agreeing on {what} ({describe(e)}); another "
                "rank probably crashed or failed inside a collective, so this process exits too"
            ) from e

    def keep_going(self) -> bool:
        return self._all_true(not self.stop.is_set(), "whether to stop")

    def _resolve(self, status: str, error: BaseException | None, what: str) -> list[bool]:
        """Agree on a round's outcome. Returns, per data-parallel group, whether it succeeded.

        One collective in the common case (everyone fine); on failure a second one checks for permanent
        errors (every rank then stops) and one per group tells every rank which groups must retry.
        """
        groups = self.ctx.dp_size
        if self._all_true(status == _OK, what):
            return [True] * groups
        if not self._all_true(status != _FATAL, what):
            if status == _FATAL and error is not None:
                raise error
            raise PeerError(f"rank {self.ctx.rank}: another rank hit a permanent error during {what}; stopping")
        return [self._all_true(status == _OK or self.ctx.dp_rank != g, what) for g in range(groups)]

    # -- one shard -------------------------------------------------------------------------------------

    def run_shard(self, shard: str) -> ShardResult:
        started = time.monotonic()
        scan = self._scan(shard)
        result = ShardResult(
            shard, total=len(scan.items), resumed=len(scan.done) - len(scan.adopted) - len(scan.copied),
            adopted=len(scan.adopted), reused=len(scan.copied),
        )  # fmt: skip
        metrics.shard_scanned(self.plan.run_id, shard, result.resumed, result.adopted)
        pending = scan.pending
        # Copies whose source is not committed yet (a duplicate row of an item generated in this pass) wait for it.
        waiting = {item.id for item in pending if item.id in scan.sources}
        log.info(
            "%s: %d items, %d already done, %d adopted, %d copied, %d to generate, %d to copy once generated",
            shard, len(scan.items), result.resumed, result.adopted, result.reused, len(pending) - len(waiting),
            len(waiting),
        )  # fmt: skip
        finished = self._generate(shard, [i for i in pending if i.id not in waiting], scan, result)
        if finished and waiting:
            copied = self._copy(scan, waiting)
            result.reused += len(copied)
            finished = self._generate(shard, [i for i in pending if i.id in waiting - copied], scan, result)
        if not finished or not self._all_true(not self.stop.is_set(), f"finishing {shard}"):
            result.seconds = time.monotonic() - started
            return result
        if self.ctx.rank == 0 and (pending or scan.adopted or scan.copied or not scan.stats_exists):
            fault("during_stats", shard)
            self.committer.finish_shard(
                scan, resumed=result.resumed, adopted=result.adopted, seconds=time.monotonic() - started
            )
        result.seconds = time.monotonic() - started
        result.finished = True
        return result

    def _generate(self, shard: str, items: list[Item], scan: ShardScan, result: ShardResult) -> bool:
        """Generate ``items`` in rounds over the data-parallel groups; False when told to stop first."""
        mine = items[self.ctx.dp_rank :: self.ctx.dp_size]
        if items:
            self._prepare(mine, shard)
        for index in range(-(-len(items) // self.ctx.dp_size)):
            if not self.keep_going():
                return False
            item = mine[index] if index < len(mine) else None
            if item is not None:
                metrics.item_started(self.plan.run_id, shard, item.id)
            with log_context(item=item.id if item else None):
                outcome = self._process_round(shard, item, scan)
            if outcome == "committed":
                result.generated += 1
            elif outcome == "failed":
                result.failed += 1
        return True

    def _scan(self, shard: str) -> ShardScan:
        view = None
        status, error = _OK, None
        if self.ctx.rank == 0:
            try:
                if not self.committer.model_pinned:
                    self.committer.check_model_pin(create=False)
                reuse = self.plan.reuse is not None and shard in self.plan.reuse.shards
                view = scan_shard(self.storage, self.plan.run_id, shard, reuse=reuse)
                view.copied = self._copy_items(view, set(view.sources) - view.done)
                view.done |= view.copied
                view.orphans -= view.copied
                self.committer.adopt_orphans(view)
            except (StorageError, InputError, ModelMismatchError) as e:
                status, error = _FATAL, e
        self._resolve(status, error, f"scanning {shard}")
        try:
            scan = self.ctx.broadcast(view)
        except Exception as e:
            raise GroupFailure(f"rank {self.ctx.rank}: broadcast of the {shard} scan failed ({describe(e)})") from e
        if scan is None:  # rank 0 sends its scan, or every rank raised in _resolve
            raise GroupFailure(f"rank {self.ctx.rank}: rank 0 sent no scan of {shard}")
        return scan

    def _copy(self, scan: ShardScan, ids: set[str]) -> set[str]:
        """Rank 0 commits ``ids`` as copies where their sources are committed now; every rank learns which."""
        copied: set[str] = set()
        status, error = _OK, None
        if self.ctx.rank == 0:
            try:
                copied = self._copy_items(scan, ids)
            except (StorageError, ModelMismatchError) as e:
                status, error = _FATAL, e
        self._resolve(status, error, f"copying into {scan.shard}")
        try:
            copied = self.ctx.broadcast(copied)
        except Exception as e:
            raise GroupFailure(
                f"rank {self.ctx.rank}: broadcast of the {scan.shard} copies failed ({describe(e)})"
            ) from e
        scan.done |= copied
        return copied

    def _copy_items(self, scan: ShardScan, ids: set[str]) -> set[str]:
        copied: set[str] = set()
        for item in scan.items:
            if item.id not in ids:
                continue
            try:
                if commit_copy(
                    self.committer, scan.shard, item, scan.sources[item.id], 0, clear_error=item.id in scan.errored
                ):
                    copied.add(item.id)
            except ValueError as e:
                log.warning("%s/%s: copy failed (%s); generating it instead", scan.shard, item.id, e)
        return copied

    def _prepare(self, mine: list[Item], shard: str) -> None:
        status, error = _OK, None
        if mine:
            try:
                with _abandonable(self.stop):
                    self.generator.prepare(mine)
            except Exception as e:
                log.exception("rank %d: preparing %s failed", self.ctx.rank, shard)
                status, error = _FATAL, e
        self._resolve(status, error, f"preparing {shard}")

    def _process_round(self, shard: str, item: Item | None, scan: ShardScan) -> str | None:
        """Generate and commit this group's item of the round (retrying), in lockstep with every rank.

        Returns "committed", "failed" or None (no item for this group this round).
        """
        attempts = 0
        last_error: BaseException | None = None
        settled = item is None
        error: BaseException | None
        for attempt_round in range(1, self.max_attempts + 1):
            status, error = _OK, None
            if item is not None and not settled:
                attempts = attempt_round
                try:
                    self._generate_and_commit(shard, item, attempts, scan)
                except (StorageError, ModelMismatchError) as e:
                    status, error = _FATAL, e
                except Exception as e:
                    status, error = _ITEM_FAILED, e
                    last_error = e
                    log.warning(
                        "%s/%s: attempt %d/%d failed on rank %d: %s",
                        shard,
                        item.id,
                        attempts,
                        self.max_attempts,
                        self.ctx.rank,
                        describe(e),
                        exc_info=log.isEnabledFor(logging.DEBUG),
                    )
            what = f"item {item.id}" if item else f"a round of {shard}"
            group_ok = self._resolve(status, error, what)
            if not settled and group_ok[self.ctx.dp_rank]:
                settled = True
            if all(group_ok):
                break
        if item is None:
            return None
        if settled:
            return "committed"
        if self.ctx.is_writer:
            self.committer.record_error(shard, item, attempts, last_error, dp_rank=self.ctx.dp_rank)
        return "failed"

    def _generate_and_commit(self, shard: str, item: Item, attempt: int, scan: ShardScan) -> None:
        with _abandonable(self.stop):
            video = self.generator.generate(item)
        fault("generate", item.id)
        if not self.ctx.is_writer:
            return
        if video is None:
            raise RuntimeError(f"generator returned no video on writer rank {self.ctx.rank}")
        self.committer.commit(shard, item, video, attempt, clear_error=item.id in scan.errored)
