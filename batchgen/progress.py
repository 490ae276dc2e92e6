"""A run's progress, derived from storage alone (listings only, never a read per item).

- ``stats/`` (one listing for the run): which shards finished a full pass.
- ``errors/`` (one listing for the run): items that failed their attempts and are not done.
- ``meta/``: the done items. A finished shard without failures is complete by construction (its stats are
  written only after every item was committed or recorded as failed), so only the other shards are listed:
  one listing per such shard, or one listing of the whole run's ``meta/`` when that is fewer requests.

Shard sizes come from the plan (shards are consecutive runs of ``shard_size`` manifest rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from batchgen import layout
from batchgen.plan import RunPlan
from batchgen.storage.base import Storage

log = logging.getLogger("batchgen.progress")

LIST_PAGE = 1000  # keys per listing request on S3


@dataclass
class ShardProgress:
    shard: str
    total: int
    done: int = 0
    failed: int = 0
    """Items with an error record and no sidecar."""
    finished: bool = False
    """The shard's stats exist: a worker completed a full pass over it."""

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed


@dataclass
class RunProgress:
    run_id: str
    shards: dict[str, ShardProgress] = field(default_factory=dict)

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
        """Shards with stats written and no failed item: nothing left to do there."""
        return {s.shard for s in self.shards.values() if s.finished and s.failed == 0 and s.done == s.total}

    @property
    def unfinished_shards(self) -> list[str]:
        """Shards a worker still has to visit, in shard order."""
        finished = self.finished_shards
        return [shard for shard in self.shards if shard not in finished]

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

    for shard in _names_under(storage, layout.stats_prefix(run_id), ".json", depth=1):
        if shard in shards:
            shards[shard].finished = True

    failed_ids: dict[str, set[str]] = {}
    for shard, item_id in _pairs_under(storage, f"{run_id}/errors/", ".json"):
        if shard in shards:
            failed_ids.setdefault(shard, set()).add(item_id)

    to_list = [s for s in shards.values() if not (s.finished and s.shard not in failed_ids)]
    for s in shards.values():
        if s not in to_list:
            s.done = s.total
    done_ids: dict[str, set[str]] = {}
    if to_list:
        # One request per shard, or total/1000 requests for the whole run: whichever is fewer.
        whole_run_requests = -(-progress.total // LIST_PAGE)
        if len(to_list) > whole_run_requests:
            for shard, item_id in _pairs_under(storage, layout.meta_prefix(run_id), ".json"):
                done_ids.setdefault(shard, set()).add(item_id)
        else:
            for s in to_list:
                prefix = layout.sidecars_prefix(run_id, s.shard)
                done_ids[s.shard] = set(_names_under(storage, prefix, ".json", depth=1))
        for s in to_list:
            s.done = min(len(done_ids.get(s.shard, ())), s.total)
    for shard, ids in failed_ids.items():
        shards[shard].failed = len(ids - done_ids.get(shard, set()))
    return progress


def _names_under(storage: Storage, prefix: str, suffix: str, *, depth: int) -> list[str]:
    names = []
    for info in storage.list(prefix):
        rest = info.key[len(prefix) :]
        if rest.endswith(suffix) and rest.count("/") == depth - 1:
            names.append(rest[: -len(suffix)])
    return names


def _pairs_under(storage: Storage, prefix: str, suffix: str) -> list[tuple[str, str]]:
    """(shard, item id) for every ``<prefix><shard>/<id><suffix>`` key."""
    return [tuple(name.split("/", 1)) for name in _names_under(storage, prefix, suffix, depth=2)]
