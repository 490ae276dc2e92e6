"""The run's index: one Parquet row per committed video, built from the sidecars alone, and the run-level
success marker.

Columns: ``key`` (the video's object key), ``uri`` (its full URI in the storage the index was built from),
``sidecar_key``, then every sidecar field with nested objects flattened by ``_`` (``model_path``,
``model_fingerprint``, ``timings_denoise``, ``parallel_ulysses``...). The known fields have fixed types, so
an index of adopted videos (no timings) has the same schema as any other; ``created_at`` is a UTC timestamp.
Rows are in manifest order. The file is written with one atomic put, so readers see the old index or the new
one, never a partial file.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen import __version__, layout
from batchgen.errors import StorageError
from batchgen.plan import RunPlan
from batchgen.progress import scan_run
from batchgen.storage.base import Storage

log = logging.getLogger("batchgen.index")

READ_THREADS = 32  # sidecar gets are latency-bound

# Fixed part of the schema, in column order. Anything else found in sidecars is appended (types inferred).
BASE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.string()),
        ("sidecar_key", pa.string()),
        ("id", pa.string()),
        ("shard", pa.string()),
        ("run_id", pa.string()),
        ("row", pa.int64()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("num_frames", pa.int64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("num_inference_steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("fps", pa.int64()),
        ("crf", pa.int64()),
        ("sha256", pa.string()),
        ("size_bytes", pa.int64()),
        ("frames", pa.int64()),
        ("video_width", pa.int64()),
        ("video_height", pa.int64()),
        ("duration_s", pa.float64()),
        ("model_path", pa.string()),
        ("model_fingerprint", pa.string()),
        ("timings_text_encode", pa.float64()),
        ("timings_denoise", pa.float64()),
        ("timings_decode", pa.float64()),
        ("timings_encode_mp4", pa.float64()),
        ("timings_upload", pa.float64()),
        ("attempt", pa.int64()),
        ("host", pa.string()),
        ("batchgen_version", pa.string()),
        ("parallel_world_size", pa.int64()),
        ("parallel_dp_size", pa.int64()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
        ("adopted", pa.bool_()),
        # batchgen.quality's measurements (null for videos committed before the gate existed).
        ("quality_luma_mean", pa.float64()),
        ("quality_luma_min", pa.float64()),
        ("quality_luma_max", pa.float64()),
        ("quality_black_frame_fraction", pa.float64()),
        ("quality_motion_mean", pa.float64()),
        ("quality_flags", pa.list_(pa.string())),
    ]
)
# Sidecar fields the key/uri columns replace.
_RENAMED = {"video_key", "video_uri"}


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


def _row(storage: Storage, sidecar_key: str, data: bytes) -> dict[str, Any]:
    try:
        sidecar = json.loads(data)
        if not isinstance(sidecar, dict) or "video_key" not in sidecar:
            raise ValueError("not a sidecar object")
        row = {"key": sidecar["video_key"], "uri": storage.url(sidecar["video_key"]), "sidecar_key": sidecar_key}
        row.update((k, v) for k, v in flatten(sidecar).items() if k not in _RENAMED)
        row["created_at"] = _parse_time(row.get("created_at"))
    except (ValueError, TypeError) as e:
        raise StorageError(f"{storage.url(sidecar_key)} is not a valid sidecar: {e}") from e
    return row


def read_sidecars(storage: Storage, plan: RunPlan) -> list[dict[str, Any]]:
    """Every committed item's index row (one listing of meta/, then parallel gets), in manifest order."""
    keys = [info.key for info in storage.list(layout.meta_prefix(plan.run_id)) if info.key.endswith(".json")]
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="index-get") as pool:
        rows = list(pool.map(lambda key: _row(storage, key, storage.get_bytes(key)), keys))
    rows.sort(key=lambda r: (r.get("shard") or "", r.get("row") if r.get("row") is not None else -1, r["id"]))
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


def build_index(storage: Storage, plan: RunPlan) -> int:
    """(Re)build ``<run>/index/index.parquet`` from the sidecars; returns the number of rows."""
    rows = read_sidecars(storage, plan)
    table = index_table(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    key = layout.index_key(plan.run_id)
    storage.put_bytes(key, sink.getvalue().to_pybytes(), content_type="application/vnd.apache.parquet")
    log.info("index of %s: %d rows -> %s", plan.run_id, table.num_rows, storage.url(key))
    return table.num_rows


def finalize_run(storage: Storage, plan: RunPlan) -> bool:
    """Build the index; write ``_SUCCESS.json`` iff every item is done (remove a stale one otherwise).

    Returns whether the run is complete.
    """
    rows = build_index(storage, plan)
    progress = scan_run(storage, plan)
    key = layout.success_key(plan.run_id)
    complete = progress.complete and rows == plan.row_count
    if complete:
        marker = {
            "run_id": plan.run_id,
            "items": plan.row_count,
            "index_key": layout.index_key(plan.run_id),
            "index_rows": rows,
            "batchgen_version": __version__,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        storage.put_bytes(key, (json.dumps(marker, indent=2) + "\n").encode(), content_type="application/json")
    else:
        storage.delete(key)
    return complete
