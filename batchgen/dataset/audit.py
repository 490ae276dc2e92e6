"""``batchgen verify``: check that what a run says about itself is true of the stored objects.

- every done item's video exists with the size its sidecar records (one listing of ``videos/``, no read per
  item); with ``deep``, its bytes also hash to the recorded sha256 and decode to the recorded frame count;
- sidecars are valid and describe the item their key names;
- no sidecar, error record or video is stray (not an object of a planned item);
- the index holds exactly the done items (same ids, sha256 and sizes), and ``_SUCCESS.json`` is present exactly
  when the run is complete, naming the current index;
- no temporary or lock file of an interrupted write is left in the run's folder (``Storage.leftovers``).

``repair`` turns each damaged item back into a pending one (its video is deleted first, then its sidecar, so a
crash in between leaves a sidecar without a video, which the next verify finds again, never a damaged orphan the
next run would adopt) and then rebuilds the index and the marker. Strays are reported, never deleted: they are
not batchgen's to judge.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.core import layout
from batchgen.core.errors import NotFoundError
from batchgen.core.plan import RunPlan, load_shard_items
from batchgen.core.progress import RunProgress, scan_run
from batchgen.core.records import Sidecar, SidecarError
from batchgen.storage.base import Storage

log = logging.getLogger("batchgen.audit")

READ_THREADS = 32


@dataclass(frozen=True)
class Problem:
    key: str
    """The object the problem is about."""
    what: str
    item: tuple[str, str] | None = None
    """(shard, item id) when the item is damaged and ``repair`` makes it pending again."""
    uri: str | None = None
    """Where ``key`` is no object (a leftover file): its full URI."""

    def where(self, storage: Storage) -> str:
        return self.uri or storage.url(self.key)


@dataclass
class Audit:
    run_id: str
    done: int = 0
    total: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def damaged(self) -> list[tuple[str, str]]:
        return sorted({p.item for p in self.problems if p.item is not None})


def audit_run(storage: Storage, plan: RunPlan, *, deep: bool = False) -> Audit:
    progress = scan_run(storage, plan)
    audit = Audit(plan.run_id, progress.done, progress.total)
    audit.problems += [Problem(key, "stray: not an object of a planned item") for key in progress.strays]
    videos = _videos(storage, plan, progress, audit)
    done = [(s.shard, item_id) for s in progress.shards.values() for item_id in sorted(s.done_ids)]
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="verify") as pool:
        results = list(pool.map(lambda pair: _check_item(storage, plan, pair[0], pair[1], videos, deep), done))
    sidecars = {}
    for pair, (record, problems) in zip(done, results, strict=True):
        audit.problems += problems
        if record is not None:
            sidecars[pair[1]] = record
    audit.problems += _check_index(storage, plan, progress, sidecars)
    leftovers = storage.leftovers(layout.run_prefix(plan.run_id))
    audit.problems += [Problem(name, LEFTOVER, uri=f"{storage.uri}/{name}") for name in leftovers]
    return audit


LEFTOVER = "left by an interrupted write, not part of the dataset: delete it once no batchgen command writes here"


def _videos(storage: Storage, plan: RunPlan, progress: RunProgress, audit: Audit) -> dict[str, int]:
    """Size of every planned item's video (one listing of the run's ``videos/``); strays go to the audit."""
    prefix = layout.videos_root(plan.run_id)
    sizes: dict[str, int] = {}
    planned: dict[str, set[str]] = {}
    for info in storage.list(prefix):
        shard, _, name = info.key[len(prefix) :].partition("/")
        item_id = name[: -len(".mp4")] if name.endswith(".mp4") and "/" not in name else None
        shard_progress = progress.shards.get(shard)
        if shard_progress is None or item_id is None:
            audit.problems.append(Problem(info.key, "stray: not an object of a planned item"))
            continue
        if item_id not in shard_progress.done_ids:
            if shard not in planned:
                planned[shard] = {item.id for item in load_shard_items(storage, plan.run_id, shard)}
            if item_id not in planned[shard]:
                audit.problems.append(Problem(info.key, "stray: not an object of a planned item"))
                continue
            log.info("%s: video without a sidecar (the next run adopts it)", storage.url(info.key))
        sizes[info.key] = info.size
    return sizes


def _check_item(storage, plan, shard, item_id, videos, deep) -> tuple[dict | None, list[Problem]]:
    key = layout.sidecar_key(plan.run_id, shard, item_id)
    pair = (shard, item_id)
    try:
        record = Sidecar.parse(storage.get_bytes(key), run_id=plan.run_id, shard=shard, item_id=item_id)
    except NotFoundError:
        return None, []  # removed since the listing: the item is pending, nothing to check
    except SidecarError as e:
        return None, [Problem(key, f"invalid sidecar: {e}", pair)]
    video_key = layout.video_key(plan.run_id, shard, item_id)
    if record["video_key"] != video_key:
        return record, [Problem(key, f"sidecar names video {record['video_key']}, expected {video_key}", pair)]
    if video_key not in videos:
        return record, [Problem(video_key, "video missing (its sidecar says it is done)", pair)]
    if videos[video_key] != record["size_bytes"]:
        what = f"video is {videos[video_key]} bytes, its sidecar records {record['size_bytes']}"
        return record, [Problem(video_key, what, pair)]
    if deep:
        return record, _check_bytes(storage, video_key, record, pair)
    return record, []


def _check_bytes(storage: Storage, video_key: str, record: dict, pair) -> list[Problem]:
    from batchgen.core.video import probe_mp4

    data = storage.get_bytes(video_key)
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["sha256"]:
        return [
            Problem(video_key, f"sha256 {digest[:16]}... differs from the recorded {record['sha256'][:16]}...", pair)
        ]
    try:
        info = probe_mp4(data)
    except ValueError as e:
        return [Problem(video_key, str(e), pair)]
    if info.frames != record["frames"] or info.frames != record["num_frames"]:
        what = f"decodes to {info.frames} frames, its sidecar records {record['frames']} of {record['num_frames']}"
        return [Problem(video_key, what, pair)]
    return []


def _check_index(storage: Storage, plan: RunPlan, progress: RunProgress, sidecars: dict[str, dict]) -> list[Problem]:
    index_key = layout.index_key(plan.run_id)
    problems = []
    try:
        table = pq.read_table(pa.BufferReader(storage.get_bytes(index_key)), columns=["id", "sha256", "size_bytes"])
        indexed = {row["id"]: (row["sha256"], row["size_bytes"]) for row in table.to_pylist()}
        if len(indexed) != table.num_rows:
            problems.append(Problem(index_key, "index lists an item more than once"))
    except NotFoundError:
        indexed = None
    except (pa.ArrowException, KeyError) as e:
        indexed = None
        problems.append(Problem(index_key, f"index is not readable: {e}"))
    expected = {item_id: (r["sha256"], r["size_bytes"]) for item_id, r in sidecars.items()}
    if indexed is not None and indexed != expected:
        missing, extra = len(set(expected) - set(indexed)), len(set(indexed) - set(expected))
        changed = sum(1 for k in set(expected) & set(indexed) if expected[k] != indexed[k])
        what = f"index does not match the sidecars ({missing} missing, {extra} extra, {changed} changed rows)"
        problems.append(Problem(index_key, what))
    problems += _check_marker(storage, plan, progress, index_key)
    return problems


def _check_marker(storage: Storage, plan: RunPlan, progress: RunProgress, index_key: str) -> list[Problem]:
    key = layout.success_key(plan.run_id)
    try:
        marker = json.loads(storage.get_bytes(key))
    except NotFoundError:
        return [Problem(key, "run is complete but has no success marker")] if progress.complete else []
    except ValueError as e:
        return [Problem(key, f"success marker is not JSON: {e}")]
    if not progress.complete:
        return [Problem(key, f"success marker present, but only {progress.done} of {progress.total} items are done")]
    index = storage.head(index_key)
    if marker.get("index_etag") is not None and (index is None or index.etag != marker["index_etag"]):
        return [Problem(key, "success marker names another version of the index")]
    return []


def repair(storage: Storage, plan: RunPlan, audit: Audit) -> None:
    """Make every damaged item pending again (video first, then sidecar), then rebuild index and marker."""
    from batchgen.dataset.index import finalize_run

    for shard, item_id in audit.damaged:
        storage.delete(layout.video_key(plan.run_id, shard, item_id))
        storage.delete(layout.sidecar_key(plan.run_id, shard, item_id))
        log.warning("%s/%s: damaged; deleted its video and sidecar, so the next run generates it", shard, item_id)
    finalize_run(storage, plan)
