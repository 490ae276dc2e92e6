"""``batchgen export --format webdataset``: a run's committed videos as WebDataset tar shards plus a manifest and a
Hugging Face dataset card (``README.md``, ``batchgen.dataset.card``), so ``datasets.load_dataset(EXPORT_DIR)`` loads it.

Each sample is three tar members sharing a key: ``<key>.mp4`` (the stored video, byte for byte), ``<key>.json``
(its index row: every sidecar field, flattened) and ``<key>.txt`` (the prompt). The key is the item id with
``.`` written as ``%2E``: WebDataset and Hugging Face ``datasets`` split a member name at its first dot, and
ids never contain ``%``. Shards are ``shard-000000.tar``, ... under the output, cut at ``max_count`` samples or
``max_bytes`` of video, whichever comes first.

Writes follow the videos' rules. Which samples go to which tar is a pure function of the run's index and the
options, so a rerun plans the same tars. Each tar is built in a temporary file and created only if absent; an
existing tar (a crashed or concurrent export) is adopted after checking that it holds exactly the planned
samples with the index's sha256s, or refused (exit 4). ``manifest.json`` is written last: present means
complete, and a rerun with the same selection then writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchgen import __version__
from batchgen.core.errors import AlreadyExistsError, InputError, NotFoundError, PlanConflictError
from batchgen.dataset.card import CARD_KEY, dataset_card
from batchgen.dataset.reader import Run
from batchgen.storage.base import Storage

log = logging.getLogger("batchgen.export")

MANIFEST_KEY = "manifest.json"
DEFAULT_MAX_COUNT = 1000
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: a few seconds per shard to stream, few enough shards to list


@dataclass(frozen=True)
class ExportOptions:
    unflagged: bool = False
    """Only videos without quality flags."""
    fraction: float = 1.0
    """Share of the (filtered) videos to keep, sampled per item by ``seed``."""
    seed: int = 0
    max_count: int = DEFAULT_MAX_COUNT
    """Samples per tar at most."""
    max_bytes: int = DEFAULT_MAX_BYTES
    """Video bytes per tar at most (a single larger video still gets a tar of its own)."""

    def __post_init__(self) -> None:
        if self.max_count < 1 or self.max_bytes < 1:
            raise InputError(f"max_count and max_bytes must be positive, got {self.max_count} and {self.max_bytes}")


def sample_key(item_id: str) -> str:
    return item_id.replace(".", "%2E")


def shard_key(index: int) -> str:
    return f"shard-{index:06d}.tar"


def split_shards(table: pa.Table, max_count: int, max_bytes: int) -> list[pa.Table]:
    """Consecutive slices of ``table``, each within ``max_count`` rows and ``max_bytes`` of ``size_bytes``."""
    slices, start, count, size = [], 0, 0, 0
    for row, video_bytes in enumerate(table.column("size_bytes").to_pylist()):
        if count and (count == max_count or size + video_bytes > max_bytes):
            slices.append(table.slice(start, count))
            start, count, size = row, 0, 0
        count, size = count + 1, size + video_bytes
    if count:
        slices.append(table.slice(start, count))
    return slices


def export_webdataset(run: Run, out: Storage, options: ExportOptions) -> dict[str, Any]:
    """Write (or finish) the export; returns its manifest. PlanConflictError if ``out`` holds another export."""
    table = run.select(unflagged=options.unflagged, fraction=options.fraction, seed=options.seed)
    selection = _selection(run, table, options)
    existing = _read_manifest(out)
    if existing is not None:
        _require_same(out, existing, selection)
        if not out.exists(CARD_KEY):  # an export finished before cards existed
            _write_card(run, out, table, existing)
        log.info("%s already holds this export: nothing to write", out.url(MANIFEST_KEY))
        return existing
    slices = split_shards(table, options.max_count, options.max_bytes)
    shards = [_export_shard(run, out, index, rows) for index, rows in enumerate(slices)]
    manifest = {**selection, "shards": shards, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_card(run, out, table, manifest)  # before the manifest: a complete export has its card
    try:
        out.put_bytes(MANIFEST_KEY, _json(manifest), if_absent=True, content_type="application/json")
    except AlreadyExistsError:  # a concurrent export of the same selection finished first
        manifest = json.loads(out.get_bytes(MANIFEST_KEY))
        _require_same(out, manifest, selection)
    return manifest


def _write_card(run: Run, out: Storage, table: pa.Table, manifest: dict[str, Any]) -> None:
    # The card holds no time: a rerun or a concurrent export writes the same bytes.
    out.put_bytes(CARD_KEY, dataset_card(run, table, manifest).encode(), content_type="text/markdown")


def _selection(run: Run, table: pa.Table, options: ExportOptions) -> dict[str, Any]:
    """What the export holds: compared on a rerun, so it names the content, not when it was made."""
    digest = hashlib.sha256()
    for item_id, sha in _ids_and_digests(table):
        digest.update(f"{item_id} {sha}\n".encode())
    return {
        "format": "webdataset",
        "run_id": run.run_id,
        "options": asdict(options),
        "samples": table.num_rows,
        "selection_sha256": digest.hexdigest(),
        "batchgen_version": __version__,
    }


def _ids_and_digests(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("id").to_pylist(), table.column("sha256").to_pylist(), strict=True))


def _require_same(out: Storage, manifest: dict[str, Any], selection: dict[str, Any]) -> None:
    fields = ("format", "run_id", "options", "samples", "selection_sha256")
    changed = [name for name in fields if manifest.get(name) != selection[name]]
    if changed:
        raise PlanConflictError(
            f"{out.url(MANIFEST_KEY)} describes another export (different {', '.join(changed)}); "
            "export to an empty --out"
        )


def _read_manifest(out: Storage) -> dict[str, Any] | None:
    try:
        return json.loads(out.get_bytes(MANIFEST_KEY))
    except NotFoundError:
        return None


def _export_shard(run: Run, out: Storage, index: int, rows: pa.Table) -> dict[str, Any]:
    key = shard_key(index)
    with tempfile.TemporaryDirectory(prefix="batchgen-export-") as scratch:
        path = Path(scratch) / key
        if out.exists(key):
            return _adopt(out, key, rows, path)
        _write_tar(run, rows, path)
        try:
            out.put_file(key, path, if_absent=True, content_type="application/x-tar")
        except AlreadyExistsError:
            return _adopt(out, key, rows, path)
        log.info("wrote %s (%d samples)", out.url(key), rows.num_rows)
        return _entry(out, key, rows, path)


def _entry(out: Storage, key: str, rows: pa.Table, path: Path) -> dict[str, Any]:
    ids = rows.column("id").to_pylist()
    return {
        "key": key,
        "url": out.url(key),
        "samples": len(ids),
        "size_bytes": path.stat().st_size,
        "sha256": _file_sha256(path),
        "first_id": ids[0],
        "last_id": ids[-1],
    }


def _write_tar(run: Run, rows: pa.Table, path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for video, data in run.read_videos(rows):
            key, meta = sample_key(video.id), video.metadata
            mtime = meta["created_at"].timestamp() if meta.get("created_at") else 0
            for suffix, payload in (("mp4", data), ("json", _json(meta)), ("txt", video.prompt.encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), int(mtime), 0o644
                tar.addfile(info, io.BytesIO(payload))


def _adopt(out: Storage, key: str, rows: pa.Table, path: Path) -> dict[str, Any]:
    """Keep an existing tar only if it holds exactly these samples with the index's videos."""
    out.get_file(key, path)
    expected = {sample_key(item_id): sha for item_id, sha in _ids_and_digests(rows)}
    found = dict(_mp4_digests(path))
    if found != expected:
        raise PlanConflictError(
            f"{out.url(key)} exists but does not hold this export's {len(expected)} samples "
            f"({len(found)} videos, {len(set(found) ^ set(expected))} ids differ); export to an empty --out"
        )
    log.info("adopted existing %s (%d samples)", out.url(key), rows.num_rows)
    return _entry(out, key, rows, path)


def _mp4_digests(path: Path) -> Iterator[tuple[str, str]]:
    with tarfile.open(path, "r") as tar:
        for member in tar:
            data = tar.extractfile(member) if member.name.endswith(".mp4") else None
            if data is not None:  # None: not a regular file
                yield member.name[: -len(".mp4")], hashlib.sha256(data.read()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False, default=_json_default) + "\n").encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
