"""The records the worker writes, defined once: the sidecar (``meta/<shard>/<id>.json``, which the index reads back:
its fixed columns are derived from these fields, nested objects flattened with ``_``), the error record, the
shard's stats and the weights' pin.

A sidecar is the item's commit marker, so reading one also checks that it is what its key says it is: a copy
of another item's sidecar under a planned id must not count that item as done.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from batchgen.core.item import ARROW_TYPES, Item

# Nested objects with a fixed set of keys: each becomes columns ``<object>_<key>`` of these types in the index.
NESTED_COLUMNS: dict[str, dict[str, pa.DataType]] = {
    # family: null for videos committed before runs had one (they are all Mochi's).
    "model": {"family": pa.string(), "path": pa.string(), "fingerprint": pa.string()},
    "timings": {name: pa.float64() for name in ("text_encode", "denoise", "decode", "encode_mp4", "upload")},
    "parallel": {"world_size": pa.int64(), "dp_size": pa.int64()},
    # batchgen.core.quality's measurements (null for videos committed before the gate existed).
    "quality": {
        **{name: pa.float64() for name in ("luma_mean", "luma_min", "luma_max", "black_frame_fraction", "motion_mean")},
        "flags": pa.list_(pa.string()),
    },
    # Where a reused video was copied from (``batchgen.dataset.reuse``); null for generated ones.
    "reused_from": {"run_id": pa.string(), "key": pa.string()},
}
# The index replaces these with ``key`` and ``uri`` (the URI of the storage the index was built from).
INDEX_RENAMED = ("video_key", "video_uri")


def json_bytes(data: dict[str, Any]) -> bytes:
    """How every record is stored: indented UTF-8 JSON with a final newline."""
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


class SidecarError(ValueError):
    """A sidecar that is not valid JSON, lacks fields or describes another item."""


def _carries_the_item(klass: type) -> type:
    """Refuse, when batchgen is imported, a sidecar that does not carry every ``Item`` field with the same type: the
    sidecar keeps its own field order (the index's column order and the JSON's key order are outputs), but what an
    item is stays declared once, in ``Item``."""
    hints, item_hints = typing.get_type_hints(klass), typing.get_type_hints(Item)
    missing = [name for name, kind in item_hints.items() if hints.get(name) is not kind]
    if missing:
        raise TypeError(f"{klass.__name__} must carry Item's fields {missing} with Item's types")
    return klass


@_carries_the_item
@dataclass
class Sidecar:
    id: str
    shard: str
    run_id: str
    row: int
    prompt: str
    negative_prompt: str
    seed: int
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    fps: int
    crf: int
    video_key: str
    video_uri: str
    sha256: str
    size_bytes: int
    frames: int
    video_width: int
    video_height: int
    duration_s: float
    model: dict[str, Any]
    timings: dict[str, float]
    attempt: int
    host: str
    batchgen_version: str
    parallel: dict[str, Any]
    created_at: str
    adopted: bool
    extra: dict[str, Any] = field(default_factory=dict)
    """Generator-specific fields; written only when not empty."""
    quality: dict[str, Any] = field(default_factory=dict)
    """batchgen.core.quality's measurements and flags of the stored video."""
    content_key: str = ""
    """``batchgen.core.content.content_key`` of the item with the weights that made it ('' in older sidecars)."""
    reused_from: dict[str, Any] = field(default_factory=dict)
    """``{'run_id', 'key'}`` of the committed video this one is a copy of; written only when not empty."""

    @classmethod
    def for_item(cls, item: Item, **fields: Any) -> Sidecar:
        return cls(**item.to_dict(), **fields)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for optional in ("extra", "reused_from"):
            if not data[optional]:
                del data[optional]
        return data

    def to_json(self) -> bytes:
        return json_bytes(self.to_dict())

    @classmethod
    def parse(cls, data: bytes, *, run_id: str, shard: str, item_id: str) -> dict[str, Any]:
        """The sidecar stored under ``meta/<shard>/<item_id>.json`` as a dict (unknown fields kept, for sidecars
        written by newer versions); SidecarError if it is unreadable or describes another item."""
        try:
            record = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise SidecarError(f"not JSON ({e})") from None
        if not isinstance(record, dict):
            raise SidecarError("not a JSON object")
        optional = {"extra", "quality", "content_key", "reused_from"}  # absent from older sidecars too
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in record and f.name not in optional]
        if missing:
            raise SidecarError(f"missing field(s) {', '.join(missing)}")
        found = (record["run_id"], record["shard"], record["id"])
        if found != (run_id, shard, item_id):
            raise SidecarError(f"describes {'/'.join(map(str, found))}, not {run_id}/{shard}/{item_id}")
        return record


@dataclass(frozen=True)
class ErrorRecord:
    """``errors/<shard>/<id>.json``: an item that failed every attempt of a worker (removed once it commits)."""

    id: str
    shard: str
    run_id: str
    row: int
    attempts: int
    """Attempts of the worker that recorded it."""
    launch_attempt: int
    """How many times the worker's job had been launched before."""
    error: str
    """The last attempt's exception, ``Type: message``."""
    host: str
    rank: int
    batchgen_version: str
    created_at: str

    def to_json(self) -> bytes:
        return json_bytes(dataclasses.asdict(self))


@dataclass(frozen=True)
class ShardStats:
    """``stats/<shard>.json``, written last by the worker that finished a pass over the shard. A cache of the
    counts for people and dashboards: progress is always derived from the sidecars (``core.progress``)."""

    shard: str
    run_id: str
    total: int
    done: int
    failed: int
    resumed: int
    adopted: int
    committed_during_pass: int
    seconds: float
    host: str
    world_size: int
    batchgen_version: str
    finished_at: str

    def to_json(self) -> bytes:
        return json_bytes(dataclasses.asdict(self))


@dataclass(frozen=True)
class ModelPin:
    """``plan/model.json``: the weights of the run's first commit; every later commit must have the same."""

    fingerprint: str
    path: str | None
    host: str
    pinned_at: str

    def to_json(self) -> bytes:
        return json_bytes(dataclasses.asdict(self))


def index_schema() -> pa.Schema:
    """The index's fixed columns, in order: key, uri, sidecar_key, then the sidecar's fields flattened."""
    columns = [("key", pa.string()), ("uri", pa.string()), ("sidecar_key", pa.string())]
    hints = typing.get_type_hints(Sidecar)
    for f in dataclasses.fields(Sidecar):
        if f.name in INDEX_RENAMED or f.name == "extra":
            continue
        if f.name in NESTED_COLUMNS:
            columns += [(f"{f.name}_{key}", kind) for key, kind in NESTED_COLUMNS[f.name].items()]
        elif f.name == "created_at":
            columns.append((f.name, pa.timestamp("ms", tz="UTC")))
        else:
            columns.append((f.name, ARROW_TYPES[hints[f.name]]))
    return pa.schema(columns)
