"""Reuse of committed videos: the output's content map and the plan's list of items to copy instead of generate.

The content map (``_content/``) says, per content key (``batchgen.core.content``), which committed item of which
run holds that video. It grows with the index: each index part a worker or finaliser writes has a content part
beside it (``_content/<run>/<shard>-<digest>.parquet``, same digest), and building a run's index merges them into
``_content/<run>.parquet``, which names the parts it holds. Finding the reusable items of a new manifest is one
listing of ``_content/`` plus one read per run (and one per part written since that run's index): never a read per
earlier item. Sidecars only appear, so an out-of-date part is still true; the worker reads the source's sidecar
before copying anyway.

Planning writes ``<run>/plan/reuse/<shard>.parquet`` (item id -> source run, shard, id) for the shards that have
items to copy, before ``run.json`` commits the plan. The copy itself happens in the worker (``worker.reuse``), as
part of the item's commit: see there for why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchgen.core import layout
from batchgen.core.config import GenerationConfig, RunConfig
from batchgen.core.content import content_keys
from batchgen.core.errors import NotFoundError
from batchgen.core.item import ShapeGroup
from batchgen.storage.base import Storage

CONTENT_SCHEMA = pa.schema(
    [("content_key", pa.string()), ("run_id", pa.string()), ("shard", pa.string()), ("id", pa.string())]
)
"""A content map row: the committed item (run, shard, id) that holds the video of ``content_key``."""
SOURCE_SCHEMA = pa.schema(
    [("id", pa.string()), ("source_run_id", pa.string()), ("source_shard", pa.string()), ("source_id", pa.string())]
)
"""A row of ``plan/reuse/<shard>.parquet``: the item ``id`` is a copy of the committed item ``source_*``."""
READ_THREADS = 32
PARTS_META = b"batchgen.content_parts"


@dataclass(frozen=True)
class Source:
    run_id: str
    shard: str
    id: str

    @property
    def sidecar_key(self) -> str:
        return layout.sidecar_key(self.run_id, self.shard, self.id)


@dataclass(frozen=True)
class ReusePlan:
    """What the plan copies instead of generating, stored in ``run.json``."""

    copies: int
    """Items copied from committed videos of earlier runs under this output."""
    duplicates: int
    """Rows with the same content as an earlier row of this manifest: generated once, copied for the others."""
    shards: tuple[str, ...]
    """Shards with a ``plan/reuse/<shard>.parquet``."""
    note: str
    """Why nothing was looked up (unknown weights), or '' when it was."""
    generate_shapes: tuple[ShapeGroup, ...]
    """The shape tally of the items left to generate: what estimates count."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "copies": self.copies,
            "duplicates": self.duplicates,
            "shards": list(self.shards),
            "note": self.note,
            "generate_shapes": [g.to_dict() for g in self.generate_shapes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReusePlan:
        return cls(
            copies=int(data["copies"]),
            duplicates=int(data["duplicates"]),
            shards=tuple(data["shards"]),
            note=str(data["note"]),
            generate_shapes=tuple(ShapeGroup.from_dict(g) for g in data["generate_shapes"]),
        )

    @property
    def reused(self) -> int:
        return self.copies + self.duplicates

    def describe(self, row_count: int) -> str:
        text = (
            f"{self.reused} reused ({self.copies} copied from earlier runs, {self.duplicates} duplicate rows), "
            f"{row_count - self.reused} to generate"
        )
        return f"{text}; {self.note}" if self.note else text


# -- the content map ----------------------------------------------------------------------------------------


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def content_rows(index_rows: pa.Table) -> pa.Table:
    """The content map rows of index rows: items whose content key and weights are known (an item made with
    unknown weights can match nothing)."""
    known = pc.and_(
        pc.not_equal(pc.fill_null(index_rows.column("content_key"), ""), ""),
        pc.not_equal(pc.fill_null(index_rows.column("model_fingerprint"), ""), ""),
    )
    return index_rows.filter(known).select(CONTENT_SCHEMA.names).cast(CONTENT_SCHEMA)


def write_content_part(storage: Storage, run_id: str, shard: str, digest: str, index_rows: pa.Table) -> None:
    """The content part beside the index part ``<shard>-<digest>`` (``index_rows`` are that part's rows)."""
    rows = content_rows(index_rows)
    if rows.num_rows:
        storage.put_bytes(
            layout.content_part_key(run_id, shard, digest),
            _parquet_bytes(rows),
            content_type="application/vnd.apache.parquet",
        )


def write_content_run(storage: Storage, run_id: str, index_file: str, part_names: list[str]) -> None:
    """``_content/<run>.parquet`` from the run's assembled index file; it names the index parts it holds."""
    rows = content_rows(pq.read_table(index_file, columns=[*CONTENT_SCHEMA.names, "model_fingerprint"]))
    rows = rows.replace_schema_metadata({PARTS_META: json.dumps(sorted(part_names)).encode()})
    storage.put_bytes(
        layout.content_run_key(run_id), _parquet_bytes(rows), content_type="application/vnd.apache.parquet"
    )


def _content_files(storage: Storage, exclude_run: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """One listing of ``_content/``: (run -> merged file key, run -> {part name -> key})."""
    merged: dict[str, str] = {}
    parts: dict[str, dict[str, str]] = {}
    root = layout.content_root()
    for info in storage.list(root):
        rest = info.key[len(root) :]
        if "/" in rest:
            run_id, name = rest.split("/", 1)
            parts.setdefault(run_id, {})[name.removesuffix(".parquet")] = info.key
        else:
            merged[rest.removesuffix(".parquet")] = info.key
    merged.pop(exclude_run, None)
    parts.pop(exclude_run, None)
    return merged, parts


def _read(storage: Storage, key: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(storage.get_bytes(key)))
    except NotFoundError:
        return CONTENT_SCHEMA.empty_table()  # replaced by a concurrent finaliser: its newer file is listed next time


def load_content_map(storage: Storage, *, exclude_run: str = "") -> pa.Table:
    """Every content map row of the output (but ``exclude_run``'s): merged files first, then the parts none of
    them holds."""
    merged, parts = _content_files(storage, exclude_run)
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="content-get") as pool:
        tables = list(pool.map(lambda key: _read(storage, key), merged.values()))
        held = set()
        for run_id, table in zip(merged, tables, strict=True):
            names = json.loads((table.schema.metadata or {}).get(PARTS_META, b"[]"))
            held |= {(run_id, name) for name in names}
        extra = [key for run_id, named in parts.items() for name, key in named.items() if (run_id, name) not in held]
        tables += list(pool.map(lambda key: _read(storage, key), extra))
    tables = [t.select(CONTENT_SCHEMA.names).cast(CONTENT_SCHEMA) for t in tables]
    return pa.concat_tables([CONTENT_SCHEMA.empty_table(), *tables])


def find_sources(storage: Storage, keys: list[str], *, exclude_run: str) -> dict[str, Source]:
    """Per content key among ``keys`` that some committed item of another run holds, that item (the first by run,
    shard and id, so the choice is deterministic)."""
    table = load_content_map(storage, exclude_run=exclude_run)
    table = table.filter(pc.is_in(table.column("content_key"), value_set=pa.array(sorted(set(keys)), pa.string())))
    table = table.sort_by(
        [("content_key", "ascending"), ("run_id", "ascending"), ("shard", "ascending"), ("id", "ascending")]
    )
    sources: dict[str, Source] = {}
    for key, run_id, shard, item_id in zip(*(table.column(n).to_pylist() for n in CONTENT_SCHEMA.names), strict=True):
        sources.setdefault(key, Source(run_id, shard, item_id))
    return sources


# -- planning -----------------------------------------------------------------------------------------------


def plan_sources(
    storage: Storage, run_id: str, config: RunConfig, batches: Iterator[pa.RecordBatch]
) -> tuple[dict[int, Source], list[str], str]:
    """Per row to copy, its source; every row's id; the note when earlier runs were not searched.

    A row whose content an earlier row of the manifest has is a duplicate: it copies what that row's item gets (the
    same earlier run's video, or the row's own, generated in this run). Earlier runs are searched only when the
    weights are known, because a content key made without them matches nothing made with them."""
    shard_size, weights = config.worker.shard_size, config.model.weights
    keys: list[str] = []
    ids: list[str] = []
    for batch in batches:
        ids += batch.column("id").to_pylist()
        keys += content_keys(batch, config.generation, config.model.family, weights)
    first: dict[str, int] = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    note = ""
    earlier: dict[str, Source] = {}
    if weights:
        earlier = find_sources(storage, list(first), exclude_run=run_id)
    else:
        note = "nothing reused from earlier runs: the weights are unknown (pass --model-dir or --weights-fingerprint)"
    sources: dict[int, Source] = {}
    for row, key in enumerate(keys):
        if key in earlier:
            sources[row] = earlier[key]
        elif first[key] != row:
            sources[row] = Source(run_id, layout.shard_id(first[key] // shard_size), ids[first[key]])
    return sources, ids, note


def duplicate_rows(
    batches: Iterator[pa.RecordBatch], generation: GenerationConfig, family: str
) -> dict[int, list[int]]:
    """Rows whose content an earlier row has, by that first row (0-based). The weights are left out of the keys
    compared: two rows of one manifest are made with the same weights, whichever they are."""
    first: dict[str, int] = {}
    duplicates: dict[int, list[int]] = {}
    row = 0
    for batch in batches:
        for key in content_keys(batch, generation, family, ""):
            if key in first:
                duplicates.setdefault(first[key], []).append(row)
            else:
                first[key] = row
            row += 1
    return duplicates


def duplicate_warnings(duplicates: dict[int, list[int]]) -> list[str]:
    return [
        f"row(s) {', '.join(map(str, rows))} have the same content as row {row} (prompt, seed and settings): "
        "generated once, copied for the others"
        for row, rows in sorted(duplicates.items())
    ]


def write_reuse_files(
    storage: Storage, run_id: str, shard_size: int, ids: list[str], sources: dict[int, Source]
) -> list[str]:
    """``plan/reuse/<shard>.parquet`` per shard with rows to copy; returns those shards in order."""
    by_shard: dict[str, list[tuple[str, Source]]] = {}
    for row in sorted(sources):
        by_shard.setdefault(layout.shard_id(row // shard_size), []).append((ids[row], sources[row]))

    def put(shard: str) -> None:
        entries = by_shard[shard]
        table = pa.table(
            [
                [item_id for item_id, _ in entries],
                [s.run_id for _, s in entries],
                [s.shard for _, s in entries],
                [s.id for _, s in entries],
            ],
            schema=SOURCE_SCHEMA,
        )
        storage.put_bytes(
            layout.reuse_plan_key(run_id, shard), _parquet_bytes(table), content_type="application/vnd.apache.parquet"
        )

    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="reuse-put") as pool:
        list(pool.map(put, by_shard))
    return sorted(by_shard)


def load_shard_sources(storage: Storage, run_id: str, shard: str) -> dict[str, Source]:
    """The items of ``shard`` to copy, by id."""
    table = pq.read_table(pa.BufferReader(storage.get_bytes(layout.reuse_plan_key(run_id, shard))))
    columns = [table.column(name).to_pylist() for name in SOURCE_SCHEMA.names]
    return {item_id: Source(run, src_shard, src_id) for item_id, run, src_shard, src_id in zip(*columns, strict=True)}


def copy_mask(row_count: int, sources: dict[int, Source]) -> np.ndarray:
    mask = np.zeros(row_count, dtype=bool)
    mask[list(sources)] = True
    return mask
