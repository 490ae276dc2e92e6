"""Reading a run while it generates: ``open_run(uri).follow(poll=30, start_after=cursor)``.

Each poll costs one HEAD of ``_SUCCESS.json``, a listing of ``<run>/meta/`` (one request per 1000 committed items,
never one per item) and one read of a shard's plan file the first time an item of that shard appears (for the
prompt and the settings). A sidecar is the item's commit marker, so a listed sidecar is a committed item.

Order and the cursor: items are yielded in commit order, taken as their sidecars' last-modified time (then key),
each once. The cursor is a watermark ``w`` (every sidecar modified before it has been yielded) plus the ids yielded
at or after it, so it stays small however long the run. A sidecar can appear in a listing after one with a later
time (its PUT started first and finished last), so the watermark trails the newest time seen by ``SKEW_S``: an item
is only missed if its PUT took longer than that. The follower stops after the poll that saw ``_SUCCESS.json``
before listing (the marker is written after every item is committed, so that listing holds them all).
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from batchgen.core import layout
from batchgen.core.errors import InputError
from batchgen.core.item import Item
from batchgen.core.plan import RunPlan, load_shard_items
from batchgen.storage.base import ObjectInfo, Storage

SKEW_S = 300.0
"""How far the watermark trails the newest commit seen: longer than any sidecar PUT takes."""


@dataclass
class Cursor:
    """Where a follower is: everything committed before ``watermark`` and the ids in ``recent`` were yielded."""

    watermark: float = 0.0
    recent: dict[str, float] = field(default_factory=dict)
    """Yielded item id -> its sidecar's time, for those at or after the watermark."""

    def seen(self, item_id: str, modified: float) -> bool:
        return modified < self.watermark or item_id in self.recent

    def advance(self, watermark: float) -> None:
        if watermark > self.watermark:
            self.watermark = watermark
            self.recent = {i: t for i, t in self.recent.items() if t >= watermark}

    def __str__(self) -> str:
        payload = json.dumps({"w": self.watermark, "r": self.recent}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(zlib.compress(payload)).decode()

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        if not text:
            return cls()
        try:
            data = json.loads(zlib.decompress(base64.urlsafe_b64decode(text.encode())))
            return cls(float(data["w"]), {str(k): float(v) for k, v in data["r"].items()})
        except (ValueError, KeyError, TypeError, AttributeError, zlib.error) as e:
            raise InputError(f"start_after: {text[:40]!r}... is not a cursor printed by follow or tail ({e})") from None


@dataclass(frozen=True)
class Committed:
    """One committed item as ``follow`` sees it: the planned item, where its video is, when it was committed, and
    the cursor to resume after it. Reading the video or its sidecar is up to the consumer."""

    item: Item
    shard: str
    key: str
    uri: str
    sidecar_key: str
    committed_at: float
    cursor: str

    def to_dict(self) -> dict:
        fields = {"shard": self.shard, "key": self.key, "uri": self.uri, "sidecar_key": self.sidecar_key}
        return {**self.item.to_dict(), **fields, "committed_at": self.committed_at, "cursor": self.cursor}


class Follower:
    """Iterating yields ``Committed`` items until the run is complete (with ``once``: after one poll);
    ``cursor`` is the position after the last item, ``complete`` whether ``_SUCCESS.json`` was seen."""

    def __init__(
        self, storage: Storage, plan: RunPlan, *, poll: float, start_after: str | None, once: bool, sleep: Callable
    ):
        if poll <= 0:
            raise InputError(f"poll must be positive, got {poll}")
        self.storage, self.plan, self.poll, self.once = storage, plan, poll, once
        self.complete = False
        self._cursor = Cursor.parse(start_after)
        self._items: dict[str, dict[str, Item]] = {}
        self._sleep = sleep

    @property
    def cursor(self) -> str:
        return str(self._cursor)

    def __iter__(self) -> Iterator[Committed]:
        while True:
            complete = self.storage.exists(layout.success_key(self.plan.run_id))
            yield from self._new_items()
            self.complete = complete
            if complete or self.once:
                return
            self._sleep(self.poll)

    def _new_items(self) -> Iterator[Committed]:
        listed = list(self.storage.list(layout.meta_prefix(self.plan.run_id)))
        fresh = sorted(
            (info for info in listed if not self._cursor.seen(layout.item_id_from_key(info.key), _time(info))),
            key=lambda info: (_time(info), info.key),
        )
        newest = max((_time(info) for info in listed), default=0.0)
        self._cursor.advance(min(newest - SKEW_S, _time(fresh[0]) if fresh else newest))
        for info in fresh:
            item_id, shard = layout.item_id_from_key(info.key), info.key.split("/")[-2]
            item = self._item(shard, item_id)
            if item is None:
                continue  # not a planned item of that shard: no commit of this run
            self._cursor.recent[item_id] = _time(info)
            key = layout.video_key(self.plan.run_id, shard, item_id)
            yield Committed(item, shard, key, self.storage.url(key), info.key, _time(info), self.cursor)

    def _item(self, shard: str, item_id: str) -> Item | None:
        if shard not in self._items:
            if shard not in self.plan.shards:
                return None
            self._items[shard] = {item.id: item for item in load_shard_items(self.storage, self.plan.run_id, shard)}
        return self._items[shard].get(item_id)


def _time(info: ObjectInfo) -> float:
    return info.modified or 0.0


def follow(
    storage: Storage,
    plan: RunPlan,
    *,
    poll: float = 30,
    start_after: str | None = None,
    once: bool = False,
    sleep: Callable = time.sleep,
) -> Follower:
    return Follower(storage, plan, poll=poll, start_after=start_after, once=once, sleep=sleep)
