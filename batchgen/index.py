"""The run's index: one Parquet row per committed video, built from the sidecars of the plan's items alone, and
the run-level success marker.

Columns: ``key`` (the video's object key), ``uri`` (its full URI in the storage the index was built from),
``sidecar_key``, then every sidecar field (``batchgen.records.Sidecar``) with nested objects flattened by ``_``
(``model_path``, ``model_fingerprint``, ``timings_denoise``, ``parallel_ulysses``...). The known fields have fixed
types, so an index of adopted videos (no timings) has the same schema as any other; ``created_at`` is a UTC
timestamp. Rows are in manifest order. The file is written with one atomic put, so readers see the old index or
the new one, never a partial file.

Finalising is safe against concurrent finalisers (``index``, ``run``, the controller): see ``finalize_run``.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen import __version__, layout
from batchgen.errors import AlreadyExistsError, ChangedError, StorageError, TransientStorageError
from batchgen.plan import RunPlan
from batchgen.progress import RunProgress, scan_run
from batchgen.records import INDEX_RENAMED, Sidecar, SidecarError, index_schema
from batchgen.storage.base import Storage

log = logging.getLogger("batchgen.index")

READ_THREADS = 32  # sidecar gets are latency-bound
FINALIZE_ROUNDS = 5  # each lost round means another finaliser wrote a fresher index meanwhile

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


def _row(storage: Storage, run_id: str, shard: str, item_id: str) -> dict[str, Any]:
    sidecar_key = layout.sidecar_key(run_id, shard, item_id)
    try:
        sidecar = Sidecar.parse(storage.get_bytes(sidecar_key), run_id=run_id, shard=shard, item_id=item_id)
        row = {"key": sidecar["video_key"], "uri": storage.url(sidecar["video_key"]), "sidecar_key": sidecar_key}
        row.update((k, v) for k, v in flatten(sidecar).items() if k not in INDEX_RENAMED)
        row["created_at"] = _parse_time(row.get("created_at"))
    except (SidecarError, ValueError, TypeError) as e:
        raise StorageError(
            f"{storage.url(sidecar_key)} is not a valid sidecar: {e} (batchgen verify --repair makes the item pending)"
        ) from e
    return row


def read_sidecars(storage: Storage, plan: RunPlan, progress: RunProgress | None = None) -> list[dict[str, Any]]:
    """Every committed item's index row (listings, then parallel gets of the planned items' sidecars only), in
    manifest order."""
    progress = progress or scan_run(storage, plan)
    done = [(s.shard, item_id) for s in progress.shards.values() for item_id in sorted(s.done_ids)]
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="index-get") as pool:
        rows = list(pool.map(lambda pair: _row(storage, plan.run_id, *pair), done))
    rows.sort(key=lambda r: (r["shard"], r["row"], r["id"]))
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


def build_index(storage: Storage, plan: RunPlan) -> int:
    """(Re)build ``<run>/index/index.parquet`` from the sidecars; returns the number of rows."""
    return finalize(storage, plan).rows


@dataclass(frozen=True)
class Finalized:
    complete: bool
    rows: int
    """Rows of the index this call wrote."""
    progress: RunProgress
    """The view of the sidecars the index was built from."""


def finalize_run(storage: Storage, plan: RunPlan) -> bool:
    """Build the index and set the success marker; returns whether the run is complete."""
    return finalize(storage, plan).complete


def finalize(storage: Storage, plan: RunPlan) -> Finalized:
    """Build the index, then write ``_SUCCESS.json`` iff every item is done (remove a stale one otherwise).

    Safe against concurrent finalisers without a lock, because sidecars only appear (``verify --repair`` removes
    one and then finalises itself):

    1. note the index's etag, then list and read the sidecars;
    2. replace the index only if it still has that etag (a conditional put): a finaliser whose listing is older
       than the stored index's loses here and starts over, so a staler index never replaces a fresher one;
    3. set the marker from our own view (write it naming our index's etag, or delete it);
    4. if the index has changed since our put, a newer finaliser may have set the marker before we did: start over.
       Otherwise our index is the newest, and any later finaliser sets the marker after us.
    """
    key = layout.index_key(plan.run_id)
    for _ in range(FINALIZE_ROUNDS):
        before = storage.head(key)
        progress = scan_run(storage, plan)
        table = index_table(read_sidecars(storage, plan, progress))
        try:
            etag = storage.put_bytes(
                key,
                _parquet_bytes(table),
                if_absent=before is None,
                if_match=before.etag if before is not None else None,
                content_type="application/vnd.apache.parquet",
            )
        except (AlreadyExistsError, ChangedError):
            log.info("%s was replaced by a concurrent finaliser; building it again", storage.url(key))
            continue
        complete = progress.complete and table.num_rows == plan.row_count
        _set_success_marker(storage, plan, complete, table.num_rows, etag)
        after = storage.head(key)
        if after is not None and after.etag == etag:
            log.info("index of %s: %d rows -> %s", plan.run_id, table.num_rows, storage.url(key))
            return Finalized(complete, table.num_rows, progress)
    raise TransientStorageError(f"{storage.url(key)} kept changing under concurrent writers; run batchgen index again")


def _set_success_marker(storage: Storage, plan: RunPlan, complete: bool, rows: int, index_etag: str | None) -> None:
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
        "batchgen_version": __version__,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.put_bytes(key, (json.dumps(marker, indent=2) + "\n").encode(), content_type="application/json")
