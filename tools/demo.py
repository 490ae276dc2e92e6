"""``python -m tools.demo --out DIR [--family wan]`` (``make demo [FAMILY=wan]``): a complete batch run here.

Builds the tiny random model of the family into ``DIR/model`` (Mochi) or ``DIR/model-<family>`` (once), writes a 6-prompt manifest, runs exactly what
``batchgen run`` runs (2 local workers, the tiny model's generation defaults) into ``DIR/output``, prints the
summary and reads the index back with pyarrow (and duckdb when installed). Run it again: it resumes, finds
every item done and generates nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.cli import configure_logging
from batchgen.core import layout
from batchgen.core.config import load_config
from batchgen.core.errors import BatchgenError
from batchgen.launch.local import run_local
from batchgen.models import FAMILIES, MOCHI, ModelSpec
from batchgen.storage import open_storage

log = logging.getLogger("batchgen.demo")

PROMPTS = [
    ("fox-snow", "a red fox trotting through deep fresh snow, morning light"),
    ("waves", "slow waves breaking on black volcanic rocks at dusk"),
    ("paper-boat", "a paper boat drifting down a rain-soaked street gutter"),
    ("clouds", "time-lapse of clouds rolling over a mountain ridge"),
    ("hummingbird", "a hummingbird hovering beside a pink hibiscus flower"),
    ("city-night", "aerial view of city traffic at night, long light trails"),
]
DEMO_STEPS = 4


def write_demo_manifest(path: Path) -> Path:
    ids, prompts = zip(*PROMPTS, strict=True)
    table = pa.table({"id": list(ids), "prompt": list(prompts), "seed": pa.array(range(len(ids)), pa.int64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def ensure_tiny_model(model_dir: Path, spec: ModelSpec = MOCHI) -> Path:
    from batchgen.models.common.tiny import TINY_TOML_NAME

    if not (model_dir / TINY_TOML_NAME).is_file():
        log.info("writing the tiny random %s to %s", spec.title, model_dir)
        spec.write_tiny_model(model_dir, seed=0)
    return model_dir


def show_index(output: str, run_id: str) -> None:
    storage = open_storage(output)
    data = storage.get_bytes(layout.index_key(run_id))
    table = pq.read_table(pa.BufferReader(data))
    print(f"\nindex: {table.num_rows} rows x {table.num_columns} columns (pyarrow)")
    for row in table.select(["id", "frames", "duration_s", "size_bytes", "sha256"]).to_pylist():
        print(
            f"  {row['id']:<12} {row['frames']:>3} frames {row['duration_s']:.2f} s {row['size_bytes']:>7} B "
            f"sha256 {row['sha256'][:12]}"
        )
    try:
        import duckdb
    except ImportError:
        return
    local = Path(output) / layout.index_key(run_id)
    if local.is_file():
        query = f"SELECT count(*), round(avg(timings_denoise), 3), sum(size_bytes) FROM read_parquet('{local}')"
        count, denoise, size = duckdb.sql(query).fetchall()[0]
        print(f"duckdb: {count} videos, mean denoise {denoise} s, {size} bytes in total")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="demo folder (model, manifest, output)")
    parser.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mochi", help="model family (default mochi)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    configure_logging(args.verbose, quiet=False)

    out = args.out.resolve()
    spec = FAMILIES[args.family]
    # Each family its own model folder and run name, so both demos live side by side in one output.
    suffix = "" if spec is MOCHI else f"-{spec.family}"
    try:
        model_dir = ensure_tiny_model(out / f"model{suffix}", spec)
        from batchgen.models.common.tiny import TINY_TOML_NAME

        config = load_config(model_dir / TINY_TOML_NAME).with_overrides(
            {"generation": {"num_inference_steps": DEMO_STEPS}, "worker": {"shard_size": 2}}
        )
        manifest = write_demo_manifest(out / f"prompts{suffix}.parquet")
        output = str(out / "output")
        outcome = run_local(manifest, output, model_dir, config, workers=args.workers, verbose=args.verbose)
    except BatchgenError as e:
        log.error("%s", e)
        return e.exit_code
    if outcome.generated == 0 and outcome.resumed == outcome.total:
        print(f"Nothing to generate: all {outcome.total} items were already done (resumed).")
    print("\n".join(outcome.summary_lines(open_storage(output))))
    if outcome.index_rows:
        show_index(output, outcome.plan.run_id)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
