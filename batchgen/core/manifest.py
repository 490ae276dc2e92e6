"""The prompt manifest: a Parquet file, validated and resolved into ``Item``s one row group at a time.

Columns (only ``prompt`` is required)::

    id               string   stable item id; derived from the row's content when the column is absent
    prompt           string   non-empty, at most MAX_PROMPT_CHARS characters
    negative_prompt  string   null = the run's default negative prompt
    seed             integer  0 <= seed < 2**63; null = derived from the id
    num_frames, height, width, num_inference_steps   integer  per-row overrides (null = the run's default)
    guidance_scale   number   per-row override (null = the run's default)
    model_family     string   'mochi' or 'wan' (null = the run's); every row the same: one run uses one family

The run's model family (``[model] family`` / ``--family``) decides the frame rule and size multiple of every
row. When the run does not set it, the ``model_family`` column does (``manifest_family``); when it does, every
non-null value must equal it. ``model_family`` is not part of the digest: the family is in the run id itself.

Validation checks the Arrow schema first, then every row, vectorised with pyarrow.compute per record batch,
and reports every problem (capped) in one ``ManifestError``. Only the set of ids seen so far is kept across
batches, so millions of rows validate in bounded memory.

The manifest digest covers canonical per-row values (types widened, absent optional columns read as
nulls, row groups irrelevant), not the file's bytes: rewriting the same table with another writer or row
group size keeps the digest, and with it the run id.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchgen.core.config import MAX_PROMPT_CHARS, GenerationConfig, check_generation, check_guidance, check_steps
from batchgen.core.errors import ConfigError, ManifestError, NotFoundError
from batchgen.core.item import EXAMPLES_PER_SHAPE, ITEM_SCHEMA, MANIFEST_COLUMNS, Item, ShapeGroup
from batchgen.models import FAMILIES, MOCHI, ModelSpec, uses_cfg

log = logging.getLogger("batchgen.manifest")

MAX_ID_CHARS = 128
ID_PATTERN = r"^[A-Za-z0-9._-]+$"
MAX_SEED = 2**63 - 1
BATCH_ROWS = 65_536
DIGEST_VERSION = "batchgen-manifest-v1"

# Canonical types every input type is widened to before checks, digests and ids.
_STRING_COLUMNS = ("id", "prompt", "negative_prompt")
_INT_COLUMNS = ("seed", "num_frames", "height", "width", "num_inference_steps")
_FLOAT_COLUMNS = ("guidance_scale",)
FAMILY_COLUMN = "model_family"


_Check = Callable[[int], str | None] | Callable[[float], str | None]
"""check(value): why a column's value is invalid, or None."""


def _override_checks(spec: ModelSpec) -> dict[str, _Check]:
    return {
        "num_frames": spec.check_frames,
        "height": spec.check_side,
        "width": spec.check_side,
        "num_inference_steps": check_steps,
        "guidance_scale": check_guidance,
    }


@dataclass(frozen=True)
class ManifestSummary:
    path: str
    rows: int
    digest: str
    """sha256 over canonical per-row values (see module docstring)."""
    warnings: list[str] = field(default_factory=list)
    derived_ids: bool = False
    """True when the manifest has no ``id`` column and ids were derived from row content."""
    shapes: tuple[ShapeGroup, ...] = ()
    """Items per (num_frames, height, width) after per-row overrides; only when items were resolved."""


def _id_field(value: str | int | float | None) -> str:
    if value is None:
        return "~"
    if isinstance(value, str):
        return f"{len(value)}:{value}"  # length prefix: no separator inside a prompt can make two rows collide
    if isinstance(value, float):
        return str(struct.unpack("<q", struct.pack("<d", value))[0])  # exact bits, independent of float printing
    return str(value)


def derive_id(
    prompt: str,
    negative_prompt: str | None = None,
    seed: int | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
) -> str:
    """Stable id of a row without an ``id``, from its raw values (nulls included): identical rows collide.

    sha256 over ``|``-joined fields (strings length-prefixed, null as ``~``, guidance as its float64 bits),
    first 16 hex digits. ``_derive_ids`` computes the same thing vectorised.
    """
    guidance = None if guidance_scale is None else float(guidance_scale)
    fields_ = (prompt, negative_prompt, seed, num_frames, height, width, num_inference_steps, guidance)
    return hashlib.sha256("|".join(map(_id_field, fields_)).encode("utf-8")).hexdigest()[:16]


def _derive_ids(columns: dict[str, pa.Array]) -> list[str]:
    parts = []
    for name in ("prompt", "negative_prompt"):
        array = columns[name]
        prefixed = pc.binary_join_element_wise(pc.utf8_length(array).cast(pa.string()), array, ":")
        parts.append(pc.fill_null(prefixed, "~"))
    for name in ("seed", "num_frames", "height", "width", "num_inference_steps"):
        parts.append(pc.fill_null(columns[name].cast(pa.string()), "~"))
    guidance = columns["guidance_scale"]
    bits = pa.array(pc.fill_null(guidance, 0.0).to_numpy(zero_copy_only=False).view(np.int64), pa.int64())
    parts.append(pc.if_else(pc.is_null(guidance), "~", bits.cast(pa.string())))
    joined = pc.binary_join_element_wise(*parts, "|").cast(pa.binary())
    return [hashlib.sha256(row).hexdigest()[:16] for row in joined.to_pylist()]


def derive_seed(item_id: str) -> int:
    """Default seed of an item: the first 8 bytes of sha256(id), masked to 63 bits (torch-safe, non-negative)."""
    return int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "big") & MAX_SEED


# -- schema -------------------------------------------------------------------------------------------------


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return (
        pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _t: False)(t)
    )


def _type_problem(column: str, t: pa.DataType) -> str | None:
    if column in (*_STRING_COLUMNS, FAMILY_COLUMN) and not _is_string(t):
        hint = " (cast it to string)" if column == "id" else ""
        return f"must be a string column, got type {t}{hint}"
    if column in _INT_COLUMNS and not pa.types.is_integer(t):
        hint = ""
        if pa.types.is_floating(t):
            hint = " (pandas turns integer columns with missing values into float: use dtype 'Int64')"
        return f"must be an integer column, got type {t}{hint}"
    if column in _FLOAT_COLUMNS and not (pa.types.is_floating(t) or pa.types.is_integer(t)):
        return f"must be a numeric column, got type {t}"
    return None


class _Problems:
    """Capped problem list: counts everything, formats only the first ``limit`` messages."""

    def __init__(self, path: str, limit: int):
        self.path = path
        self.limit = max(1, limit)
        self.messages: list[str] = []
        self.total = 0

    @property
    def full(self) -> bool:
        return len(self.messages) >= self.limit

    def add(self, message: str, *, row: int | None = None, column: str | None = None) -> None:
        self.total += 1
        if self.full:
            return
        where = [self.path]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        self.messages.append(f"{', '.join(where)}: {message}")

    def error(self) -> ManifestError:
        return ManifestError(self.path, self.messages, self.total - len(self.messages))


@contextmanager
def _local_copy(path: str, problems: _Problems) -> Iterator[str | None]:
    """A local file for ``path``: itself, or for an ``s3://`` / ``file://`` URI a temporary copy (same file name)
    that lives while the scan runs. Manifests are streamed by row group, which wants a seekable local file."""
    if "://" not in path:
        yield path
        return
    from batchgen.storage import open_storage

    parent, _, name = path.rpartition("/")
    if not name or "://" not in parent:
        problems.add("a manifest URI must name a file, e.g. s3://bucket/prompts.parquet")
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="batchgen-manifest-") as scratch:
        local = Path(scratch) / name
        try:
            open_storage(parent).get_file(name, local)
        except NotFoundError:
            problems.add("file not found")
            yield None
            return
        yield str(local)


def _open(path: str, problems: _Problems) -> pq.ParquetFile | None:
    p = Path(path)
    if not p.exists():
        problems.add("file not found")
        return None
    if not p.is_file():
        problems.add("not a file")
        return None
    if p.stat().st_size == 0:
        problems.add("file is empty (0 bytes); expected a Parquet file")
        return None
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"PAR1":
        hint = f" (a {p.suffix} file? convert it, e.g. pandas.read_csv(...).to_parquet(...))" if p.suffix else ""
        problems.add(f"not a Parquet file{hint}")
        return None
    try:
        return pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as e:
        problems.add(f"not a readable Parquet file: {e}")
        return None


def _check_schema(schema: pa.Schema, problems: _Problems) -> tuple[list[str], list[str]]:
    """Known columns present, and warnings for unknown ones; type problems go to ``problems``."""
    names = schema.names
    duplicated = sorted({n for n in names if names.count(n) > 1})
    for name in duplicated:
        problems.add("column appears more than once", column=name)
    if "prompt" not in names:
        problems.add(f"required column is missing (columns found: {names})", column="prompt")
    present = [c for c in (*MANIFEST_COLUMNS, FAMILY_COLUMN) if c in names]
    for column in present:
        if column in duplicated:
            continue
        problem = _type_problem(column, schema.field(column).type)
        if problem:
            problems.add(problem, column=column)
    known = (*MANIFEST_COLUMNS, FAMILY_COLUMN)
    warnings = [
        f"{schema_name!r} is not a manifest column and is ignored (known: {', '.join(known)})"
        for schema_name in names
        if schema_name not in known
    ]
    return present, warnings


# -- per-batch work -----------------------------------------------------------------------------------------


def _canonical(batch: pa.RecordBatch, present: list[str]) -> dict[str, pa.Array]:
    """Every known column in its canonical type; absent optional columns as all-null arrays."""
    n = batch.num_rows
    columns: dict[str, pa.Array] = {}
    for name in MANIFEST_COLUMNS:
        if name not in present:
            target = pa.string() if name in _STRING_COLUMNS else pa.float64() if name in _FLOAT_COLUMNS else pa.int64()
            columns[name] = pa.nulls(n, target)
            continue
        array = batch.column(name)
        if name in _STRING_COLUMNS:
            columns[name] = array.cast(pa.string())
        elif name in _FLOAT_COLUMNS:
            columns[name] = array.cast(pa.float64())
        elif pa.types.is_uint64(array.type):
            # Values above int64's range are reported by the seed/override checks; keep them out of the cast.
            too_big = pc.fill_null(pc.greater(array, pa.scalar(MAX_SEED, pa.uint64())), False)
            columns[name] = pc.if_else(too_big, pa.scalar(None, pa.uint64()), array).cast(pa.int64())
            columns[name + ":too_big"] = too_big
            columns[name + ":raw"] = array
        else:
            columns[name] = array.cast(pa.int64())
    if FAMILY_COLUMN in present:
        columns[FAMILY_COLUMN] = batch.column(FAMILY_COLUMN).cast(pa.string())
    return columns


def _rows(mask: pa.Array) -> np.ndarray:
    """Indices where a boolean array is true (nulls count as false)."""
    return np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))


_Report = Callable[[str, np.ndarray, Callable[[int], str]], None]
"""report(column, rows, message(row)): a problem found on ``rows`` of a batch."""


def _check_batch(
    columns: dict[str, pa.Array], present: list[str], start: int, problems: _Problems, spec: ModelSpec
) -> None:
    """Row checks of one batch. Messages are ordered by row within the batch, then by the order of the checks."""
    found: list[tuple[int, int, str, Callable[[int], str]]] = []  # (row, order, column, message(row))

    def report(column: str, rows: np.ndarray, message: Callable[[int], str]) -> None:
        for i in rows:
            found.append((int(i), len(found), column, message))

    _check_prompts(columns, report)
    if "id" in present:
        _check_ids(columns["id"], report)
    if "seed" in present:
        _check_seeds(columns, report)
    _check_overrides(columns, present, spec, report)
    found.sort(key=lambda f: (f[0], f[1]))
    for i, _order, column, message in found:
        if problems.full:
            problems.total += 1
            continue
        problems.add(message(i), row=start + i, column=column)


def _check_prompts(columns: dict[str, pa.Array], report: _Report) -> None:
    prompt = columns["prompt"]
    report("prompt", _rows(pc.is_null(prompt)), lambda i: "is null")
    stripped_len = pc.utf8_length(pc.utf8_trim_whitespace(prompt))
    report("prompt", _rows(pc.equal(stripped_len, 0)), lambda i: "is empty or whitespace only")
    for name in ("prompt", "negative_prompt"):
        lengths = pc.utf8_length(columns[name])
        report(name, _rows(pc.greater(lengths, MAX_PROMPT_CHARS)), _too_long(lengths, MAX_PROMPT_CHARS))


def _too_long(lengths: pa.Array, limit: int) -> Callable[[int], str]:
    return lambda i: f"is {lengths[i].as_py()} characters long; at most {limit} allowed"


def _check_ids(ids: pa.Array, report: _Report) -> None:
    report("id", _rows(pc.is_null(ids)), lambda i: "is null (leave the column out to derive ids)")
    id_len = pc.utf8_length(ids)
    report("id", _rows(pc.equal(id_len, 0)), lambda i: "is empty")
    report("id", _rows(pc.greater(id_len, MAX_ID_CHARS)), _too_long(id_len, MAX_ID_CHARS))
    nonempty = pc.greater(id_len, 0)
    bad_chars = pc.and_(nonempty, pc.invert(pc.match_substring_regex(ids, ID_PATTERN)))
    report("id", _rows(bad_chars), lambda i: f"{ids[i].as_py()!r} has characters outside [A-Za-z0-9._-]")
    unsafe = pc.and_(pc.invert(bad_chars), pc.or_(pc.starts_with(ids, "."), pc.match_substring(ids, "..")))
    report(
        "id",
        _rows(pc.and_(nonempty, unsafe)),
        lambda i: f"{ids[i].as_py()!r} is unsafe as an object key (starts with '.' or contains '..')",
    )


def _check_seeds(columns: dict[str, pa.Array], report: _Report) -> None:
    seeds = columns["seed"]
    if "seed:too_big" in columns:
        raw = columns["seed:raw"]
        report("seed", _rows(columns["seed:too_big"]), lambda i: f"must be between 0 and 2**63-1, got {raw[i].as_py()}")
    report("seed", _rows(pc.less(seeds, 0)), lambda i: f"must be between 0 and 2**63-1, got {seeds[i].as_py()}")


def _check_overrides(columns: dict[str, pa.Array], present: list[str], spec: ModelSpec, report: _Report) -> None:
    """The family column, then the per-row generation overrides. The config's own scalar checks run once per
    distinct value, then map back to rows: exact same rules as the run-wide defaults, at vectorised cost
    (manifests repeat a handful of shapes)."""
    if FAMILY_COLUMN in present:
        families = columns[FAMILY_COLUMN]
        other = pc.and_(pc.is_valid(families), pc.not_equal(families, spec.family))
        report(FAMILY_COLUMN, _rows(other), lambda i: _family_problem(families[i].as_py(), spec))
    for name, check in _override_checks(spec).items():
        if name not in present:
            continue
        values = columns[name]
        if name + ":too_big" in columns:
            raw = columns[name + ":raw"]
            report(name, _rows(columns[name + ":too_big"]), _check_message(check, raw))
        bad = [v for v in pc.unique(pc.drop_null(values)).to_pylist() if check(v)]
        if bad:
            mask = pc.is_in(values, value_set=pa.array(bad, values.type))
            report(name, _rows(mask), _check_message(check, values))


def _check_message(check: _Check, values: pa.Array) -> Callable[[int], str]:
    return lambda i: str(check(values[i].as_py()))


def _family_problem(family: str, spec: ModelSpec) -> str:
    if family not in FAMILIES:
        return f"unknown model family {family!r} (known: {', '.join(sorted(FAMILIES))})"
    return (
        f"{family!r} differs from the run's model family {spec.family!r}: one run uses one family (make every "
        "row the same, or set [model] family / --family to match)"
    )


def _string_bytes(array: pa.Array) -> bytes:
    """Lengths then UTF-8 data of a (null-filled) string array: an unambiguous, offset-independent encoding."""
    filled = pc.fill_null(array, "")
    lengths = pc.binary_length(filled).cast(pa.int64()).to_numpy(zero_copy_only=False).astype("<i8")
    offsets_buf, data_buf = filled.buffers()[1], filled.buffers()[2]
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[filled.offset : filled.offset + len(filled) + 1]
    data = b"" if data_buf is None or len(filled) == 0 else memoryview(data_buf)[offsets[0] : offsets[-1]].tobytes()
    return lengths.tobytes() + data


def _update_digest(hashers: dict[str, hashlib._Hash], columns: dict[str, pa.Array]) -> None:
    # One hasher per column, fed across batches: the result does not depend on where batches split.
    for name in MANIFEST_COLUMNS:
        array = columns[name]
        valid = pc.is_valid(array).to_numpy(zero_copy_only=False).astype(np.uint8)
        hashers[name].update(valid.tobytes())
        if name in _STRING_COLUMNS:
            hashers[name].update(_string_bytes(array))
        elif name in _FLOAT_COLUMNS:
            hashers[name].update(pc.fill_null(array, 0.0).to_numpy(zero_copy_only=False).astype("<f8").tobytes())
        else:
            hashers[name].update(pc.fill_null(array, 0).to_numpy(zero_copy_only=False).astype("<i8").tobytes())


def _final_digest(hashers: dict[str, hashlib._Hash], rows: int) -> str:
    outer = hashlib.sha256(f"{DIGEST_VERSION}\nrows={rows}\n".encode())
    for name in MANIFEST_COLUMNS:
        outer.update(f"{name}={hashers[name].hexdigest()}\n".encode())
    return outer.hexdigest()


def _ids_of(columns: dict[str, pa.Array], present: list[str]) -> Sequence[str | None]:
    if "id" in present:
        return columns["id"].to_pylist()
    return _derive_ids(columns)


def _no_null_id(ids: Sequence[str | None]) -> TypeGuard[Sequence[str]]:
    return None not in ids


def _check_duplicates(
    ids: Sequence[str | None], start: int, seen: dict[str | None, int], derived: bool, problems: _Problems
) -> None:
    # Fast path, all in C: no repeats inside the batch and none shared with earlier batches.
    batch = dict(zip(ids, range(start, start + len(ids)), strict=True))
    batch.pop(None, None)
    non_null = len(ids) - ids.count(None)
    if len(batch) == non_null and not (seen.keys() & batch.keys()):
        seen.update(batch)
        return
    for offset, item_id in enumerate(ids):
        if item_id is None:
            continue
        first = seen.setdefault(item_id, start + offset)
        if first != start + offset:
            if derived:
                message = (
                    f"row is identical to row {first} (derived id {item_id}); give the rows different "
                    "seeds or add an 'id' column"
                )
            else:
                message = f"duplicate id {item_id!r} (first at row {first})"
            problems.add(message, row=start + offset, column="id")


def _resolve(
    columns: dict[str, pa.Array], ids: Sequence[str], start: int, generation: GenerationConfig
) -> pa.RecordBatch:
    """The batch's items with every parameter resolved, in ITEM_SCHEMA."""
    seeds = columns["seed"]
    if seeds.null_count:
        raw = seeds.to_pylist()
        seeds = pa.array([s if s is not None else derive_seed(i) for s, i in zip(raw, ids, strict=True)], pa.int64())
    n = len(ids)
    arrays = [
        pa.array(ids, pa.string()),
        columns["prompt"],
        pc.fill_null(columns["negative_prompt"], generation.negative_prompt),
        seeds,
        pc.fill_null(columns["num_frames"], generation.num_frames),
        pc.fill_null(columns["height"], generation.height),
        pc.fill_null(columns["width"], generation.width),
        pc.fill_null(columns["num_inference_steps"], generation.num_inference_steps),
        pc.fill_null(columns["guidance_scale"], float(generation.guidance_scale)),
        pa.array(np.arange(start, start + n, dtype=np.int64)),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=ITEM_SCHEMA)


class _Scan:
    """One streaming pass over a manifest: checks, digest, and (optionally) resolved item batches."""

    def __init__(self, path: str | Path, max_errors: int, spec: ModelSpec = MOCHI):
        self.path = str(path)
        self.spec = spec
        self.problems = _Problems(self.path, max_errors)
        self.warnings: list[str] = []
        self.rows = 0
        self.digest = ""
        self.derived_ids = False
        self.shapes: dict[tuple[int, int, int], tuple[int, list[str], int]] = {}

    def batches(self, generation: GenerationConfig | None, *, check_rows: bool = True) -> Iterator[pa.RecordBatch]:
        """Yield resolved batches while problems are absent (when ``generation`` is given); always scan to the end.

        ``check_rows=False`` skips the row checks (not the schema checks or the digest): for a second pass over
        a file already validated, whose digest the caller compares at the end.
        """
        # The defaults fill null cells unchecked, so they must fit the family (RunConfig guarantees it; callers
        # building a GenerationConfig by hand might not).
        problem = check_generation(generation, self.spec) if generation is not None else None
        if problem:
            raise ConfigError(problem)
        problems = self.problems
        with _local_copy(self.path, problems) as local:
            if local is not None:
                yield from self._batches(local, generation, check_rows)

    def _batches(self, local: str, generation: GenerationConfig | None, check_rows: bool) -> Iterator[pa.RecordBatch]:
        problems = self.problems
        parquet = _open(local, problems)
        if parquet is None:
            return
        present, self.warnings = _check_schema(parquet.schema_arrow, problems)
        if problems.total:
            return
        self.derived_ids = "id" not in present
        hashers = {name: hashlib.sha256() for name in MANIFEST_COLUMNS}
        seen: dict[str | None, int] = {}  # never holds None (each batch's is dropped): typed to take a batch whole
        start = 0
        try:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=present):
                columns = _canonical(batch, present)
                if check_rows:
                    _check_batch(columns, present, start, problems, self.spec)
                _update_digest(hashers, columns)
                ids = _ids_of(columns, present)
                if check_rows:
                    _check_duplicates(ids, start, seen, self.derived_ids, problems)
                if generation is not None and not problems.total:
                    if _no_null_id(ids):
                        resolved = _resolve(columns, ids, start, generation)
                        _tally_shapes(self.shapes, resolved)
                        yield resolved
                    else:
                        # Only a pass without row checks gets here (they report null ids): the file is not the
                        # one validated. Stop yielding; the scan goes on to the end, then summary() raises.
                        problems.add(
                            f"a null id after row {start}: the file changed while it was being planned; plan again"
                        )
                start += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            problems.add(f"cannot read the Parquet data after row {start}: {e}")
            return
        self.rows = start
        if start == 0:
            problems.add("manifest has no rows")
        self.digest = _final_digest(hashers, start)

    def summary(self) -> ManifestSummary:
        if self.problems.total:
            raise self.problems.error()
        shapes = _shape_groups(self.shapes)
        return ManifestSummary(self.path, self.rows, self.digest, list(self.warnings), self.derived_ids, shapes)


def _shape_groups(tally: dict[tuple[int, int, int], tuple[int, list[str], int]]) -> tuple[ShapeGroup, ...]:
    return tuple(
        ShapeGroup(frames, height, width, count, tuple(examples), forwards)
        for (frames, height, width), (count, examples, forwards) in sorted(tally.items())
    )


def tally_shapes(batches: Iterable[pa.RecordBatch]) -> tuple[ShapeGroup, ...]:
    """The shape tally of resolved item batches (``ITEM_SCHEMA``)."""
    tally: dict[tuple[int, int, int], tuple[int, list[str], int]] = {}
    for batch in batches:
        _tally_shapes(tally, batch)
    return _shape_groups(tally)


_SHAPE_COLUMNS = ("num_frames", "height", "width")
_SIDE_MASK = (1 << 21) - 1


def _tally_shapes(tally: dict[tuple[int, int, int], tuple[int, list[str], int]], batch: pa.RecordBatch) -> None:
    """Count the batch's items and denoising forwards per shape and keep the first few ids of each (vectorised:
    one pass per batch)."""
    frames, height, width = (batch.column(name).to_numpy(zero_copy_only=False) for name in _SHAPE_COLUMNS)
    # Validated sides and frame counts are far below 2**21, so one int64 holds the whole shape.
    codes = (frames.astype(np.int64) << 42) | (height.astype(np.int64) << 21) | width.astype(np.int64)
    steps = batch.column("num_inference_steps").to_numpy(zero_copy_only=False).astype(np.int64)
    guided = uses_cfg(batch.column("guidance_scale").to_numpy(zero_copy_only=False))  # elementwise on the array
    uniques, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    forwards = np.bincount(inverse, weights=steps * np.where(guided, 2, 1)).astype(np.int64)
    for code, count, shape_forwards in zip(uniques.tolist(), counts.tolist(), forwards.tolist(), strict=True):
        shape = (code >> 42, (code >> 21) & _SIDE_MASK, code & _SIDE_MASK)
        seen, examples, seen_forwards = tally.get(shape, (0, [], 0))
        missing = EXAMPLES_PER_SHAPE - len(examples)
        if missing > 0:
            rows = np.flatnonzero(codes == code)[:missing]
            examples = [*examples, *batch.column("id").take(pa.array(rows)).to_pylist()]
        tally[shape] = (seen + count, examples, seen_forwards + shape_forwards)


def manifest_family(path: str | Path) -> str | None:
    """The first non-null known ``model_family`` of a local manifest, or None (a URI, no such column or value, or
    a file the full scan will report): what picks the family of a run that does not set one. Reads that column
    only and stops at the first value; a remote manifest is not fetched twice, so its run names the family
    (``--family`` / ``[model] family``) unless it is Mochi, and the scan checks every row against it."""
    if "://" in str(path):
        return None
    parquet = _open(str(path), _Problems(str(path), 1))
    if parquet is None or FAMILY_COLUMN not in parquet.schema_arrow.names:
        return None
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[FAMILY_COLUMN]):
            values = pc.drop_null(batch.column(0)).to_pylist() if _is_string(batch.column(0).type) else []
            if values:
                return values[0] if values[0] in FAMILIES else None
    except (pa.ArrowException, OSError):
        return None
    return None


def validate_manifest(
    path: str | Path, generation: GenerationConfig, *, spec: ModelSpec = MOCHI, max_errors: int = 50
) -> ManifestSummary:
    """Check every row against ``spec``'s shape rules; raise ManifestError listing up to ``max_errors`` problems
    (file, row, column each)."""
    scan = _Scan(path, max_errors, spec)
    for _ in scan.batches(None):
        pass
    return _finish(scan)


def validate_and_resolve(
    path: str | Path, generation: GenerationConfig, spill: str | Path, *, spec: ModelSpec = MOCHI, max_errors: int = 50
) -> ManifestSummary:
    """``validate_manifest`` that also writes the resolved items (ITEM_SCHEMA) to an Arrow IPC stream file.

    One pass instead of validate-then-resolve, and the items written are exactly the rows the digest was
    computed from. The spill file is only meaningful when this returns (it raises like validate_manifest).
    """
    scan = _Scan(path, max_errors, spec)
    with pa.OSFile(str(spill), "wb") as sink, pa.ipc.new_stream(sink, ITEM_SCHEMA) as writer:
        for batch in scan.batches(generation):
            writer.write_batch(batch)
    return _finish(scan)


def _finish(scan: _Scan) -> ManifestSummary:
    summary = scan.summary()
    for warning in summary.warnings:
        log.warning("%s: %s", summary.path, warning)
    return summary


def iter_item_batches(
    path: str | Path, generation: GenerationConfig, *, spec: ModelSpec = MOCHI, expected_digest: str | None = None
) -> Iterator[pa.RecordBatch]:
    """Resolved items as Arrow batches (ITEM_SCHEMA), streamed by row group.

    Validates as it goes and raises ManifestError at the end if anything is wrong, so a consumer must not
    commit anything before the iterator is exhausted. With ``expected_digest`` (the digest of an earlier
    successful ``validate_manifest``), rows are not checked again; instead it raises at the end if the
    content no longer matches the digest (the file changed since it was validated).
    """
    scan = _Scan(path, 50, spec)
    yield from scan.batches(generation, check_rows=expected_digest is None)
    summary = scan.summary()
    if expected_digest is not None and summary.digest != expected_digest:
        raise ManifestError(summary.path, [f"{summary.path}: the file changed while it was being planned; plan again"])


def iter_items(path: str | Path, generation: GenerationConfig, *, spec: ModelSpec = MOCHI) -> Iterator[Item]:
    """Every item of the manifest with its parameters resolved, in manifest order (streams by row group)."""
    for batch in iter_item_batches(path, generation, spec=spec):
        for row in batch.to_pylist():
            yield Item(**row)


def items_from_table(table: pa.Table) -> list[Item]:
    """Items stored in ITEM_SCHEMA (shard files)."""
    return [Item(**row) for row in table.select(ITEM_SCHEMA.names).to_pylist()]


_ID_RE = re.compile(ID_PATTERN)


def is_safe_id(item_id: str) -> bool:
    """The same id rule as manifest validation, for ids that arrive another way (e.g. the CLI)."""
    return (
        0 < len(item_id) <= MAX_ID_CHARS
        and bool(_ID_RE.match(item_id))
        and not item_id.startswith(".")
        and ".." not in item_id
    )
