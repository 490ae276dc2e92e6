"""A run's progress, derived from the plan's item ids and the sidecars that exist, never from a marker that can
go stale.

- ``meta/`` (one listing of the whole run, or one per shard when that is fewer requests; for a subset of the
  shards, one listing of each run of consecutive shards' key range, or one per shard): the done items. Only
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
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from batchgen.core import layout
from batchgen.core.plan import RunPlan, ids_digest, load_shard_items
from batchgen.storage.base import ObjectInfo, Storage

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


def scan_run(storage: Storage, plan: RunPlan, shards: Collection[str] | None = None) -> RunProgress:
    """The progress of every shard, or with ``shards`` of those shards only (the run controller's passes).

    With ``shards``, each listing covers only the key ranges of the given shards (runs of consecutive shards, one
    range each) and only their plan files are read, so the requests made do not grow with the shards left out.
    """
    run_id = plan.run_id
    spans = [_Span(list(plan.shards), bounded=False)] if shards is None else _spans(plan.shards, set(shards))
    chosen = [s for span in spans for s in span.shards]
    progress = RunProgress(run_id, {s: ShardProgress(s, plan.items_in_shard(s)) for s in chosen})
    shards_of = progress.shards
    strays = progress.strays
    for span in spans:
        for shard in _names_under(storage, layout.stats_prefix(run_id), ".json", depth=1, strays=strays, span=span):
            if shard in shards_of:
                shards_of[shard].stats_written = True
    etags: dict[str, str | None] = {}
    listed = _listed_sidecars(storage, plan, spans, strays, etags)
    errors = layout.errors_root(run_id)
    pairs = [pair for span in spans for pair in _pairs_under(storage, errors, ".json", strays, span=span)]
    failed = _grouped(pairs, shards_of, strays, partial(layout.error_key, run_id))
    ids_of = _planned_ids(storage, plan, [s for s in chosen if _needs_ids(plan, s, listed, failed)])
    for name, s in shards_of.items():
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


@dataclass
class _Span:
    """Consecutive shards of the plan, listed as one key range under each prefix."""

    shards: list[str]
    bounded: bool = True
    """False: list everything under the prefix (a whole-run scan also reports strays outside the shards)."""


def _spans(planned: list[str], wanted: set[str]) -> list[_Span]:
    """The wanted shards as runs of consecutive plan shards: one listing per run covers only their keys."""
    spans: list[_Span] = []
    previous = None
    for index, shard in enumerate(planned):
        if shard not in wanted:
            continue
        if previous is None or previous != index - 1:
            spans.append(_Span([]))
        spans[-1].shards.append(shard)
        previous = index
    return spans


def _objects(storage: Storage, prefix: str, span: _Span) -> Iterator[ObjectInfo]:
    """Objects under ``prefix``; for a bounded span only the keys of its shards. Shard names are zero-padded, so
    a shard's keys sort together and in plan order: the listing starts at the first and stops past the last
    (its remaining pages are never requested)."""
    if not span.bounded:
        yield from storage.list(prefix)
        return
    last = prefix + span.shards[-1]
    for info in storage.list(prefix, start_after=prefix + span.shards[0]):
        if info.key > last and not info.key.startswith(last):
            return
        yield info


def _listed_sidecars(
    storage: Storage, plan: RunPlan, spans: list[_Span], strays: list[str], etags: dict
) -> dict[str, set[str]]:
    """Names listed under each shard's ``meta/`` folder."""
    listed: dict[str, set[str]] = {}
    prefix = layout.meta_prefix(plan.run_id)
    for span in spans:
        # One request per shard, or items/1000 requests for the span's range: whichever is fewer.
        if len(span.shards) > -(-sum(plan.items_in_shard(s) for s in span.shards) // LIST_PAGE):
            pairs = _pairs_under(storage, prefix, ".json", strays, etags, span=span)
            listed.update(_grouped(pairs, set(span.shards), strays, partial(layout.sidecar_key, plan.run_id)))
            continue
        for s in span.shards:
            sidecars = layout.sidecars_prefix(plan.run_id, s)
            listed[s] = set(_names_under(storage, sidecars, ".json", depth=1, strays=strays, etags=etags))
    return listed


def _grouped(pairs: list[tuple[str, str]], shards, strays: list[str], key_of) -> dict[str, set[str]]:
    """(shard, item id) pairs by shard; pairs of other shards go to ``strays`` as their keys (``key_of``)."""
    grouped: dict[str, set[str]] = defaultdict(set)
    for shard, item_id in pairs:
        if shard in shards:
            grouped[shard].add(item_id)
        else:
            strays.append(key_of(shard, item_id))
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
    storage: Storage,
    prefix: str,
    suffix: str,
    *,
    depth: int,
    strays: list[str],
    etags: dict | None = None,
    span: _Span | None = None,
) -> list[str]:
    names = []
    objects = storage.list(prefix) if span is None else _objects(storage, prefix, span)
    for info in objects:
        rest = info.key[len(prefix) :]
        if rest.endswith(suffix) and rest.count("/") == depth - 1:
            names.append(rest[: -len(suffix)])
            if etags is not None:
                etags[info.key] = info.etag
        else:
            strays.append(info.key)
    return names


def _pairs_under(
    storage: Storage, prefix: str, suffix: str, strays: list[str], etags=None, *, span: _Span
) -> list[tuple[str, str]]:
    """(shard, item id) for every ``<prefix><shard>/<id><suffix>`` key."""
    names = _names_under(storage, prefix, suffix, depth=2, strays=strays, etags=etags, span=span)
    return [(shard, item_id) for shard, _, item_id in (name.partition("/") for name in names)]


# A listing page holds 1000 keys. Ranges a little smaller than a page let each concurrent lister see the next
# range's first key on its only page and stop there, so listing N keys by ranges still costs about N/900
# requests, while their latencies overlap instead of adding up.
_KEYS_PER_RANGE = 900
_LIST_THREADS = 8


def ids_under(
    storage: Storage, prefix: str, suffix: str, ids: set[str], *, by_ranges: bool, etags: dict | None = None
) -> set[str]:
    """The ids of ``ids`` that have an object ``<prefix><id><suffix>`` (the done set of one shard, when ``prefix`` is
    its sidecars' folder), from listings only. ``by_ranges``: list key ranges of about a page each concurrently
    (large shards); ``etags`` collects each found object's etag. Other keys under the prefix are logged."""
    expected = sorted(prefix + item_id + suffix for item_id in ids)
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
