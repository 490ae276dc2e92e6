"""The worker loop: for each shard it is given, find what is already done, generate the rest, commit each
item (video, then sidecar), and write the shard's stats last.

Everything durable is an object in storage; nothing is remembered between runs. Per shard:

1. Scan (rank 0 only, then broadcast so every rank agrees): the shard's items from the plan, one listing of
   ``meta/<shard>/`` (the done set), one of ``errors/<shard>/``, and one of ``videos/<shard>/`` only when
   some item is not done (orphan videos can only belong to items without a sidecar).
2. Orphans (a video without a sidecar: a crash between the two writes) are adopted: probed, hashed and
   given a sidecar with ``"adopted": true``; an undecodable one is deleted and its item generated again.
3. Pending items are dealt round-robin to data-parallel groups; ``generator.prepare`` runs once per shard.
4. Per item, the group's writer rank encodes the MP4 and commits it (``_commit``). Any exception in
   generation or encoding is an item failure: retried up to ``worker.max_attempts`` times, then recorded
   in ``errors/<shard>/<id>.json``; it never stops the shard. Storage errors that outlast the backend's own
   retries are not item failures: the worker stops with the storage error's exit code.
5. The shard's index part (``index/parts/<shard>-<digest>.parquet``, from the sidecars this process wrote and reads
   of the others), then ``stats/<shard>.json`` last (a cache of the shard's counts, never trusted for progress).

Ranks of a torchrun job stay in lockstep: every round of items ends with ``context.all_true`` on the
outcome, so a failure on one rank is retried (or recorded) by its whole group, and a rank whose collectives
broke fails the process with a message naming it instead of leaving the others waiting.

Test hook: ``BATCHGEN_FAULT="<point>:<target>"`` makes the worker process SIGKILL itself (a real kill -9) at
``generate`` (an item was generated, nothing of it written), ``after_video`` (video written, sidecar not)
or ``during_stats`` (every item committed, stats not written). The target is an item id (a shard id for
``during_stats``) or ``*`` for the first occasion. Crash-safety tests use it; it has no other purpose.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from batchgen import __version__
from batchgen.core import layout, metrics, quality
from batchgen.core.errors import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_TRANSIENT,
    AlreadyExistsError,
    BatchgenError,
    InputError,
    ModelMismatchError,
    NotFoundError,
    StorageError,
    TransientStorageError,
)
from batchgen.core.item import Item
from batchgen.core.logs import log_context
from batchgen.core.plan import RunPlan, load_shard_items
from batchgen.core.records import Sidecar
from batchgen.core.video import encode_mp4, probe_mp4
from batchgen.dataset.index import write_part
from batchgen.models.api import GeneratedVideo, VideoGenerator
from batchgen.storage.base import Storage
from batchgen.worker.context import ProcessContext

log = logging.getLogger("batchgen.worker")

FAULT_ENV = "BATCHGEN_FAULT"
FAULT_POINTS = ("generate", "after_video", "during_stats")
ATTEMPT_ENV = "BATCHGEN_ATTEMPT"
"""Set by launchers: how many times this worker's job was launched before (0 for the first launch)."""

# How often an undecodable existing video may be replaced before giving up on the item: each round either
# we or a concurrent worker publish a fresh object, so more than a couple of rounds means something else is
# rewriting the key.
_MAX_REPLACE_ROUNDS = 3


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


# -- test hook ----------------------------------------------------------------------------------------------


def _fault(point: str, target: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want_point, _, want_target = spec.partition(":")
    if want_point not in FAULT_POINTS:
        raise InputError(f"{FAULT_ENV}={spec!r}: point must be one of {', '.join(FAULT_POINTS)}")
    if want_point == point and want_target in ("*", target):
        log.warning("%s=%s: killing this process (pid %d) with SIGKILL", FAULT_ENV, spec, os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# -- helpers ------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _launch_attempt() -> int:
    value = os.environ.get(ATTEMPT_ENV, "0") or "0"
    try:
        attempt = int(value)
    except ValueError:
        raise InputError(f"{ATTEMPT_ENV}={value!r} must be a non-negative integer") from None
    if attempt < 0:
        raise InputError(f"{ATTEMPT_ENV}={value!r} must be a non-negative integer")
    return attempt


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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

    @property
    def pending(self) -> list[Item]:
        return [item for item in self.items if item.id not in self.done]


def scan_shard(storage: Storage, run_id: str, shard: str) -> ShardScan:
    """The shard's items and which are done, from listings (never a request per item)."""
    items = load_shard_items(storage, run_id, shard)
    ids = {item.id for item in items}
    done = _ids_under(storage, layout.sidecars_prefix(run_id, shard), ".json", ids, by_ranges=True)
    # errors/ is empty in the common case: one plain listing, not one per key range.
    errored = _ids_under(storage, layout.errors_prefix(run_id, shard), ".json", ids, by_ranges=False)
    orphans: set[str] = set()
    if done != ids:
        orphans = _ids_under(storage, layout.videos_prefix(run_id, shard), ".mp4", ids, by_ranges=True) - done
    stats_exists = storage.head(layout.stats_key(run_id, shard)) is not None if done == ids else False
    return ShardScan(shard, items, done, errored, orphans, stats_exists)


# A listing page holds 1000 keys. Ranges a little smaller than a page let each concurrent lister see the next
# range's first key on its only page and stop there, so listing N keys by ranges still costs about N/900
# requests, while their latencies overlap instead of adding up.
_KEYS_PER_RANGE = 900
_LIST_THREADS = 8


def _ids_under(
    storage: Storage, prefix: str, suffix: str, ids: set[str], *, by_ranges: bool, etags: dict | None = None
) -> set[str]:
    expected = sorted(f"{prefix}{item_id}{suffix}" for item_id in ids)
    bounds = expected[_KEYS_PER_RANGE - 1 : -1 : _KEYS_PER_RANGE] if by_ranges else []
    # Ranges (None, b0], (b0, b1], ..., (b_last, None) cover every key under the prefix, strays included.
    ranges = list(zip([None, *bounds], [*bounds, None], strict=True))
    if len(ranges) == 1:
        listed = [list(storage.list(prefix))]
    else:
        with ThreadPoolExecutor(min(len(ranges), _LIST_THREADS), thread_name_prefix="scan") as pool:
            listed = list(pool.map(lambda bounds: _list_range(storage, prefix, *bounds), ranges))
    found = set()
    for infos in listed:
        for info in infos:
            name = info.key[len(prefix) :]
            item_id = name[: -len(suffix)] if name.endswith(suffix) else None
            if item_id in ids:
                found.add(item_id)
                if etags is not None:
                    etags[item_id] = info.etag
            else:
                log.warning("ignoring %s: not an item of this shard", storage.url(info.key))
    return found


def _list_range(storage: Storage, prefix: str, start_after: str | None, last: str | None) -> list:
    infos = []
    for info in storage.list(prefix, start_after=start_after):
        if last is not None and info.key > last:
            break  # the listing is lazy: no further page is requested
        infos.append(info)
    return infos


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
    def __init__(self, storage, plan, generator, context, stop):
        self.storage: Storage = storage
        self.plan: RunPlan = plan
        self.generator: VideoGenerator = generator
        self.ctx: ProcessContext = context
        self.stop: threading.Event = stop
        self.generation = plan.config.generation
        self.max_attempts = plan.config.worker.max_attempts
        self.launch_attempt = _launch_attempt()
        self.host = socket.gethostname()
        self.model_pinned = False
        self.committed: dict[str, dict[str, dict]] = {}
        """Per shard, the sidecar records this process committed: its index part needs no read of them."""

    # -- agreement across ranks ------------------------------------------------------------------------

    def _all_true(self, flag: bool, what: str) -> bool:
        try:
            return self.ctx.all_true(flag)
        except Exception as e:
            raise GroupFailure(
                f"rank {self.ctx.rank}: collective failed while agreeing on {what} ({_describe(e)}); another "
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
            shard, total=len(scan.items), resumed=len(scan.done) - len(scan.adopted), adopted=len(scan.adopted)
        )
        metrics.shard_scanned(self.plan.run_id, shard, result.resumed, result.adopted)
        pending = scan.pending
        mine = pending[self.ctx.dp_rank :: self.ctx.dp_size]
        rounds = -(-len(pending) // self.ctx.dp_size)
        log.info(
            "%s: %d items, %d already done, %d adopted, %d to generate",
            shard,
            len(scan.items),
            result.resumed,
            result.adopted,
            len(pending),
        )
        if pending:
            self._prepare(mine, shard)
        for index in range(rounds):
            if not self.keep_going():
                result.seconds = time.monotonic() - started
                return result
            item = mine[index] if index < len(mine) else None
            if item is not None:
                metrics.item_started(self.plan.run_id, shard, item.id)
            with log_context(item=item.id if item else None):
                outcome = self._process_round(shard, item, scan)
            if outcome == "committed":
                result.generated += 1
            elif outcome == "failed":
                result.failed += 1
        if not self._all_true(not self.stop.is_set(), f"finishing {shard}"):
            result.seconds = time.monotonic() - started
            return result
        if self.ctx.rank == 0 and (pending or scan.adopted or not scan.stats_exists):
            _fault("during_stats", shard)
            self._write_stats(scan, result, started)
        result.seconds = time.monotonic() - started
        result.finished = True
        return result

    def _scan(self, shard: str) -> ShardScan:
        view = None
        status, error = _OK, None
        if self.ctx.rank == 0:
            try:
                if not self.model_pinned:
                    self._check_model_pin(create=False)
                view = scan_shard(self.storage, self.plan.run_id, shard)
                self._adopt_orphans(view)
            except (StorageError, InputError, ModelMismatchError) as e:
                status, error = _FATAL, e
        self._resolve(status, error, f"scanning {shard}")
        try:
            return self.ctx.broadcast(view)
        except Exception as e:
            raise GroupFailure(f"rank {self.ctx.rank}: broadcast of the {shard} scan failed ({_describe(e)})") from e

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
        for attempt_round in range(1, self.max_attempts + 1):
            status, error = _OK, None
            if not settled:
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
                        _describe(e),
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
            self._record_error(shard, item, attempts, last_error)
        return "failed"

    # -- commit ----------------------------------------------------------------------------------------

    def _generate_and_commit(self, shard: str, item: Item, attempt: int, scan: ShardScan) -> None:
        with _abandonable(self.stop):
            video = self.generator.generate(item)
        _fault("generate", item.id)
        if not self.ctx.is_writer:
            return
        if video is None:
            raise RuntimeError(f"generator returned no video on writer rank {self.ctx.rank}")
        self._commit(shard, item, video, attempt, clear_error=item.id in scan.errored)

    def _commit(self, shard: str, item: Item, video: GeneratedVideo, attempt: int, *, clear_error: bool) -> None:
        """Video (conditional create), then sidecar (conditional create), then clear a stale error record."""
        expected = (item.num_frames, item.height, item.width, 3)
        frames = video.frames
        if tuple(frames.shape) != expected or frames.dtype.name != "uint8":
            raise ValueError(
                f"generator returned frames {frames.dtype}{list(frames.shape)}, expected uint8{list(expected)}"
            )
        measured = quality.gate(frames, self.plan.config.quality)  # before encoding: a failed gate writes nothing
        if not self.model_pinned:
            self._check_model_pin(create=True)
        t0 = time.perf_counter()
        data = encode_mp4(frames, self.generation.fps, self.generation.crf)
        info = probe_mp4(data)
        t1 = time.perf_counter()
        run_id = self.plan.run_id
        video_key = layout.video_key(run_id, shard, item.id)
        adopted = False
        if not self._put_video(video_key, data):
            # Someone else's video is already there (a crashed earlier attempt or a concurrent worker):
            # the sidecar must describe the stored bytes, so adopt them.
            data, info = self._existing_video(video_key, item)
            adopted = True
        _fault("after_video", item.id)
        timings = {} if adopted else {**video.timings, "encode_mp4": t1 - t0}
        sidecar = self._sidecar(
            shard, item, data, info, attempt=attempt, adopted=adopted, timings=timings, extra=video.extra
        )
        sidecar.quality = quality.measure_mp4(data, self.plan.config.quality) if adopted else measured
        if not adopted:
            sidecar.timings["upload"] = time.perf_counter() - t1
        self._put_sidecar(shard, item, sidecar, clear_error)
        metrics.item_committed(sidecar.timings)

    def _put_video(self, key: str, data: bytes) -> bool:
        """Create the video; False if an object already holds the key (after replacing an undecodable one)."""
        for _ in range(_MAX_REPLACE_ROUNDS):
            try:
                self.storage.put_bytes(key, data, if_absent=True, content_type="video/mp4")
                return True
            except AlreadyExistsError:
                pass
            try:
                existing = self.storage.get_bytes(key)
                probe_mp4(existing)
                return False
            except ValueError as e:
                log.warning("replacing undecodable %s (%s)", self.storage.url(key), e)
                self.storage.delete(key)
        raise RuntimeError(f"{self.storage.url(key)} keeps reappearing undecodable; giving up on this attempt")

    def _existing_video(self, key: str, item: Item):
        data = self._read_verified(key)
        info = probe_mp4(data)
        if info.frames != item.num_frames:
            raise ValueError(f"{self.storage.url(key)} has {info.frames} frames, expected {item.num_frames}")
        return data, info

    def _read_verified(self, key: str) -> bytes:
        """The stored object's bytes, confirmed by a second read and the stored size: a sidecar's sha256 must be
        the stored video's, not that of whatever a faulty connection delivered (a faststart MP4 cut short still
        probes with its full frame count, so decoding alone would not notice)."""
        for _ in range(_MAX_REPLACE_ROUNDS):
            first = self.storage.get_bytes(key)
            second = self.storage.get_bytes(key)
            stored = self.storage.head(key)
            if first == second and stored is not None and stored.size == len(first):
                return first
            log.warning("%s: two reads disagree or differ from the stored size; reading again", self.storage.url(key))
        raise TransientStorageError(f"{self.storage.url(key)}: could not read the same bytes twice; not adopting it")

    def _put_sidecar(self, shard: str, item: Item, sidecar: Sidecar, clear_error: bool) -> None:
        key = layout.sidecar_key(self.plan.run_id, shard, item.id)
        try:
            self.storage.put_bytes(key, sidecar.to_json(), if_absent=True, content_type="application/json")
            self.committed.setdefault(shard, {})[item.id] = sidecar.to_dict()
        except AlreadyExistsError:
            log.info("%s/%s: already committed by another worker", shard, item.id)
        if clear_error:
            self.storage.delete(layout.error_key(self.plan.run_id, shard, item.id))

    def _sidecar(self, shard, item, data, info, *, attempt, adopted, timings, extra) -> Sidecar:
        video_key = layout.video_key(self.plan.run_id, shard, item.id)
        extra = dict(extra or {})
        parallel = {"world_size": self.ctx.world_size, "dp_size": self.ctx.dp_size, **extra.pop("parallel", {})}
        model = dict(getattr(self.generator, "model_identity", None) or {})
        return Sidecar.for_item(
            item,
            shard=shard,
            run_id=self.plan.run_id,
            fps=self.generation.fps,
            crf=self.generation.crf,
            video_key=video_key,
            video_uri=self.storage.url(video_key),
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            frames=info.frames,
            video_width=info.width,
            video_height=info.height,
            duration_s=info.duration_s,
            model={
                "family": self.plan.config.model.family,
                "path": model.get("path"),
                "fingerprint": model.get("fingerprint"),
            },
            timings=timings,
            attempt=attempt + self.launch_attempt,
            host=self.host,
            batchgen_version=__version__,
            parallel=parallel,
            created_at=_now(),
            adopted=adopted,
            extra=extra,
        )

    def _record_error(self, shard: str, item: Item, attempts: int, error: BaseException | None) -> None:
        message = _describe(error) if error else f"failed on another rank of data-parallel group {self.ctx.dp_rank}"
        record = {
            "id": item.id,
            "shard": shard,
            "run_id": self.plan.run_id,
            "row": item.row,
            "attempts": attempts,
            "launch_attempt": self.launch_attempt,
            "error": message,
            "host": self.host,
            "rank": self.ctx.rank,
            "batchgen_version": __version__,
            "created_at": _now(),
        }
        key = layout.error_key(self.plan.run_id, shard, item.id)
        self.storage.put_bytes(key, _json_bytes(record), content_type="application/json")
        metrics.item_failed(error)
        log.error(
            "%s/%s: failed after %d attempt(s): %s (recorded in %s)",
            shard,
            item.id,
            attempts,
            message,
            self.storage.url(key),
        )

    # -- the weights' pin ------------------------------------------------------------------------------

    def _check_model_pin(self, *, create: bool) -> None:
        """Refuse to add videos made with other weights than the run's. The first commit pins the weights'
        fingerprint in ``plan/model.json`` (a conditional create: concurrent first commits agree on one)."""
        model = dict(getattr(self.generator, "model_identity", None) or {})
        fingerprint = model.get("fingerprint")
        if not fingerprint:
            self.model_pinned = True  # a generator without weights to identify (nothing to compare)
            return
        planned = self.plan.config.model.weights
        if planned and fingerprint != planned:
            raise ModelMismatchError(
                f"run {self.plan.run_id} was planned with weights {planned}, this worker has {fingerprint} "
                f"({model.get('path')}); one run never mixes two models. Plan a new run for these weights."
            )
        key = layout.model_pin_key(self.plan.run_id)
        if create:
            pin = {"fingerprint": fingerprint, "path": model.get("path"), "host": self.host, "pinned_at": _now()}
            try:
                self.storage.put_bytes(key, _json_bytes(pin), if_absent=True, content_type="application/json")
                self.model_pinned = True
                return
            except AlreadyExistsError:
                pass
        try:
            pinned = json.loads(self.storage.get_bytes(key))
        except NotFoundError:
            return  # not pinned yet: the first commit will
        except ValueError as e:
            raise StorageError(f"{self.storage.url(key)} is not valid JSON: {e}") from e
        if pinned.get("fingerprint") != fingerprint:
            raise ModelMismatchError(
                f"run {self.plan.run_id} was generated with weights {pinned.get('fingerprint')} "
                f"({pinned.get('path')}), this worker has {fingerprint} ({model.get('path')}); one run never mixes "
                "two models. To generate with these weights, plan a new run (another --run-name)."
            )
        self.model_pinned = True

    # -- orphans and stats -----------------------------------------------------------------------------

    def _adopt_orphans(self, scan: ShardScan) -> None:
        by_id = {item.id: item for item in scan.items}
        if scan.orphans and not self.model_pinned:
            self._check_model_pin(create=True)
        for item_id in sorted(scan.orphans):
            item = by_id[item_id]
            key = layout.video_key(self.plan.run_id, scan.shard, item_id)
            try:
                data, info = self._existing_video(key, item)
            except NotFoundError:
                continue  # a concurrent worker replaced it; the item is handled like any pending one
            except ValueError as e:
                log.warning(
                    "%s: orphan video is unusable (%s); deleting it and generating the item again",
                    self.storage.url(key),
                    e,
                )
                self.storage.delete(key)
                continue
            sidecar = self._sidecar(scan.shard, item, data, info, attempt=0, adopted=True, timings={}, extra={})
            sidecar.quality = quality.measure_mp4(data, self.plan.config.quality)
            self._put_sidecar(scan.shard, item, sidecar, clear_error=item_id in scan.errored)
            log.info("%s/%s: adopted orphan video %s", scan.shard, item_id, self.storage.url(key))
            scan.adopted.add(item_id)
        scan.done |= scan.adopted

    def _write_stats(self, scan: ShardScan, result: ShardResult, started: float) -> None:
        run_id = self.plan.run_id
        ids = {item.id for item in scan.items}
        etags: dict[str, str | None] = {}
        prefix = layout.sidecars_prefix(run_id, scan.shard)
        done = _ids_under(self.storage, prefix, ".json", ids, by_ranges=True, etags=etags)
        # The shard's index part, from the sidecars this process wrote plus reads of the others.
        write_part(self.storage, run_id, scan.shard, etags, self.committed.pop(scan.shard, None))
        errored = _ids_under(self.storage, layout.errors_prefix(run_id, scan.shard), ".json", ids, by_ranges=False)
        errored -= done
        stats = {
            "shard": scan.shard,
            "run_id": run_id,
            "total": len(ids),
            "done": len(done),
            "failed": len(errored),
            "resumed": result.resumed,
            "adopted": result.adopted,
            "committed_during_pass": len(done) - result.resumed - result.adopted,
            "seconds": round(time.monotonic() - started, 3),
            "host": self.host,
            "world_size": self.ctx.world_size,
            "batchgen_version": __version__,
            "finished_at": _now(),
        }
        self.storage.put_bytes(
            layout.stats_key(run_id, scan.shard), _json_bytes(stats), content_type="application/json"
        )
