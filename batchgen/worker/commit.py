"""The commit protocol of a writer rank: what makes an item durable, and nothing else (no ranks, no generator).

An item is committed when its sidecar exists; every write is ordered so a crash at any point leaves either
nothing, or a video without a sidecar (an orphan, adopted by the next scan), never a sidecar without its video:

1. the quality gate on the frames (a failed gate writes nothing);
2. the weights' pin: the first commit of a run creates ``plan/model.json`` (conditional create), every later one
   must have the same fingerprint;
3. the video (conditional create). If the key already holds a decodable video (a crashed attempt, a concurrent
   worker) its bytes are adopted instead, read twice so the sidecar's sha256 is the stored object's; an
   undecodable one is replaced;
4. the sidecar (conditional create): the commit marker; then a stale error record of the item is deleted.

Failed items get an ``ErrorRecord``; a shard's pass ends with its index part and ``ShardStats`` (written last).
Everything here needs only a ``Storage``, the plan and bytes: tests drive it without processes or a generator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from batchgen import __version__
from batchgen.core import layout, metrics, quality
from batchgen.core.content import content_key
from batchgen.core.errors import (
    AlreadyExistsError,
    ModelMismatchError,
    NotFoundError,
    StorageError,
    TransientStorageError,
)
from batchgen.core.item import Item
from batchgen.core.plan import RunPlan
from batchgen.core.progress import ids_under
from batchgen.core.records import ErrorRecord, ModelPin, ShardStats, Sidecar
from batchgen.core.video import VideoInfo, encode_mp4, probe_mp4
from batchgen.dataset.index import write_part
from batchgen.models.api import GeneratedVideo
from batchgen.storage.base import Storage
from batchgen.worker.faults import fault

if TYPE_CHECKING:
    from batchgen.worker.loop import ShardScan

log = logging.getLogger("batchgen.worker")

# How often an undecodable existing video may be replaced before giving up on the item: each round either
# we or a concurrent worker publish a fresh object, so more than a couple of rounds means something else is
# rewriting the key.
_MAX_REPLACE_ROUNDS = 3


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Committer:
    """Commits one writer's items of a run to ``storage``.

    ``model_identity`` is the generator's ``{'path', 'fingerprint'}``; ``world_size`` and ``dp_size`` are
    recorded in each sidecar, ``rank`` in error records; ``launch_attempt`` (how many times the job was launched
    before) is added to each attempt number."""

    def __init__(
        self,
        storage: Storage,
        plan: RunPlan,
        *,
        model_identity: dict[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        dp_size: int = 1,
        launch_attempt: int = 0,
    ) -> None:
        self.storage = storage
        self.plan = plan
        self.model = dict(model_identity or {})
        self.rank, self.world_size, self.dp_size = rank, world_size, dp_size
        self.launch_attempt = launch_attempt
        self.host = socket.gethostname()
        self.model_pinned = False
        self.committed: dict[str, dict[str, dict]] = {}
        """Per shard, the sidecar records this process committed: its index part needs no read of them."""

    # -- one item ----------------------------------------------------------------------------------------

    def commit(self, shard: str, item: Item, video: GeneratedVideo, attempt: int, *, clear_error: bool) -> None:
        """Video (conditional create), then sidecar (conditional create), then clear a stale error record."""
        expected = (item.num_frames, item.height, item.width, 3)
        frames = video.frames
        if tuple(frames.shape) != expected or frames.dtype.name != "uint8":
            raise ValueError(
                f"generator returned frames {frames.dtype}{list(frames.shape)}, expected uint8{list(expected)}"
            )
        config = self.plan.config
        measured = quality.gate(frames, config.quality)  # before encoding: a failed gate writes nothing
        if not self.model_pinned:
            self.check_model_pin(create=True)
        t0 = time.perf_counter()
        data = encode_mp4(frames, config.generation.fps, config.generation.crf)
        info = probe_mp4(data)
        t1 = time.perf_counter()
        video_key = layout.video_key(self.plan.run_id, shard, item.id)
        adopted = False
        if not self._put_video(video_key, data):
            # Someone else's video is already there (a crashed earlier attempt or a concurrent worker):
            # the sidecar must describe the stored bytes, so adopt them.
            data, info = self._existing_video(video_key, item)
            adopted = True
        fault("after_video", item.id)
        timings = {} if adopted else {**video.timings, "encode_mp4": t1 - t0}
        sidecar = self._sidecar(shard, item, data, info, attempt=attempt, adopted=adopted, timings=timings)
        sidecar.extra = dict(video.extra or {})
        sidecar.parallel.update(sidecar.extra.pop("parallel", {}))
        sidecar.quality = quality.measure_mp4(data, config.quality) if adopted else measured
        if not adopted:
            sidecar.timings["upload"] = time.perf_counter() - t1
        self.put_sidecar(shard, item, sidecar, clear_error)
        metrics.item_committed(sidecar.timings)

    def adopt(self, shard: str, item: Item, *, clear_error: bool) -> bool:
        """Give the orphan video of ``item`` (stored, no sidecar) its sidecar. False when it is gone (a concurrent
        worker replaced it) or unusable (deleted here): either way the item is generated like any pending one."""
        if not self.model_pinned:
            self.check_model_pin(create=True)
        key = layout.video_key(self.plan.run_id, shard, item.id)
        try:
            data, info = self._existing_video(key, item)
        except NotFoundError:
            return False
        except ValueError as e:
            log.warning(
                "%s: orphan video is unusable (%s); deleting it and generating the item again", self.storage.url(key), e
            )
            self.storage.delete(key)
            return False
        sidecar = self._sidecar(shard, item, data, info, attempt=0, adopted=True, timings={})
        sidecar.quality = quality.measure_mp4(data, self.plan.config.quality)
        self.put_sidecar(shard, item, sidecar, clear_error)
        log.info("%s/%s: adopted orphan video %s", shard, item.id, self.storage.url(key))
        return True

    def adopt_orphans(self, scan: ShardScan) -> None:
        """Adopt every orphan of ``scan``; the adopted ids join ``scan.adopted`` and ``scan.done``."""
        by_id = {item.id: item for item in scan.items}
        for item_id in sorted(scan.orphans):
            if self.adopt(scan.shard, by_id[item_id], clear_error=item_id in scan.errored):
                scan.adopted.add(item_id)
        scan.done |= scan.adopted

    def record_error(self, shard: str, item: Item, attempts: int, error: BaseException | None, *, dp_rank: int) -> None:
        """``errors/<shard>/<id>.json`` for an item that failed every attempt (``error`` None: on another rank)."""
        message = describe(error) if error else f"failed on another rank of data-parallel group {dp_rank}"
        record = ErrorRecord(
            id=item.id, shard=shard, run_id=self.plan.run_id, row=item.row, attempts=attempts,
            launch_attempt=self.launch_attempt, error=message, host=self.host, rank=self.rank,
            batchgen_version=__version__, created_at=now(),
        )  # fmt: skip
        key = layout.error_key(self.plan.run_id, shard, item.id)
        self.storage.put_bytes(key, record.to_json(), content_type="application/json")
        metrics.item_failed(error)
        log.error(
            "%s/%s: failed after %d attempt(s): %s (recorded in %s)", shard, item.id, attempts, message,
            self.storage.url(key),
        )  # fmt: skip

    # -- the shard's end ---------------------------------------------------------------------------------

    def finish_shard(self, scan: ShardScan, *, resumed: int, adopted: int, seconds: float) -> ShardStats:
        """The shard's index part (from the sidecars this process wrote plus reads of the others), then its
        stats, last."""
        run_id, shard = self.plan.run_id, scan.shard
        ids = {item.id for item in scan.items}
        etags: dict[str, str | None] = {}
        done = ids_under(self.storage, layout.sidecars_prefix(run_id, shard), ".json", ids, by_ranges=True, etags=etags)
        write_part(self.storage, run_id, shard, etags, self.committed.pop(shard, None))
        errored = ids_under(self.storage, layout.errors_prefix(run_id, shard), ".json", ids, by_ranges=False) - done
        stats = ShardStats(
            shard=shard, run_id=run_id, total=len(ids), done=len(done), failed=len(errored), resumed=resumed,
            adopted=adopted, committed_during_pass=len(done) - resumed - adopted, seconds=round(seconds, 3),
            host=self.host, world_size=self.world_size, batchgen_version=__version__, finished_at=now(),
        )  # fmt: skip
        self.storage.put_bytes(layout.stats_key(run_id, shard), stats.to_json(), content_type="application/json")
        return stats

    # -- the weights' pin --------------------------------------------------------------------------------

    def check_model_pin(self, *, create: bool) -> None:
        """Refuse to add videos made with other weights than the run's. The first commit pins the weights'
        fingerprint in ``plan/model.json`` (a conditional create: concurrent first commits agree on one)."""
        fingerprint = self.model.get("fingerprint")
        if not fingerprint:
            self.model_pinned = True  # a generator without weights to identify (nothing to compare)
            return
        planned = self.plan.config.model.weights
        if planned and fingerprint != planned:
            raise ModelMismatchError(
                f"run {self.plan.run_id} was planned with weights {planned}, this worker has {fingerprint} "
                f"({self.model.get('path')}); one run never mixes two models. Plan a new run for these weights."
            )
        key = layout.model_pin_key(self.plan.run_id)
        if create:
            pin = ModelPin(fingerprint=fingerprint, path=self.model.get("path"), host=self.host, pinned_at=now())
            try:
                self.storage.put_bytes(key, pin.to_json(), if_absent=True, content_type="application/json")
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
                f"({pinned.get('path')}), this worker has {fingerprint} ({self.model.get('path')}); one run never "
                "mixes two models. To generate with these weights, plan a new run (another --run-name)."
            )
        self.model_pinned = True

    def content_key(self, item: Item) -> str:
        """The item's content key with the weights this worker generates with."""
        generation, family = self.plan.config.generation, self.plan.config.model.family
        return content_key(item, generation, family, self.model.get("fingerprint") or "")

    # -- objects -----------------------------------------------------------------------------------------

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

    def _existing_video(self, key: str, item: Item) -> tuple[bytes, VideoInfo]:
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

    def put_sidecar(self, shard: str, item: Item, sidecar: Sidecar, clear_error: bool) -> None:
        key = layout.sidecar_key(self.plan.run_id, shard, item.id)
        try:
            self.storage.put_bytes(key, sidecar.to_json(), if_absent=True, content_type="application/json")
            self.committed.setdefault(shard, {})[item.id] = sidecar.to_dict()
        except AlreadyExistsError:
            log.info("%s/%s: already committed by another worker", shard, item.id)
        if clear_error:
            self.storage.delete(layout.error_key(self.plan.run_id, shard, item.id))

    def _sidecar(self, shard, item, data, info, *, attempt, adopted, timings) -> Sidecar:
        config = self.plan.config
        video_key = layout.video_key(self.plan.run_id, shard, item.id)
        return Sidecar.for_item(
            item,
            shard=shard,
            run_id=self.plan.run_id,
            fps=config.generation.fps,
            crf=config.generation.crf,
            video_key=video_key,
            video_uri=self.storage.url(video_key),
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            frames=info.frames,
            video_width=info.width,
            video_height=info.height,
            duration_s=info.duration_s,
            model={
                "family": config.model.family,
                "path": self.model.get("path"),
                "fingerprint": self.model.get("fingerprint"),
            },
            timings=timings,
            attempt=attempt + self.launch_attempt,
            host=self.host,
            batchgen_version=__version__,
            parallel={"world_size": self.world_size, "dp_size": self.dp_size},
            created_at=now(),
            adopted=adopted,
            content_key=self.content_key(item),
        )
