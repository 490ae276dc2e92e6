"""Control-plane benchmarks (CPU): planning, worker bookkeeping, resume scan. Writes bench/results/pipeline-cpu.json.

1. Planning a 1,000,000-row manifest into a local folder: seconds and peak RSS, measured in a child process
   (resource.getrusage), so this script's own memory does not count. Targets: < 20 s, < 1.5 GiB.
2. Worker bookkeeping: ``run_worker`` with a stand-in generator that returns fixed frames (the only stand-in
   in this benchmark; it isolates what the worker adds around generation): MP4 encode + probe + sha256 + video
   put + sidecar put, against a moto S3 server running in its own process. Items per second for one worker
   process. Target: >= 40/s.
3. Resume scan of a shard with 10,000 committed items on that S3 server: seconds and S3 requests.
   Targets: < 2 s, < 20 requests.
4. Index build of 100,000 committed items on that S3 server (shards of 64, each with the part its worker wrote at
   shard end): ``batchgen.dataset.index.finalize`` in a child process, so seconds, S3 requests and peak RSS are its own;
   projected to 1,000,000 items from the per-item time and the per-row memory above the child's baseline.
   Goals: <= 2 requests per shard, < 1 GiB at 1,000,000 rows. ``--only index`` runs just this one and keeps the
   other figures of the results file.

Each figure is the median over ``--repeats`` runs.  Usage: python bench/pipeline.py [--rows N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchgen.core import layout  # noqa: E402
from batchgen.core.config import RunConfig  # noqa: E402
from batchgen.core.plan import load_shard_items, make_plan  # noqa: E402
from batchgen.core.records import Sidecar  # noqa: E402
from batchgen.core.video import encode_mp4  # noqa: E402
from batchgen.dataset.index import write_part  # noqa: E402
from batchgen.models.api import GeneratedVideo  # noqa: E402
from batchgen.storage import open_storage  # noqa: E402
from batchgen.worker.context import SingleProcess  # noqa: E402
from batchgen.worker.loop import run_worker, scan_shard  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "pipeline-cpu.json"
TARGETS = {"plan_seconds": 20.0, "plan_peak_rss_gib": 1.5, "items_per_second": 40.0, "scan_seconds": 2.0,
           "scan_requests": 20, "index_requests_per_shard": 2.0, "index_1m_peak_rss_gib": 1.0}  # fmt: skip

INDEX_CHILD = """
import json, resource, sys, time
from batchgen.dataset.index import finalize
from batchgen.core.plan import load_plan
from batchgen.storage import open_storage
storage = open_storage(sys.argv[1])
plan = load_plan(storage, sys.argv[2])
baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = storage.request_count
start = time.perf_counter()
result = finalize(storage, plan)
seconds = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "requests": storage.request_count - before, "rows": result.rows,
                  "complete": result.complete, "baseline_rss_gib": baseline_kib / 2**20,
                  "peak_rss_gib": peak_kib / 2**20}))
"""

PLAN_CHILD = """
import json, resource, sys, time
from batchgen.core.config import RunConfig
from batchgen.core.plan import make_plan
from batchgen.storage import open_storage
manifest, out = sys.argv[1], sys.argv[2]
start = time.perf_counter()
plan = make_plan(manifest, RunConfig(), open_storage(out))
seconds = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_kib / 2**20, "shards": len(plan.shards)}))
"""


def write_big_manifest(path: Path, rows: int) -> None:
    words = np.array("a red fox runs through snow under a pale winter sky near old pine trees at dawn".split())
    rng = np.random.default_rng(0)
    writer = None
    chunk = 100_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        picks = rng.integers(0, len(words), size=(n, 10))
        prompts = [" ".join(words[p]) + f" {start + i}" for i, p in enumerate(picks)]
        table = pa.table({"id": [f"v{start + i:08d}" for i in range(n)], "prompt": prompts})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=chunk)
    writer.close()


def bench_plan(rows: int, repeats: int, scratch: Path) -> dict:
    manifest = scratch / "big.parquet"
    write_big_manifest(manifest, rows)
    runs = []
    for i in range(repeats):
        out = scratch / f"plan-out-{i}"
        result = subprocess.run(
            [sys.executable, "-c", PLAN_CHILD, str(manifest), str(out)],
            capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        subprocess.run(["rm", "-rf", str(out)], check=True)
    return {
        "rows": rows,
        "shard_size": RunConfig().worker.shard_size,
        "shards": runs[0]["shards"],
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in runs),
        "runs": runs,
    }


class FixedFrames:
    """Stand-in generator: the same frames for every item (generation itself is benchmarked elsewhere)."""

    model_identity = {"path": "<fixed frames>", "fingerprint": "0" * 64}

    def __init__(self, frames: np.ndarray):
        self.frames = frames

    def prepare(self, items):
        pass

    def generate(self, item):
        return GeneratedVideo(self.frames, {"text_encode": 0.0, "denoise": 0.0, "decode": 0.0})

    def close(self):
        pass


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


@contextmanager
def moto_endpoint() -> Iterator[str]:
    """A moto server for the duration, with AWS_ENDPOINT_URL pointing at it and stand-in credentials unless set."""
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    moto, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        moto.terminate()
        moto.wait()


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}/out"


def small_manifest(path: Path, rows: int) -> Path:
    pq.write_table(pa.table({"id": [f"i{i:06d}" for i in range(rows)], "prompt": [f"prompt {i}" for i in range(rows)]}),
                   path)  # fmt: skip
    return path


TINY = {"num_frames": 13, "height": 64, "width": 64, "num_inference_steps": 2}


def clip_frames(count: int, height: int, width: int, *, noise: bool) -> np.ndarray:
    """A smooth moving gradient (what decoded videos look like to the encoder), or uniform noise (its worst case)."""
    if noise:
        return np.random.default_rng(0).integers(0, 255, (count, height, width, 3), np.uint8)
    t, y, x = np.meshgrid(np.arange(count), np.arange(height), np.arange(width), indexing="ij")
    channels = [(x * 3 + t * 5) % 256, (y * 3 + t * 2) % 256, ((x + y) * 2 + t * 7) % 256]
    return np.stack(channels, axis=-1).astype(np.uint8)


def bench_bookkeeping(endpoint: str, repeats: int, items: int, scratch: Path, *, noise: bool = False) -> dict:
    config = RunConfig().with_overrides({"generation": TINY, "worker": {"shard_size": 50}})
    frames = clip_frames(TINY["num_frames"], TINY["height"], TINY["width"], noise=noise)
    manifest = small_manifest(scratch / "bookkeeping.parquet", items)
    runs = []
    for _ in range(repeats):
        storage = open_storage(new_bucket(endpoint))
        plan = make_plan(manifest, config, storage)
        before = storage.request_count
        start = time.perf_counter()
        summary = run_worker(storage, plan, plan.shards, FixedFrames(frames), SingleProcess())
        seconds = time.perf_counter() - start
        assert summary.generated == items, summary
        runs.append({"seconds": seconds, "items_per_second": items / seconds,
                     "requests_per_item": (storage.request_count - before) / items})  # fmt: skip
    return {
        "items": items,
        "frames": list(frames.shape),
        "content": "uniform noise (encoder worst case)" if noise else "smooth moving gradient",
        "mp4_bytes": len(encode_mp4(frames, 30, 18)),
        "items_per_second": statistics.median(r["items_per_second"] for r in runs),
        "requests_per_item": statistics.median(r["requests_per_item"] for r in runs),
        "runs": runs,
    }


def bench_scan(endpoint: str, repeats: int, committed: int, scratch: Path) -> dict:
    config = RunConfig().with_overrides({"worker": {"shard_size": committed}})
    uri = new_bucket(endpoint)
    storage = open_storage(uri)
    plan = make_plan(small_manifest(scratch / "scan.parquet", committed), config, storage)
    shard = plan.shards[0]
    ids = [f"i{i:06d}" for i in range(committed)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: storage.put_bytes(layout.sidecar_key(plan.run_id, shard, i), b"{}"), ids))
    runs = []
    for _ in range(repeats):
        fresh = open_storage(uri)
        fresh.head(layout.plan_key(plan.run_id))  # connection set-up is not part of the scan
        before = fresh.request_count
        start = time.perf_counter()
        scan = scan_shard(fresh, plan.run_id, shard)
        seconds = time.perf_counter() - start
        assert len(scan.done) == committed and not scan.pending
        runs.append({"seconds": seconds, "requests": fresh.request_count - before})
    return {
        "committed_items": committed,
        "seconds": statistics.median(r["seconds"] for r in runs),
        "requests": statistics.median(r["requests"] for r in runs),
        "runs": runs,
    }


def _commit_shard(storage, plan, shard: str) -> None:
    """What a worker leaves for one shard: a sidecar per item, then the shard's part from those records."""
    records = {}
    for item in load_shard_items(storage, plan.run_id, shard):
        key = layout.video_key(plan.run_id, shard, item.id)
        sidecar = Sidecar.for_item(
            item, shard=shard, run_id=plan.run_id, fps=30, crf=18, video_key=key, video_uri=storage.url(key),
            sha256="ab" * 32, size_bytes=2656, frames=13, video_width=64, video_height=64, duration_s=0.433,
            model={"path": "/models/mochi", "fingerprint": "0" * 64},
            timings={"text_encode": 0.1, "denoise": 9.5, "decode": 1.2, "encode_mp4": 0.02, "upload": 0.01},
            attempt=1, host="bench", batchgen_version="bench", parallel={"world_size": 8, "dp_size": 1},
            created_at="2026-01-01T00:00:00.000Z", adopted=False,
        )  # fmt: skip
        storage.put_bytes(layout.sidecar_key(plan.run_id, shard, item.id), sidecar.to_json())
        records[item.id] = sidecar.to_dict()
    etags = {
        layout.item_id_from_key(info.key): info.etag
        for info in storage.list(layout.sidecars_prefix(plan.run_id, shard))
    }
    write_part(storage, plan.run_id, shard, etags, records)


def bench_index(endpoint: str, items: int, scratch: Path) -> dict:
    config = RunConfig().with_overrides({"generation": TINY, "worker": {"shard_size": 64}})
    uri = new_bucket(endpoint)
    storage = open_storage(uri)
    plan = make_plan(small_manifest(scratch / "index.parquet", items), config, storage)
    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda shard: _commit_shard(storage, plan, shard), plan.shards))
    print(
        f"  committed {items:,} items in {len(plan.shards):,} shards in {time.perf_counter() - start:.0f} s", flush=True
    )
    child = subprocess.run([sys.executable, "-c", INDEX_CHILD, uri, plan.run_id], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)  # fmt: skip
    run = json.loads(child.stdout.strip().splitlines()[-1])
    assert run["rows"] == items and run["complete"], run
    shards = len(plan.shards)
    per_row_gib = max(0.0, run["peak_rss_gib"] - run["baseline_rss_gib"]) / items
    return {
        "items": items,
        "shards": shards,
        **run,
        "requests_per_shard": run["requests"] / shards,
        "seconds_per_item": run["seconds"] / items,
        "projected_1m": {
            "seconds": run["seconds"] / items * 1_000_000,
            "requests": run["requests"] / shards * (1_000_000 / 64),
            "peak_rss_gib": run["baseline_rss_gib"] + per_row_gib * 1_000_000,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="manifest rows to plan")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=200, help="items per bookkeeping run")
    parser.add_argument("--scan-items", type=int, default=10_000)
    parser.add_argument("--index-items", type=int, default=100_000)
    parser.add_argument("--only", choices=["index"], default=None, help="run one benchmark, keep the other figures")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    if args.only == "index":
        return _index_only(args)
    with tempfile.TemporaryDirectory(prefix="batchgen-bench-") as tmp:
        scratch = Path(tmp)
        print(f"planning {args.rows:,} rows x {args.repeats} ...", flush=True)
        plan = bench_plan(args.rows, args.repeats, scratch)
        moto, endpoint = start_moto()
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        try:
            print(f"worker bookkeeping, {args.items} items x {args.repeats} ...", flush=True)
            bookkeeping = bench_bookkeeping(endpoint, args.repeats, args.items, scratch)
            noise = bench_bookkeeping(endpoint, args.repeats, args.items, scratch, noise=True)
            print(f"resume scan of {args.scan_items:,} committed items x {max(5, args.repeats)} ...", flush=True)
            scan = bench_scan(endpoint, max(5, args.repeats), args.scan_items, scratch)
            print(f"index build of {args.index_items:,} committed items ...", flush=True)
            index = bench_index(endpoint, args.index_items, scratch)
        finally:
            moto.terminate()
            moto.wait()

    rows = [
        ("plan 1M rows: seconds", plan["seconds"], f"< {TARGETS['plan_seconds']}", plan["seconds"] < TARGETS["plan_seconds"]),
        ("plan 1M rows: peak RSS GiB", plan["peak_rss_gib"], f"< {TARGETS['plan_peak_rss_gib']}",
         plan["peak_rss_gib"] < TARGETS["plan_peak_rss_gib"]),
        ("bookkeeping: items/s/process", bookkeeping["items_per_second"], f">= {TARGETS['items_per_second']}",
         bookkeeping["items_per_second"] >= TARGETS["items_per_second"]),
        ("bookkeeping: S3 requests/item", bookkeeping["requests_per_item"], "", True),
        ("bookkeeping, noise frames: items/s", noise["items_per_second"], "(worst)", True),
        ("resume scan 10k: seconds", scan["seconds"], f"< {TARGETS['scan_seconds']}", scan["seconds"] < TARGETS["scan_seconds"]),
        ("resume scan 10k: S3 requests", scan["requests"], f"< {TARGETS['scan_requests']}",
         scan["requests"] < TARGETS["scan_requests"]),
        *_index_rows(index),
    ]  # fmt: skip
    _print_rows(rows)
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "repeats": args.repeats,
        "plan": plan,
        "bookkeeping": bookkeeping,
        "bookkeeping_noise_frames": noise,
        "resume_scan": scan,
        "index_build": index,
        "targets": TARGETS,
        "all_targets_met": all(ok for *_, ok in rows),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


def _index_rows(index: dict) -> list[tuple]:
    projected = index["projected_1m"]
    return [
        ("index 100k: seconds", index["seconds"], "", True),
        ("index 100k: S3 requests/shard", index["requests_per_shard"], f"<= {TARGETS['index_requests_per_shard']}",
         index["requests_per_shard"] <= TARGETS["index_requests_per_shard"]),
        ("index 100k: peak RSS GiB", index["peak_rss_gib"], "", True),
        ("index 1M (projected): seconds", projected["seconds"], "", True),
        ("index 1M (projected): RSS GiB", projected["peak_rss_gib"], f"< {TARGETS['index_1m_peak_rss_gib']}",
         projected["peak_rss_gib"] < TARGETS["index_1m_peak_rss_gib"]),
    ]  # fmt: skip


def _print_rows(rows: list[tuple]) -> None:
    print(f"\n{'measure':<32} {'median':>10}  {'target':<8} ok")
    for name, value, target, ok in rows:
        print(f"{name:<32} {value:>10.3f}  {target:<8} {'yes' if ok else 'NO'}")


def _index_only(args) -> int:
    with tempfile.TemporaryDirectory(prefix="batchgen-bench-") as tmp:
        moto, endpoint = start_moto()
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        try:
            print(f"index build of {args.index_items:,} committed items ...", flush=True)
            index = bench_index(endpoint, args.index_items, Path(tmp))
        finally:
            moto.terminate()
            moto.wait()
    rows = _index_rows(index)
    _print_rows(rows)
    result = json.loads(args.output.read_text()) if args.output.exists() else {"targets": TARGETS}
    result["index_build"] = index
    result["targets"] = TARGETS
    result["all_targets_met"] = bool(result.get("all_targets_met", True)) and all(ok for *_, ok in rows)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
