"""Reuse at scale (CPU, moto S3): plan a grown manifest over an output that holds 100,000 committed items.

The committed state is written synthetically through the code that writes the content map (``write_content_part``
per shard of 64, as workers do when a shard finishes; then ``write_content_run``, as building the run's index does):
no videos or sidecars, since finding reusable items reads nothing else. Then, for the map as parts only (a run still
generating) and with the run's merged file (a run whose index was built):

- finding: ``find_sources`` over the grown manifest's content keys: seconds and S3 requests (median of --repeats);
- planning: ``make_plan`` of the grown manifest (content keys, finding, shard and reuse files, run.json): seconds and
  requests, checking that every old row is planned as a copy.

Usage: python bench/reuse_scale.py [--committed N] [--rows N] [--new N] [--repeats R]. Writes
bench/results/reuse-scale-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchgen.core import layout  # noqa: E402
from batchgen.core.config import RunConfig  # noqa: E402
from batchgen.core.content import content_keys  # noqa: E402
from batchgen.core.manifest import iter_item_batches  # noqa: E402
from batchgen.core.plan import make_plan  # noqa: E402
from batchgen.core.reuse import find_sources, write_content_part, write_content_run  # noqa: E402
from batchgen.storage import open_storage  # noqa: E402
from bench.pipeline import moto_endpoint, new_bucket  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "reuse-scale-cpu.json"
WEIGHTS = "5eed" * 8
EARLIER_RUN = "earlier-000000000000"
SHARD_SIZE = 64


def write_manifest(path: Path, ids: list[str]) -> Path:
    numbers = [int(i[1:]) for i in ids]
    pq.write_table(
        pa.table(
            {"id": ids, "prompt": [f"{i[0]} prompt {n}" for i, n in zip(ids, numbers, strict=True)], "seed": numbers}
        ),
        path,
    )
    return path


def committed_rows(manifest: Path, config: RunConfig) -> pa.Table:
    """The content map rows of the earlier run, as its index would give them."""
    tables = []
    for batch in iter_item_batches(manifest, config.generation, spec=config.spec):
        keys = content_keys(batch, config.generation, config.model.family, WEIGHTS)
        tables.append(pa.table({"content_key": keys, "id": batch.column("id")}))
    table = pa.concat_tables(tables)
    shards = [layout.shard_id(row // SHARD_SIZE) for row in range(table.num_rows)]
    return (
        table.append_column("run_id", pa.array([EARLIER_RUN] * table.num_rows))
        .append_column("shard", pa.array(shards))
        .append_column("model_fingerprint", pa.array([WEIGHTS] * table.num_rows))
    )


def write_parts(storage, rows: pa.Table) -> list[str]:
    """One content part per shard, as each worker writes beside its shard's index part."""
    starts = range(0, rows.num_rows, SHARD_SIZE)

    def put(start: int) -> str:
        part = rows.slice(start, SHARD_SIZE)
        shard = layout.shard_id(start // SHARD_SIZE)
        write_content_part(storage, EARLIER_RUN, shard, "synthetic", part)
        return f"{shard}-synthetic"

    with ThreadPoolExecutor(max_workers=32) as pool:
        names = list(pool.map(put, starts))
    return names


def measure_find(storage, keys: list[str], repeats: int) -> dict:
    seconds, requests, found = [], [], 0
    for _ in range(repeats):
        before, t0 = storage.request_count, time.perf_counter()
        found = len(find_sources(storage, keys, exclude_run="grown"))
        seconds.append(time.perf_counter() - t0)
        requests.append(storage.request_count - before)
    return {"seconds_median": round(statistics.median(seconds), 3), "seconds": [round(s, 3) for s in seconds],
            "requests_median": statistics.median(requests), "found": found}  # fmt: skip


def measure_plan(storage, manifest: Path, config: RunConfig, name: str, expected_copies: int) -> dict:
    before, t0 = storage.request_count, time.perf_counter()
    plan = make_plan(manifest, config, storage, run_name=name)
    seconds = time.perf_counter() - t0
    assert plan.reuse.copies == expected_copies, (plan.reuse, expected_copies)
    return {"seconds": round(seconds, 2), "requests": storage.request_count - before, "copies": plan.reuse.copies,
            "to_generate": plan.row_count - plan.reuse.reused, "shards": len(plan.shards)}  # fmt: skip


def run(args, uri: str, scratch: Path) -> dict:
    config = RunConfig.from_dict({"model": {"weights": WEIGHTS}, "worker": {"shard_size": SHARD_SIZE}})
    storage = open_storage(uri)
    old_ids = [f"a{i:07d}" for i in range(args.committed)]
    earlier = write_manifest(scratch / "earlier.parquet", old_ids)
    rows = committed_rows(earlier, config)
    t0 = time.perf_counter()
    names = write_parts(storage, rows)
    print(f"wrote {len(names)} content parts for {rows.num_rows:,} committed items in {time.perf_counter() - t0:.1f} s")
    kept = random.Random(7).sample(old_ids, args.rows - args.new)
    grown = write_manifest(scratch / "grown.parquet", kept + [f"b{i:07d}" for i in range(args.new)])
    keys = [k for b in iter_item_batches(grown, config.generation, spec=config.spec)
            for k in content_keys(b, config.generation, config.model.family, WEIGHTS)]  # fmt: skip
    result = {"parts": {"find": measure_find(storage, keys, args.repeats)}}
    result["parts"]["plan"] = measure_plan(storage, grown, config, "grown-parts", len(kept))
    merged_file = scratch / "index.parquet"
    pq.write_table(rows, merged_file)
    write_content_run(storage, EARLIER_RUN, str(merged_file), names)
    result["merged"] = {"find": measure_find(storage, keys, args.repeats)}
    result["merged"]["plan"] = measure_plan(storage, grown, config, "grown-merged", len(kept))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--committed", type=int, default=100_000, help="committed items in the output")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the grown manifest")
    parser.add_argument("--new", type=int, default=5_000, help="of which new (the rest are committed ones, shuffled)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with moto_endpoint() as endpoint, tempfile.TemporaryDirectory() as scratch:
        figures = run(args, new_bucket(endpoint), Path(scratch))
    result = {"committed": args.committed, "rows": args.rows, "new": args.new, "shard_size": SHARD_SIZE,
              "storage": "moto S3 server (own process, loopback)", "machine": platform.platform(),
              "cpus": os.cpu_count(), **figures}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for variant in ("parts", "merged"):
        find, plan = figures[variant]["find"], figures[variant]["plan"]
        print(f"{variant:6s} find: {find['seconds_median']:.2f} s, {find['requests_median']} requests, "
              f"{find['found']:,} reusable | plan: {plan['seconds']:.1f} s, {plan['requests']} requests, "
              f"{plan['copies']:,} copies, {plan['to_generate']:,} to generate")  # fmt: skip
    print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
