"""Planning: a validated manifest + config -> a run id and deterministic shards, stored once under the output.

Write order (``run.json`` is the plan's commit marker)::

    <run>/plan/shards/<shard>.parquet   every shard, in parallel (plain puts: a re-plan rewrites identical bytes)
    <run>/plan/run.json                 if_absent: the plan exists from this moment on
    _runs/<name>/<run>.json             registry marker (repaired by any later re-plan of the same run)

A crash before ``run.json`` leaves no plan: nothing may start from a half-written one, and planning again
rewrites the same shard files. Planning again with the same inputs finds ``run.json`` and reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen import __version__
from batchgen.core import layout
from batchgen.core.config import GenerationConfig, ModelConfig, RunConfig
from batchgen.core.errors import AlreadyExistsError, InputError, NotFoundError, PlanConflictError, StorageError
from batchgen.core.item import ITEM_SCHEMA, Item, ShapeGroup
from batchgen.core.logs import log_context
from batchgen.core.manifest import ManifestSummary, items_from_table, tally_shapes, validate_and_resolve
from batchgen.core.reuse import ReusePlan, copy_mask, plan_sources, write_reuse_files
from batchgen.storage.base import Storage
from batchgen.storage.local import LocalStorage

log = logging.getLogger("batchgen.plan")

PLAN_FORMAT = 1
MAX_SLUG_CHARS = 40


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    name: str
    """The slug: from --run-name or the manifest file stem."""
    source: str
    """The manifest path as given when the run was planned."""
    manifest_digest: str
    row_count: int
    config: RunConfig
    """The config given at planning time. Only ``config.generation`` and the shard size are part of the run's
    identity; parallel and worker settings here are informational (each worker takes its own)."""
    shard_size: int
    shards: list[str]
    fingerprint: str
    batchgen_version: str
    created_at: str
    shapes: tuple[ShapeGroup, ...] = ()
    """Items per video shape, for checking parallel degrees against every item without reading them again."""
    shard_digests: tuple[str, ...] = ()
    """Per shard, ``ids_digest`` of its item ids: a listing of ``meta/<shard>/`` whose names have this digest holds
    exactly the shard's sidecars, so progress needs no read of the shard file (empty for plans that predate it)."""
    reuse: ReusePlan | None = None
    """The items copied from committed videos instead of generated (None for plans that predate reuse)."""

    @property
    def generate_shapes(self) -> tuple[ShapeGroup, ...]:
        """The shape tally of the items left to generate."""
        return self.reuse.generate_shapes if self.reuse is not None else self.shapes

    def items_in_shard(self, shard: str) -> int:
        index = layout.shard_index(shard)
        if not 0 <= index < len(self.shards):
            raise InputError(f"run {self.run_id} has no shard {shard!r} (it has {len(self.shards)})")
        return min(self.shard_size, self.row_count - index * self.shard_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "run_id": self.run_id,
            "name": self.name,
            "source": self.source,
            "manifest_digest": self.manifest_digest,
            "row_count": self.row_count,
            "fingerprint": self.fingerprint,
            "shard_size": self.shard_size,
            "shard_count": len(self.shards),
            "shards": list(self.shards),
            "config": self.config.to_dict(),
            "batchgen_version": self.batchgen_version,
            "created_at": self.created_at,
            "shapes": [group.to_dict() for group in self.shapes],
            "shard_digests": list(self.shard_digests),
            **({"reuse": self.reuse.to_dict()} if self.reuse is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        if data.get("format") != PLAN_FORMAT:
            raise InputError(f"plan format {data.get('format')!r} is not supported (expected {PLAN_FORMAT})")
        shards = list(data["shards"])
        if len(shards) != data["shard_count"]:
            raise InputError(
                f"plan of {data['run_id']}: shard list has {len(shards)} entries, expected {data['shard_count']}"
            )
        return cls(
            run_id=data["run_id"],
            name=data["name"],
            source=data["source"],
            manifest_digest=data["manifest_digest"],
            row_count=int(data["row_count"]),
            config=RunConfig.from_dict(data["config"], source=f"plan of {data['run_id']}"),
            shard_size=int(data["shard_size"]),
            shards=shards,
            fingerprint=data["fingerprint"],
            batchgen_version=data["batchgen_version"],
            created_at=data["created_at"],
            shapes=tuple(ShapeGroup.from_dict(group) for group in data.get("shapes", ())),
            shard_digests=tuple(data.get("shard_digests", ())),
            reuse=ReusePlan.from_dict(data["reuse"]) if "reuse" in data else None,
        )

    def shard_digest(self, shard: str) -> str | None:
        return self.shard_digests[layout.shard_index(shard)] if self.shard_digests else None


# -- identity -----------------------------------------------------------------------------------------------


def slugify(text: str) -> str:
    """A run name usable in object keys and Kubernetes names: lowercase [a-z0-9-], at most 40 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:MAX_SLUG_CHARS].strip("-")
    return slug or "run"


def plan_fingerprint(
    manifest_digest: str,
    row_count: int,
    generation: GenerationConfig,
    shard_size: int,
    model: ModelConfig | None = None,
) -> str:
    """sha256 over exactly what decides the run's outputs.

    In: the manifest's content digest, every generation parameter (shape, steps, guidance, negative prompt, fps,
    crf, token limit: they change the videos), the shard size (it changes which shard holds an item, hence
    every object key), the model family and the weights' fingerprint when known. Out, on purpose: parallel
    degrees, offload, backend and max_attempts. They only change how the same videos get made, so moving a run to
    more GPUs, another topology or a new retry budget must keep the run, its id and everything already committed.
    The model's fields enter the payload only when they differ from Mochi with unknown weights, so the ids of runs
    planned before families existed stay the same.
    """
    payload = {
        "format": PLAN_FORMAT,
        "manifest_digest": manifest_digest,
        "row_count": row_count,
        "generation": dataclasses.asdict(generation),
        "shard_size": shard_size,
    }
    defaults, model = ModelConfig(), model or ModelConfig()
    for key in ("family", "weights"):
        if getattr(model, key) != getattr(defaults, key):
            payload[f"model_{key}"] = getattr(model, key)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def ids_digest(ids) -> str:
    """Order-free digest of a set of item ids (64 bits: it tells one listing from another, it is no secret)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def shard_count(row_count: int, shard_size: int) -> int:
    return -(-row_count // shard_size)


# -- storage ------------------------------------------------------------------------------------------------


def load_plan(storage: Storage, run_id: str) -> RunPlan:
    """The stored plan of ``run_id``; NotFoundError if the run was never (completely) planned there."""
    key = layout.plan_key(run_id)
    try:
        data = storage.get_bytes(key)
    except NotFoundError:
        raise NotFoundError(f"no run {run_id!r} under {storage.uri} ({key} does not exist)") from None
    try:
        return RunPlan.from_dict(json.loads(data))
    except (ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{storage.url(key)} is not a valid plan: {e}") from e


def _load_if_present(storage: Storage, run_id: str) -> RunPlan | None:
    try:
        return load_plan(storage, run_id)
    except NotFoundError:
        return None


def list_runs(storage: Storage) -> list[str]:
    """Run ids planned under this output, sorted."""
    prefix = layout.run_registry_prefix()
    return sorted(layout.item_id_from_key(info.key) for info in storage.list(prefix) if info.key.endswith(".json"))


def locate_run(uri: str, run_id: str | None = None) -> tuple[Storage, RunPlan]:
    """(storage of the output root, plan) of the run ``uri`` names: the run's own folder (``<output>/<run-id>``,
    the folder ``batchgen run`` prints), or the output root with ``run_id``, or the root alone when it holds
    exactly one run. Every command that names a run resolves it here.

    A URI that names no run is invalid input (InputError, exit 2) whose message lists the runs the root holds;
    an output root holding several runs without ``run_id`` raises SeveralRunsError (status lists them)."""
    from batchgen.storage import open_storage

    storage = open_storage(uri)
    runs = list_runs(storage)
    if run_id is None and len(runs) > 1:
        raise SeveralRunsError(storage.uri, runs)
    chosen = run_id or (runs[0] if runs else None)
    plan = _load_if_present(storage, chosen) if chosen else None
    if plan is not None:
        return storage, plan
    if chosen in runs:
        raise _damaged(storage, chosen)
    # Only a URI holding no run of its own is read as a run's folder: a root is never asked about its parent,
    # which a prefix-scoped bucket policy may not let us list.
    parent_uri = _parent_uri(uri)
    parent = open_storage(parent_uri) if parent_uri else None
    folder_run = uri.rstrip("/").rpartition("/")[2]
    if parent is not None and not runs and run_id in (None, folder_run):
        plan = _load_if_present(parent, folder_run)
        if plan is not None:
            return parent, plan
        if folder_run in (_listable_runs(parent) or []):
            raise _damaged(parent, folder_run)
    what = f"no run {run_id!r} under {storage.uri}" if run_id else f"no run at {storage.uri}"
    raise InputError(f"{what}: {_runs_held(runs, parent)}")


class SeveralRunsError(InputError):
    """An output root holding several runs was named without saying which one."""

    def __init__(self, root: str, runs: list[str]):
        self.root = root
        self.runs = runs
        super().__init__(
            f"{root} holds {len(runs)} runs: {', '.join(runs)}; name one by its folder ({root}/<run-id>) "
            "or add --run-id"
        )


def _parent_uri(uri: str) -> str | None:
    """The folder above ``uri``, or None at a bucket, a filesystem root or a bare name."""
    head = uri.rstrip("/").rpartition("/")[0]
    return head if head and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:/*", head) else None


def _damaged(storage: Storage, run_id: str) -> StorageError:
    """A registered run whose plan is gone: the output was damaged, which no other URI would mend."""
    return StorageError(
        f"run {run_id!r} is registered under {storage.uri} ({layout.run_registry_prefix()}) but its plan "
        f"{storage.url(layout.plan_key(run_id))} is missing or unreadable: the output is damaged"
    )


def _listable_runs(folder: Storage | None) -> list[str] | None:
    """The runs under ``folder``; None where these credentials may not list it (a prefix-scoped policy)."""
    try:
        return list_runs(folder) if folder is not None else None
    except StorageError:
        return None


def _runs_held(runs: list[str], parent: Storage | None) -> str:
    """Which runs the output root holds: this folder's, else (a mistyped run folder) its parent's."""
    if runs:
        return f"it holds runs {', '.join(runs)}"
    parent_runs = _listable_runs(parent)
    if parent_runs and parent is not None:
        return f"{parent.uri} holds runs {', '.join(parent_runs)} (name one as {parent.uri}/<run-id>)"
    above = ", nor does the folder above it" if parent_runs == [] else ""
    return f"it holds no run{above} (plan one with `batchgen run` or `batchgen plan`)"


def _runs_named(storage: Storage, slug: str) -> list[str]:
    return [layout.item_id_from_key(i.key) for i in storage.list(layout.run_registry_prefix(slug))]


def _register(storage: Storage, plan: RunPlan) -> None:
    marker = {"run_id": plan.run_id, "fingerprint": plan.fingerprint, "created_at": plan.created_at}
    try:
        storage.put_bytes(
            layout.run_registry_key(plan.name, plan.run_id),
            json.dumps(marker, sort_keys=True).encode(),
            if_absent=True,
            content_type="application/json",
        )
    except AlreadyExistsError:
        pass


def load_shard_items(storage: Storage, run_id: str, shard: str) -> list[Item]:
    """The items of one shard, in manifest order."""
    key = layout.shard_plan_key(run_id, shard)
    try:
        data = storage.get_bytes(key)
    except NotFoundError:
        raise NotFoundError(
            f"run {run_id!r} has no shard {shard!r} under {storage.uri} ({key} does not exist)"
        ) from None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as e:
        raise StorageError(f"{storage.url(key)} is not a readable shard file: {e}") from e
    meta = table.schema.metadata or {}
    if meta.get(b"batchgen.run_id", b"").decode() != run_id or meta.get(b"batchgen.shard", b"").decode() != shard:
        raise StorageError(f"{storage.url(key)} belongs to another run or shard: {meta!r}")
    return items_from_table(table)


def shard_file_bytes(table: pa.Table, run_id: str, shard: str) -> bytes:
    """Parquet bytes of one shard: a pure function of its rows, so a re-plan writes identical files."""
    table = table.combine_chunks().replace_schema_metadata({"batchgen.run_id": run_id, "batchgen.shard": shard})
    sink = pa.BufferOutputStream()
    # Dictionaries, statistics and zstd cost more time than they save on a 64-row file (measured: 1M rows as
    # 15,625 shards serialise in ~2.7 s this way against ~6.5 s with the defaults + zstd).
    pq.write_table(table, sink, compression="snappy", use_dictionary=False, write_statistics=False)
    return sink.getvalue().to_pybytes()


def _shard_tables(batches: Iterator[pa.RecordBatch], shard_size: int) -> Iterator[pa.Table]:
    """Consecutive groups of ``shard_size`` rows, in manifest order, across batch boundaries."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        offset = 0
        while offset < batch.num_rows:
            take = min(shard_size - count, batch.num_rows - offset)
            pending.append(batch.slice(offset, take))
            count += take
            offset += take
            if count == shard_size:
                yield pa.Table.from_batches(pending, ITEM_SCHEMA)
                pending, count = [], 0
    if count:
        yield pa.Table.from_batches(pending, ITEM_SCHEMA)


def _write_threads(storage: Storage) -> int:
    # S3 puts wait on the network: as many in flight as S3Storage keeps connections (32). Local puts are
    # fsync- and CPU-bound: more threads only contend (measured on 2 cores: 16 threads cost 1.6x the CPU
    # of 1-4 for the same puts).
    return 4 if isinstance(storage, LocalStorage) else 32


def _write_shards(storage: Storage, plan: RunPlan, items: Iterator[pa.RecordBatch]) -> list[str]:
    """Write every shard file; returns the shards' id digests."""
    threads = _write_threads(storage)

    def put(index: int, table: pa.Table) -> None:
        shard = layout.shard_id(index)
        storage.put_bytes(
            layout.shard_plan_key(plan.run_id, shard),
            shard_file_bytes(table, plan.run_id, shard),
            content_type="application/vnd.apache.parquet",
        )

    digests: list[str] = []
    # A bounded window of in-flight puts keeps memory flat however many shards there are.
    window: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="plan-put") as pool:
        try:
            for index, table in enumerate(_shard_tables(items, plan.shard_size)):
                window.append(pool.submit(put, index, table))
                digests.append(ids_digest(table.column("id").to_pylist()))
                if len(window) >= 4 * threads:
                    window.popleft().result()
            while window:
                window.popleft().result()
        except BaseException:
            for future in window:
                future.cancel()
            raise
    if len(digests) != len(plan.shards):
        raise StorageError(f"planned {len(plan.shards)} shards but wrote {len(digests)}")  # a bug, never a user error
    return digests


# -- conflicts ----------------------------------------------------------------------------------------------


def describe_changes(old: RunPlan, summary: ManifestSummary, config: RunConfig) -> list[str]:
    """What differs between a stored plan and new inputs, one line per fingerprinted input."""
    changes = []
    if old.manifest_digest != summary.digest:
        changes.append(
            f"manifest content: {old.row_count} rows, digest {old.manifest_digest[:12]} -> "
            f"{summary.rows} rows, digest {summary.digest[:12]} (source {old.source} -> {summary.path})"
        )
    for section in ("model", "generation"):
        before, after = dataclasses.asdict(getattr(old.config, section)), dataclasses.asdict(getattr(config, section))
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"{section}.{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}")
    if old.shard_size != config.worker.shard_size:
        changes.append(f"worker.shard_size (--shard-size): {old.shard_size} -> {config.worker.shard_size}")
    if not changes:
        changes.append(f"plan fingerprint format (planned by batchgen {old.batchgen_version}, now {__version__})")
    return changes


def _conflict(
    storage: Storage, slug: str, run_id: str, others: list[str], summary: ManifestSummary, config: RunConfig
) -> PlanConflictError | None:
    plans = [p for p in (_load_if_present(storage, r) for r in others) if p is not None]
    if not plans:
        return None  # registry markers without plans: nothing to conflict with
    previous = max(plans, key=lambda p: (p.created_at, p.run_id))
    lines = [f"{storage.uri} already holds run {previous.run_id!r} named {slug!r}, planned from different inputs:"]
    lines += [f"  - {change}" for change in describe_changes(previous, summary, config)]
    if len(plans) > 1:
        lines.append(
            f"  (other runs with this name: {', '.join(sorted(p.run_id for p in plans if p is not previous))})"
        )
    lines.append(
        f"To continue {previous.run_id}, plan again with its manifest and generation settings "
        f"(stored in {storage.url(layout.plan_key(previous.run_id))})."
    )
    lines.append(
        f"To start a separate run, pass --new-run (plans {run_id!r}) or choose another --run-name: videos already "
        "committed under this output with the same content and weights are copied into it, not generated again."
    )
    return PlanConflictError("\n".join(lines))


# -- planning -----------------------------------------------------------------------------------------------


def plan_manifest(
    manifest_path: str | Path,
    config: RunConfig,
    storage: Storage,
    *,
    run_name: str | None = None,
    new_run: bool = False,
    max_errors: int = 50,
) -> tuple[RunPlan, bool]:
    """Like ``make_plan``, and also says whether the plan was reused (True) or written now (False)."""
    with tempfile.TemporaryDirectory(prefix="batchgen-plan-") as scratch:
        # The resolved items wait in a local Arrow file while the digest (hence the run id) is unknown:
        # one pass over the manifest, bounded memory, and the shards hold exactly the rows that were hashed.
        spill = Path(scratch) / "items.arrow"
        summary = validate_and_resolve(manifest_path, config.generation, spill, spec=config.spec, max_errors=max_errors)
        return _plan_validated(manifest_path, summary, spill, config, storage, run_name=run_name, new_run=new_run)


def _run_id(slug: str, fingerprint: str) -> str:
    return f"{slug}-{fingerprint[:12]}"


def _plan_validated(
    manifest_path: str | Path,
    summary: ManifestSummary,
    spill: Path,
    config: RunConfig,
    storage: Storage,
    *,
    run_name: str | None,
    new_run: bool,
) -> tuple[RunPlan, bool]:
    slug = slugify(run_name if run_name else Path(manifest_path).stem)
    fingerprint = plan_fingerprint(
        summary.digest, summary.rows, config.generation, config.worker.shard_size, config.model
    )
    with log_context(run_id=_run_id(slug, fingerprint)):
        return _reuse_or_write(manifest_path, summary, spill, config, storage, slug, fingerprint, new_run=new_run)


def _reuse_or_write(
    manifest_path: str | Path,
    summary: ManifestSummary,
    spill: Path,
    config: RunConfig,
    storage: Storage,
    slug: str,
    fingerprint: str,
    *,
    new_run: bool,
) -> tuple[RunPlan, bool]:
    run_id, shard_size = _run_id(slug, fingerprint), config.worker.shard_size
    stored = _load_if_present(storage, run_id)
    if stored is not None:
        if stored.fingerprint != fingerprint:
            raise PlanConflictError(
                f"{storage.uri}: run {run_id} exists with fingerprint {stored.fingerprint}, not {fingerprint} "
                "(a 48-bit prefix collision); choose another --run-name"
            )
        _register(storage, stored)  # in case an earlier planner crashed right after run.json
        log.info("reusing the stored plan of %s (%d shards)", run_id, len(stored.shards))
        # Same digest, same items: the shapes just counted are the stored plan's, even where it predates them.
        return dataclasses.replace(stored, shapes=summary.shapes), True

    if not new_run:
        others = [r for r in _runs_named(storage, slug) if r != run_id]
        conflict = _conflict(storage, slug, run_id, others, summary, config) if others else None
        if conflict is not None:
            raise conflict

    plan = RunPlan(
        run_id=run_id,
        name=slug,
        source=str(manifest_path),
        manifest_digest=summary.digest,
        row_count=summary.rows,
        config=config,
        shard_size=shard_size,
        shards=[layout.shard_id(i) for i in range(shard_count(summary.rows, shard_size))],
        fingerprint=fingerprint,
        batchgen_version=__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        shapes=summary.shapes,
    )
    log.info("planning %s: %d items in %d shards of %d", run_id, plan.row_count, len(plan.shards), shard_size)
    return _store_plan(storage, plan, spill)


def _store_plan(storage: Storage, plan: RunPlan, spill: Path) -> tuple[RunPlan, bool]:
    """Write the shard files, then the plan (a conditional create: the commit of the plan) and register the run.
    Returns (the stored plan, whether a concurrent planner with the same inputs had stored it first)."""
    with pa.memory_map(str(spill)) as source:
        digests = _write_shards(storage, plan, iter(pa.ipc.open_stream(source)))
    plan = dataclasses.replace(plan, shard_digests=tuple(digests), reuse=_plan_reuse(storage, plan, spill))
    body = json.dumps(plan.to_dict(), indent=1, sort_keys=True).encode()
    try:
        storage.put_bytes(layout.plan_key(plan.run_id), body, if_absent=True, content_type="application/json")
    except AlreadyExistsError:
        # A concurrent planner with the same inputs committed first; its shards are byte-identical to ours.
        stored = load_plan(storage, plan.run_id)
        if stored.fingerprint != plan.fingerprint:
            raise PlanConflictError(
                f"{storage.uri}: run {plan.run_id} was planned concurrently from other inputs"
            ) from None
        _register(storage, stored)
        return stored, True
    _register(storage, plan)
    return plan, False


def _plan_reuse(storage: Storage, plan: RunPlan, spill: Path) -> ReusePlan:
    """Find the items to copy and write their ``plan/reuse/`` files (before ``run.json``, like the shards)."""
    with pa.memory_map(str(spill)) as source:
        sources, ids, note = plan_sources(storage, plan.run_id, plan.config, iter(pa.ipc.open_stream(source)))
    shards = write_reuse_files(storage, plan.run_id, plan.shard_size, ids, sources)
    mask = copy_mask(plan.row_count, sources)

    def to_generate() -> Iterator[pa.RecordBatch]:
        start = 0
        with pa.memory_map(str(spill)) as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.filter(pa.array(~mask[start : start + batch.num_rows]))
                start += batch.num_rows

    copies = sum(s.run_id != plan.run_id for s in sources.values())
    if copies or len(sources) > copies:
        log.info(
            "%s: %d item(s) copied from earlier runs, %d duplicate row(s)", plan.run_id, copies, len(sources) - copies
        )
    return ReusePlan(copies, len(sources) - copies, tuple(shards), note, tally_shapes(to_generate()))


def make_plan(
    manifest_path: str | Path,
    config: RunConfig,
    storage: Storage,
    *,
    run_name: str | None = None,
    new_run: bool = False,
) -> RunPlan:
    """Validate, then reuse an identical stored plan or write a new one; refuse a changed one.

    Raises ManifestError (exit 2) for a bad manifest and PlanConflictError (exit 4) when a run of the same
    name was planned from other inputs, unless ``new_run``.
    """
    return plan_manifest(manifest_path, config, storage, run_name=run_name, new_run=new_run)[0]


def parse_shard_selection(text: str, plan: RunPlan) -> list[str]:
    """Shards named by ``text``, in shard order without repeats.

    ``all``; ``A:B`` (half-open indices, either end may be left out); ``3``; ``shard-000003``; or a comma list
    of these.
    """
    n = len(plan.shards)
    where = f"shard selection {text!r} (run {plan.run_id} has {n} shards, indices 0..{n - 1})"
    if text.strip().lower() == "all":
        return list(plan.shards)
    chosen: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        try:
            if not part:
                raise ValueError("empty entry")
            if ":" in part:
                start_text, _, end_text = part.partition(":")
                start = int(start_text) if start_text.strip() else 0
                end = int(end_text) if end_text.strip() else n
                if not 0 <= start < end <= n:
                    raise ValueError(f"{part!r} is not a non-empty range within 0:{n}")
                chosen.update(range(start, end))
            else:
                index = layout.shard_index(part) if part.startswith("shard-") else int(part)
                if not 0 <= index < n:
                    raise ValueError(f"{part!r} is out of range")
                chosen.add(index)
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None
    return [plan.shards[i] for i in sorted(chosen)]
