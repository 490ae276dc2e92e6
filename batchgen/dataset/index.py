"""The run's index: one Parquet row per committed video, built from the sidecars of the plan's items alone, and
the run-level success marker.

Columns: ``key`` (the video's object key), ``uri`` (its full URI in the storage the index was built from),
``sidecar_key``, then every sidecar field (``batchgen.core.records.Sidecar``) with nested objects flattened by ``_``
(``model_path``, ``model_fingerprint``, ``timings_denoise``, ``parallel_ulysses``...). The known fields have fixed
types, so an index of adopted videos (no timings) has the same schema as any other; ``created_at`` is a UTC
timestamp. Rows are in manifest order. The file is written with one atomic put, so readers see the old index or
the new one, never a partial file.

Parts: each shard's rows live in ``index/parts/<shard>-<digest>.parquet``, ``<digest>`` naming the sidecars (ids
and etags) they came from. The worker writes its shard's part when the shard finishes; finalising lists
``index/parts/`` once, builds only the parts whose digest no longer matches the listing, and streams the parts into
the run index (about one request per shard, memory bounded by one row group). A complete run whose parts, index and
marker are current is left untouched: a rerun writes nothing.

Finalising is safe against concurrent finalisers (``index``, ``run``, the controller): see ``finalize``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen import __version__
from batchgen.core import layout
from batchgen.core.errors import AlreadyExistsError, ChangedError, NotFoundError, StorageError, TransientStorageError
from batchgen.core.logs import log_context
from batchgen.core.plan import RunPlan
from batchgen.core.progress import RunProgress, scan_run
from batchgen.core.records import INDEX_RENAMED, Sidecar, SidecarError, index_schema
from batchgen.core.reuse import write_content_part, write_content_run
from batchgen.storage.base import Storage

log = logging.getLogger("batchgen.index")

READ_THREADS = 32  # sidecar gets are latency-bound
PART_THREADS = 8  # parts built by a finaliser (shards whose worker wrote none): each reads its sidecars in parallel
FINALIZE_ROUNDS = 5  # each lost round means another finaliser wrote a fresher index meanwhile
ROW_GROUP_ROWS = 65_536  # rows per row group of the run index: what the assembly holds in memory at once

BASE_SCHEMA = index_schema()
"""Fixed part of the schema, in column order. Anything else found in sidecars is appended (types inferred)."""


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in record.items():
        column = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{column}_"))
        else:
            out[column] = value
    return out


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def _row(storage: Storage, run_id: str, shard: str, item_id: str, known: dict | None) -> dict[str, Any]:
    sidecar_key = layout.sidecar_key(run_id, shard, item_id)
    try:
        sidecar = known or Sidecar.parse(storage.get_bytes(sidecar_key), run_id=run_id, shard=shard, item_id=item_id)
        row = {"key": sidecar["video_key"], "uri": storage.url(sidecar["video_key"]), "sidecar_key": sidecar_key}
        row.update((k, v) for k, v in flatten(sidecar).items() if k not in INDEX_RENAMED)
        row["created_at"] = _parse_time(row.get("created_at"))
    except (SidecarError, ValueError, TypeError) as e:
        raise StorageError(
            f"{storage.url(sidecar_key)} is not a valid sidecar: {e} (batchgen verify --repair makes the item pending)"
        ) from e
    return row


def shard_rows(
    storage: Storage, run_id: str, shard: str, ids, known: dict[str, dict] | None = None
) -> list[dict[str, Any]]:
    """Index rows of one shard's committed items, in manifest order: from ``known`` sidecar records (what a worker
    wrote itself), reading only the others."""
    known = known or {}

    def row(item_id: str) -> dict[str, Any]:
        return _row(storage, run_id, shard, item_id, known.get(item_id))

    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="index-get") as pool:
        rows = list(pool.map(row, sorted(ids)))
    rows.sort(key=lambda r: (r["row"], r["id"]))
    return rows


def index_table(rows: list[dict[str, Any]]) -> pa.Table:
    known = set(BASE_SCHEMA.names)
    extra_names = sorted({name for row in rows for name in row} - known)
    columns = {name: [row.get(name) for row in rows] for name in BASE_SCHEMA.names}
    arrays = [pa.array(columns[f.name], type=f.type) for f in BASE_SCHEMA]
    fields = list(BASE_SCHEMA)
    for name in extra_names:
        values = [row.get(name) for row in rows]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types across sidecars (e.g. an extra field that changed shape): keep it as JSON text.
            array = pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
        if pa.types.is_null(array.type):
            array = array.cast(pa.string())
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    schema = pa.schema(fields, metadata={"batchgen.version": __version__})
    return pa.Table.from_arrays(arrays, schema=schema)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# -- per-shard parts ----------------------------------------------------------------------------------------


def part_digest(etags: dict[str, str | None]) -> str:
    """Names the exact sidecars a part was built from (ids and etags): a changed, added or removed sidecar
    changes it, so a part whose key carries the digest of the current listing is current."""
    text = "\n".join(f"{item_id} {etags[item_id]}" for item_id in sorted(etags))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_part(
    storage: Storage, run_id: str, shard: str, etags: dict[str, str | None], known: dict[str, dict] | None = None
) -> str:
    """Write ``index/parts/<shard>-<digest>.parquet`` from the sidecars listed with ``etags``; returns its key."""
    digest = part_digest(etags)
    key = layout.index_part_key(run_id, shard, digest)
    table = index_table(shard_rows(storage, run_id, shard, etags, known))
    write_content_part(storage, run_id, shard, digest, table)  # first: a listed index part implies its content part
    storage.put_bytes(key, _parquet_bytes(table), content_type="application/vnd.apache.parquet")
    return key


def _current_parts(storage: Storage, plan: RunPlan, progress: RunProgress) -> tuple[list[str], list[str], int]:
    """(current part keys in shard order, stale part keys, parts built now). Parts are found by one listing of
    ``index/parts/``; a shard's part is built only when none carries the digest of its current sidecars."""
    prefix = layout.index_parts_prefix(plan.run_id)
    existing = {info.key for info in storage.list(prefix)}
    wanted = _wanted_parts(plan, progress)
    missing = [shard for shard, key in wanted.items() if key not in existing]
    with ThreadPoolExecutor(max_workers=PART_THREADS, thread_name_prefix="index-part") as pool:
        list(pool.map(lambda shard: write_part(storage, plan.run_id, shard, progress.shards[shard].etags), missing))
    current = [wanted[shard] for shard in plan.shards if shard in wanted]
    return current, sorted(existing - set(current)), len(missing)


def _wanted_parts(plan: RunPlan, progress: RunProgress) -> dict[str, str]:
    """shard -> the key of its current part, for every shard with done items."""
    return {
        s.shard: layout.index_part_key(plan.run_id, s.shard, part_digest(s.etags))
        for s in progress.shards.values()
        if s.done_ids
    }


def _assemble(storage: Storage, part_keys: list[str], folder: Path) -> tuple[Path, int]:
    """Stream the parts into one Parquet file on local disk: each part is downloaded to ``folder``, then the
    parts are appended in row groups of at most ``ROW_GROUP_ROWS`` rows, so memory holds one row group, never
    the whole index."""
    files = [folder / f"{i:08d}.parquet" for i in range(len(part_keys))]
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="index-part-get") as pool:
        list(pool.map(storage.get_file, part_keys, files))
    schema = _unified_schema([pq.read_schema(f) for f in files])
    dest = folder / "index.parquet"
    rows = 0
    with pq.ParquetWriter(dest, schema, compression="zstd") as writer:
        pending: list[pa.Table] = []
        buffered = 0
        for file in files:
            table = _conform(pq.read_table(file), schema)
            file.unlink()
            pending.append(table)
            buffered += table.num_rows
            if buffered >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending))
                rows, pending, buffered = rows + buffered, [], 0
        if pending or not rows:
            writer.write_table(pa.concat_tables(pending) if pending else schema.empty_table())
            rows += buffered
    return dest, rows


def _unified_schema(schemas: list[pa.Schema]) -> pa.Schema:
    unified = pa.unify_schemas([BASE_SCHEMA, *schemas], promote_options="permissive")
    fields = list(BASE_SCHEMA) + sorted((f for f in unified if f.name not in BASE_SCHEMA.names), key=lambda f: f.name)
    return pa.schema(fields, metadata={"batchgen.version": __version__})


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def build_index(storage: Storage, plan: RunPlan) -> int:
    """(Re)build ``<run>/index/index.parquet`` from the sidecars; returns the number of rows."""
    return finalize(storage, plan).rows


@dataclass(frozen=True)
class Finalized:
    complete: bool
    rows: int
    """Rows of the index."""
    progress: RunProgress
    """The view of the sidecars the index was built from."""
    written: bool = True
    """False when nothing had changed since the last finalising, so nothing was written."""


def finalize_run(storage: Storage, plan: RunPlan) -> bool:
    """Build the index and set the success marker; returns whether the run is complete."""
    return finalize(storage, plan).complete


def finalize(storage: Storage, plan: RunPlan) -> Finalized:
    """Build the index from the shards' parts, then write ``_SUCCESS.json`` iff every item is done (remove a
    stale one otherwise). A complete run whose parts, index and marker are all current is left untouched.

    Safe against concurrent finalisers without a lock, because sidecars only appear (``verify --repair`` removes
    one and then finalises itself):

    1. note the index's etag, then list the sidecars (and build the parts that are not current);
    2. replace the index only if it still has that etag (a conditional put): a finaliser whose listing is older
       than the stored index's loses here and starts over, so a staler index never replaces a fresher one;
    3. set the marker from our own view (write it naming our index's etag, or delete it);
    4. if the index has changed since our put, a newer finaliser may have set the marker before we did: start over.
       Otherwise our index is the newest, and any later finaliser sets the marker after us.
    """
    with log_context(run_id=plan.run_id):
        return _finalize_rounds(storage, plan)


def _finalize_rounds(storage: Storage, plan: RunPlan) -> Finalized:
    key = layout.index_key(plan.run_id)
    for _ in range(FINALIZE_ROUNDS):
        before = storage.head(key)
        progress = scan_run(storage, plan)
        parts, stale, built = _current_parts(storage, plan, progress)
        unchanged = _unchanged(storage, plan, progress, before, parts) if not built else None
        if unchanged is not None:
            log.info("index of %s is current (%d rows): nothing to write", plan.run_id, unchanged)
            return Finalized(True, unchanged, progress, written=False)
        with tempfile.TemporaryDirectory(prefix="batchgen-index-") as scratch:
            path, rows = _assemble(storage, parts, Path(scratch))
            data = path.read_bytes()
            write_content_run(storage, plan.run_id, str(path), [_part_name(key) for key in parts])
        try:
            etag = storage.put_bytes(
                key,
                data,
                if_absent=before is None,
                if_match=before.etag if before is not None else None,
                content_type="application/vnd.apache.parquet",
            )
        except (AlreadyExistsError, ChangedError):
            log.info("%s was replaced by a concurrent finaliser; building it again", storage.url(key))
            continue
        del data
        complete = progress.complete and rows == plan.row_count
        _set_success_marker(storage, plan, complete, rows, etag, _parts_digest(parts))
        after = storage.head(key)
        if after is not None and after.etag == etag:
            for stale_key in stale:
                storage.delete(stale_key)
            log.info("index of %s: %d rows -> %s", plan.run_id, rows, storage.url(key))
            return Finalized(complete, rows, progress)
    raise TransientStorageError(f"{storage.url(key)} kept changing under concurrent writers; run batchgen index again")


def _part_name(part_key: str) -> str:
    """'<run>/index/parts/<shard>-<digest>.parquet' -> '<shard>-<digest>', the name its content part shares."""
    return part_key.rsplit("/", 1)[-1].removesuffix(".parquet")


FLAGS_COLUMN = "quality_flags"
"""The quality gate's flags of each video (``Sidecar.quality["flags"]`` flattened): empty unless flagged."""
FLAGGED_HINT = f"black or frozen frames; the index's {FLAGS_COLUMN} says which"
"""What ``run`` and ``status`` say after the flagged count."""


def flagged_videos(storage: Storage, plan: RunPlan, progress: RunProgress) -> int:
    """Committed videos the quality gate flagged (black or frozen), from the run index when it is current (one
    read), else from each shard's current part (one read per shard with done items), else from the sidecars of a
    shard that has no current part yet (one a worker is still on)."""
    listed = {info.key for info in storage.list(layout.index_parts_prefix(plan.run_id))}
    shards = [s for s in progress.shards.values() if s.done_ids]
    wanted = _wanted_parts(plan, progress)
    index_key = layout.index_key(plan.run_id)
    current = [wanted[s] for s in plan.shards if s in wanted]
    if set(current) <= listed and _unchanged(storage, plan, progress, storage.head(index_key), current) is not None:
        return _flagged_in(storage, index_key)

    def count(shard) -> int:
        if wanted[shard.shard] in listed:
            try:
                return _flagged_in(storage, wanted[shard.shard])
            except NotFoundError:  # replaced since the listing: its sidecars say the same
                pass
        return sum(1 for row in shard_rows(storage, plan.run_id, shard.shard, shard.done_ids) if row.get(FLAGS_COLUMN))

    with ThreadPoolExecutor(max_workers=PART_THREADS, thread_name_prefix="index-flags") as pool:
        return sum(pool.map(count, shards))


def _flagged_in(storage: Storage, key: str) -> int:
    # One column through ParquetFile on this thread: pq.read_table's dataset scanner leaves Arrow threads that a
    # command exiting right after this read can meet in teardown, aborting with "terminate called without an active
    # exception" (exit -6; apache/arrow#34314). Seen here on `batchgen run` under load, after its summary.
    parquet = pq.ParquetFile(pa.BufferReader(storage.get_bytes(key)), pre_buffer=False)
    if FLAGS_COLUMN not in parquet.schema_arrow.names:  # written before the quality gate existed
        return 0
    table = parquet.read(columns=[FLAGS_COLUMN], use_threads=False)
    return sum(1 for flags in table.column(FLAGS_COLUMN).to_pylist() if flags)


def _parts_digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _unchanged(storage: Storage, plan: RunPlan, progress: RunProgress, index, parts: list[str]) -> int | None:
    """The index's row count when the run is complete and index and marker were built from exactly these parts."""
    if not progress.complete or index is None:
        return None
    try:
        marker = json.loads(storage.get_bytes(layout.success_key(plan.run_id)))
    except (NotFoundError, ValueError):
        return None
    if marker.get("index_etag") != index.etag or marker.get("parts_digest") != _parts_digest(parts):
        return None
    return marker.get("index_rows")


def _set_success_marker(
    storage: Storage, plan: RunPlan, complete: bool, rows: int, index_etag: str | None, parts_digest: str
) -> None:
    key = layout.success_key(plan.run_id)
    if not complete:
        storage.delete(key)
        return
    marker = {
        "run_id": plan.run_id,
        "items": plan.row_count,
        "index_key": layout.index_key(plan.run_id),
        "index_rows": rows,
        "index_etag": index_etag,
        "parts_digest": parts_digest,
        "batchgen_version": __version__,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.put_bytes(key, (json.dumps(marker, indent=2) + "\n").encode(), content_type="application/json")
