"""A run's progress, derived from the plan's item ids and the sidecars that exist, never from a marker that can
go stale.

- ``meta/`` (one listing of the whole run, or one per shard when that is fewer requests): the done items. Only
  ``meta/<shard>/<id>.json`` with ``<id>`` an item of that shard in the plan counts; anything else is ignored with
  a warning. When a shard's listed names have the plan's digest of its ids (``RunPlan.shard_digests``) they are
  exactly its items and nothing is read; otherwise the shard's item ids are read from its plan file.
- ``errors/`` (one listing): items that failed their attempts and have no sidecar.
- ``stats/`` (one listing): which shards a worker finished a pass over. Informational only: a sidecar deleted
  after its shard's stats were written makes the shard unfinished again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from batchgen import layout
from batchgen.plan import RunPlan, ids_digest, load_shard_items
from batchgen.storage.base import Storage

log = logging.getLogger("batchgen.progress")

LIST_PAGE = 1000  # keys per listing request on S3
READ_THREADS = 32  # shard plan reads are latency-bound


@dataclass
class ShardProgress:
    shard: str
    total: int
    done_ids: set[str] = field(default_factory=set)
    """Items of this shard whose sidecar exists."""
    failed_ids: set[str] = field(default_factory=set)
    """Items with an error record and no sidecar."""
    etags: dict[str, str | None] = field(default_factory=dict)
    """Sidecar etags of ``done_ids`` from the listing: they tell whether the shard's index part is current."""
    stats_written: bool = False
    """A worker once completed a pass over the shard (a cache: what counts is ``done_ids``)."""

    @property
    def done(self) -> int:
        return len(self.done_ids)

    @property
    def failed(self) -> int:
        return len(self.failed_ids)

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed

    @property
    def finished(self) -> bool:
        return self.done == self.total


@dataclass
class RunProgress:
    run_id: str
    shards: dict[str, ShardProgress] = field(default_factory=dict)
    strays: list[str] = field(default_factory=list)
    """Keys under meta/ and errors/ that are not a planned item's sidecar or error record (ignored)."""

    @property
    def total(self) -> int:
        return sum(s.total for s in self.shards.values())

    @property
    def done(self) -> int:
        return sum(s.done for s in self.shards.values())

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.shards.values())

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed

    @property
    def finished_shards(self) -> set[str]:
        """Shards whose every item has its sidecar: nothing left to do there."""
        return {s.shard for s in self.shards.values() if s.finished}

    @property
    def unfinished_shards(self) -> list[str]:
        """Shards a worker still has to visit, in shard order."""
        return [name for name, s in self.shards.items() if not s.finished]

    @property
    def complete(self) -> bool:
        return self.done == self.total

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "pending": self.pending,
            "shards": len(self.shards),
            "finished_shards": len(self.finished_shards),
            "complete": self.complete,
        }


def scan_run(storage: Storage, plan: RunPlan) -> RunProgress:
    run_id = plan.run_id
    progress = RunProgress(run_id, {s: ShardProgress(s, plan.items_in_shard(s)) for s in plan.shards})
    shards = progress.shards
    strays = progress.strays
    for shard in _names_under(storage, layout.stats_prefix(run_id), ".json", depth=1, strays=strays):
        if shard in shards:
            shards[shard].stats_written = True
    etags: dict[str, str | None] = {}
    listed = _listed_sidecars(storage, plan, strays, etags)
    errors = f"{run_id}/errors/"
    failed = _grouped(_pairs_under(storage, errors, ".json", strays), shards, strays, errors)
    ids_of = _planned_ids(storage, plan, [s for s in shards if _needs_ids(plan, s, listed, failed)])
    for name, s in shards.items():
        names = listed.get(name, set())
        valid = ids_of.get(name, names)  # without a plan read, the digest proved every name valid
        s.done_ids = names & valid
        s.etags = {item_id: etags.get(layout.sidecar_key(run_id, name, item_id)) for item_id in s.done_ids}
        s.failed_ids = (failed.get(name, set()) & valid) - s.done_ids
        for item_id in sorted(names - valid):
            strays.append(layout.sidecar_key(run_id, name, item_id))
        for item_id in sorted(failed.get(name, set()) - valid):
            strays.append(layout.error_key(run_id, name, item_id))
    for key in strays:
        log.warning("ignoring %s: not an object of a planned item", storage.url(key))
    return progress


def _listed_sidecars(storage: Storage, plan: RunPlan, strays: list[str], etags: dict) -> dict[str, set[str]]:
    """Names listed under each shard's ``meta/`` folder."""
    shards = set(plan.shards)
    # One request per shard, or total/1000 requests for the whole run: whichever is fewer.
    if len(plan.shards) > -(-plan.row_count // LIST_PAGE):
        prefix = layout.meta_prefix(plan.run_id)
        return _grouped(_pairs_under(storage, prefix, ".json", strays, etags), shards, strays, prefix)
    return {
        s: set(
            _names_under(storage, layout.sidecars_prefix(plan.run_id, s), ".json", depth=1, strays=strays, etags=etags)
        )
        for s in shards
    }


def _grouped(pairs: list[tuple[str, str]], shards, strays: list[str], prefix: str) -> dict[str, set[str]]:
    grouped: dict[str, set[str]] = defaultdict(set)
    for shard, item_id in pairs:
        if shard in shards:
            grouped[shard].add(item_id)
        else:
            strays.append(f"{prefix}{shard}/{item_id}.json")
    return grouped


def _needs_ids(plan: RunPlan, shard: str, listed: dict[str, set[str]], failed: dict[str, set[str]]) -> bool:
    names = listed.get(shard, set())
    if not names and shard not in failed:
        return False
    return shard in failed or plan.shard_digest(shard) != ids_digest(names)


def _planned_ids(storage: Storage, plan: RunPlan, shards: list[str]) -> dict[str, set[str]]:
    def ids(shard: str) -> set[str]:
        return {item.id for item in load_shard_items(storage, plan.run_id, shard)}

    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="progress-plan") as pool:
        return dict(zip(shards, pool.map(ids, shards), strict=True))


def _names_under(
    storage: Storage, prefix: str, suffix: str, *, depth: int, strays: list[str], etags: dict | None = None
) -> list[str]:
    names = []
    for info in storage.list(prefix):
        rest = info.key[len(prefix) :]
        if rest.endswith(suffix) and rest.count("/") == depth - 1:
            names.append(rest[: -len(suffix)])
            if etags is not None:
                etags[info.key] = info.etag
        else:
            strays.append(info.key)
    return names


def _pairs_under(storage: Storage, prefix: str, suffix: str, strays: list[str], etags=None) -> list[tuple[str, str]]:
    """(shard, item id) for every ``<prefix><shard>/<id><suffix>`` key."""
    names = _names_under(storage, prefix, suffix, depth=2, strays=strays, etags=etags)
    return [tuple(name.split("/", 1)) for name in names]
