"""Model fetch (CPU, moto S3): one stream per file against boto3's transfer manager (concurrent ranged GETs).

One object of --size-gib is uploaded (streamed from a scratch file, never held in memory), then downloaded --repeats
times by each variant, alternating so that a burst of load on the shared machine hits every variant alike:

- ``one-stream``: one GetObject whose body is copied to a temporary file and renamed, as ``S3Storage.get_file`` did
  before it used the transfer manager (kept here only as the baseline);
- ``transfer cN/M MiB``: ``S3Storage.get_file`` itself (a GET whose answer gives the size and ETag, then boto3's
  transfer manager: ranged GETs of M MiB, N in flight).

Every download is checked (size and sha256 against the source) outside the timed part. Medians are quoted, with
each variant's ratio to the one-stream median of the same run. moto runs in its own process on loopback, as in
bench/pipeline.py. moto (5.x) answers every GET, ranged or not, by reading the whole object under the key's lock and
slicing it (moto/s3/models.py ``FakeKey.value``, moto/s3/responses.py ``_handle_range_header``): a range costs as
much server time as the whole object, so on moto many small ranges lose to one stream by design of the stand-in,
not of S3.

Usage: python bench/fetch.py [--size-gib 2] [--repeats 3] [--transfer 8x16,1x256,4x256,8x256] [--results PATH]. Writes bench/results/fetch-cpu.json unless --results says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchgen.storage.local import TEMP_PREFIX  # noqa: E402
from batchgen.storage.s3 import DEFAULT_DOWNLOAD_CONCURRENCY, DEFAULT_PART_SIZE, S3Storage  # noqa: E402
from bench.pipeline import moto_endpoint, new_bucket  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fetch-cpu.json"
KEY = "model/weights.safetensors"
WRITE_BLOCK = 16 * 1024 * 1024
MIB = 1024 * 1024
# The backend's own settings, then a concurrency sweep with ranges large enough that moto's per-request cost (a
# whole-object read, whatever the Range: see the module docstring) does not drown what concurrency changes.
DEFAULT_TRANSFER = [(DEFAULT_DOWNLOAD_CONCURRENCY, DEFAULT_PART_SIZE // MIB), (1, 256), (4, 256), (8, 256)]


def write_source(path: Path, size: int) -> str:
    """Random bytes, written a block at a time; returns their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(WRITE_BLOCK, left))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(WRITE_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def one_stream(storage: S3Storage, dest: Path) -> None:
    """The baseline: the single-GET body copy of get_file before the transfer manager (main at bc3c4ce)."""
    temp = dest.parent / f"{TEMP_PREFIX}{dest.name}.{uuid.uuid4().hex}"
    body = storage._client.get_object(Bucket=storage.bucket, Key=storage._full_key(KEY))["Body"]
    with open(temp, "wb") as f:
        for chunk in body.iter_chunks(MIB):
            f.write(chunk)
    os.replace(temp, dest)


def variants(bucket: str, prefix: str, settings: list[tuple[int, int]]) -> dict:
    """Variant name -> a function downloading the object to a path."""
    baseline = S3Storage(bucket, prefix)
    found = {"one-stream": lambda dest: one_stream(baseline, dest)}
    for concurrency, chunk_mib in settings:
        storage = S3Storage(bucket, prefix, part_size=chunk_mib * MIB, download_concurrency=concurrency)
        found[f"transfer c{concurrency}/{chunk_mib} MiB"] = lambda dest, s=storage: s.get_file(KEY, dest)
    return found


def measure(downloads: dict, repeats: int, scratch: Path, size: int, sha256: str) -> dict:
    seconds: dict[str, list[float]] = {name: [] for name in downloads}
    for _ in range(repeats):
        for name, download in downloads.items():
            dest = scratch / "download.bin"
            start = time.perf_counter()
            download(dest)
            seconds[name].append(time.perf_counter() - start)
            got_size, got_sha = dest.stat().st_size, file_sha256(dest)
            if (got_size, got_sha) != (size, sha256):
                raise SystemExit(f"{name}: downloaded {got_size} bytes, sha256 {got_sha}; expected {size}, {sha256}")
            dest.unlink()
            print(f"  {name:24s} {seconds[name][-1]:7.2f} s (verified)", flush=True)
    baseline = statistics.median(seconds["one-stream"])
    return {
        name: {
            "seconds_median": round(statistics.median(values), 3),
            "seconds": [round(v, 3) for v in values],
            "mib_per_s_median": round(size / MIB / statistics.median(values), 1),
            "speedup_vs_one_stream": round(baseline / statistics.median(values), 2),
        }
        for name, values in seconds.items()
    }


def run(args, uri: str, scratch: Path) -> dict:
    size = int(args.size_gib * 1024**3)
    source = scratch / "source.bin"
    sha256 = write_source(source, size)
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    start = time.perf_counter()
    S3Storage(bucket, prefix).put_file(KEY, source)
    upload_s = time.perf_counter() - start
    source.unlink()  # only its digest is needed from here on; halves the scratch space
    print(f"uploaded {size / MIB:,.0f} MiB in {upload_s:.1f} s", flush=True)
    downloads = variants(bucket, prefix, args.transfer)
    return {"upload_seconds": round(upload_s, 3), "variants": measure(downloads, args.repeats, scratch, size, sha256)}


def transfer_settings(text: str) -> list[tuple[int, int]]:
    """ "8x16,4x256" -> [(8, 16), (4, 256)]: ranged GETs in flight x range size in MiB."""
    try:
        return [(int(c), int(m)) for c, m in (part.split("x") for part in text.split(",") if part)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CONCURRENCYxMIB[,...], e.g. 8x16,4x256") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="size of the object (GiB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--transfer",
        type=transfer_settings,
        default=DEFAULT_TRANSFER,
        help="transfer-manager settings to time, CONCURRENCYxMIB[,...] (default: %(default)s)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    with moto_endpoint() as endpoint, tempfile.TemporaryDirectory() as scratch:
        figures = run(args, new_bucket(endpoint), Path(scratch))
    result = {"size_bytes": int(args.size_gib * 1024**3), "repeats": args.repeats,
              "storage": "moto S3 server (own process, loopback)", "machine": platform.platform(),
              "cpus": os.cpu_count(), **figures}  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    for name, figure in figures["variants"].items():
        print(f"{name:24s} median {figure['seconds_median']:7.2f} s  {figure['mib_per_s_median']:7.1f} MiB/s  "
              f"x{figure['speedup_vs_one_stream']:.2f} vs one-stream")  # fmt: skip
    print(f"-> {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
