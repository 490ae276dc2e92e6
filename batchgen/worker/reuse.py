"""Committing an item as a copy of a committed video (``batchgen.core.reuse`` planned which).

The copy happens here, in the worker, as the item's commit, not in the planner. The plan only records sources
(written before ``run.json``, so a crashed planner leaves no half-copied run to account for), and the copy then
follows the worker's own exactly-once order: the video first (a server-side copy, a conditional create), the sidecar
last (the commit marker, a conditional create). A crash between the two leaves an orphan video that the next scan
finds and commits here again; a concurrent worker's copy of the same item loses the conditional create and finds the
same bytes. Copies also spread over the workers instead of running serially in ``plan``, and a source that is not
committed (deleted by ``verify --repair``, or a duplicate row whose first occurrence failed) simply makes the item
pending: it is generated like any other.
"""

from __future__ import annotations

import hashlib
import logging

from batchgen import __version__
from batchgen.core import layout
from batchgen.core.errors import AlreadyExistsError, NotFoundError
from batchgen.core.item import Item
from batchgen.core.records import Sidecar, SidecarError
from batchgen.core.reuse import Source
from batchgen.worker.commit import Committer, now

log = logging.getLogger("batchgen.worker")

# Fields describing the stored video (not the item, the run or this commit): the copy's sidecar takes them from the
# source's, since the bytes are the same.
_VIDEO_FIELDS = ("sha256", "size_bytes", "frames", "video_width", "video_height", "duration_s", "model", "quality")


def commit_copy(
    committer: Committer, shard: str, item: Item, source: Source, attempt: int, *, clear_error: bool
) -> bool:
    """Commit ``item`` as a copy of ``source``. False when the source cannot serve (not committed, another content,
    or the destination holds other bytes): the caller generates the item instead."""
    storage, plan = committer.storage, committer.plan
    record = _source_record(committer, source)
    expected = committer.content_key(item)
    if record is None or record.get("content_key") != expected:
        log.info(
            "%s/%s: source %s/%s/%s cannot serve; generating", shard, item.id, source.run_id, source.shard, source.id
        )
        return False
    if not committer.model_pinned:
        committer.check_model_pin(create=True)
    key = layout.video_key(plan.run_id, shard, item.id)
    try:
        storage.copy(record["video_key"], key)
    except AlreadyExistsError:
        # An earlier attempt's copy (a crash before its sidecar) or a concurrent worker's: keep it only if it is
        # the source's bytes.
        if hashlib.sha256(storage.get_bytes(key)).hexdigest() != record["sha256"]:
            return False
    stored = storage.head(key)
    if stored is None or stored.size != record["size_bytes"]:
        raise ValueError(
            f"{storage.url(key)}: the copy has {stored and stored.size} bytes, the source {record['size_bytes']}"
        )
    sidecar = Sidecar.for_item(
        item, shard=shard, run_id=plan.run_id, fps=record["fps"], crf=record["crf"], video_key=key,
        video_uri=storage.url(key), timings={}, attempt=attempt + committer.launch_attempt, host=committer.host,
        batchgen_version=__version__, created_at=now(), adopted=False, content_key=expected,
        parallel={"world_size": committer.world_size, "dp_size": committer.dp_size},
        reused_from={"run_id": source.run_id, "key": record["video_key"]},
        **{name: record[name] for name in _VIDEO_FIELDS if name in record},
    )  # fmt: skip
    committer.put_sidecar(shard, item, sidecar, clear_error)
    return True


def _source_record(committer: Committer, source: Source) -> dict | None:
    try:
        data = committer.storage.get_bytes(source.sidecar_key)
    except NotFoundError:
        return None
    try:
        return Sidecar.parse(data, run_id=source.run_id, shard=source.shard, item_id=source.id)
    except SidecarError as e:
        log.warning("%s: %s; not copying from it", committer.storage.url(source.sidecar_key), e)
        return None
