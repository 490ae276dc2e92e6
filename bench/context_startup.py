"""CPU benchmark of building a ``TorchContext``'s process groups (gloo, one thread per process).

For each layout: the seconds ``TorchContext.from_process_group`` takes over an already initialised default group,
the slowest rank of each try, median over ``--repeats`` tries (the first try is warm-up and excluded). It measures
the batchgen next to this script, so the same script under an older checkout gives the figure to compare.
Writes bench/results/context-startup-<label>.json, prints a table.

    python bench/context_startup.py --label mesh [--repeats 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = [
    # (world, dp, cfg, ulysses, ring)
    (2, 1, 1, 2, 1),
    (4, 1, 2, 2, 1),
    (8, 2, 2, 2, 1),
    (8, 1, 2, 2, 2),
]


def worker(degrees: tuple[int, ...], repeats: int) -> list[float]:
    from datetime import timedelta

    import torch.distributed as dist

    from batchgen.core.topology import Topology
    from batchgen.parallel.runtime import TorchContext

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    seconds = []
    for _ in range(repeats + 1):
        dist.barrier()
        started = time.perf_counter()
        TorchContext.from_process_group(Topology(*degrees))
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="names the results file (e.g. the code measured)")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()

    from tests._dist import run_world

    rows = []
    for degrees in LAYOUTS:
        per_rank = run_world(degrees[0], worker, degrees, args.repeats)
        slowest = [max(tries) for tries in zip(*per_rank, strict=True)]
        rows.append(
            {
                "layout": "world {} = dp {} x cfg {} x ulysses {} x ring {}".format(*degrees),
                "median_ms": round(statistics.median(slowest) * 1000, 1),
                "tries_ms": [round(s * 1000, 1) for s in slowest],
            }
        )
        print(f"{rows[-1]['layout']:<46} median {rows[-1]['median_ms']:>8.1f} ms")
    out = ROOT / f"bench/results/context-startup-{args.label}.json"
    report = {"benchmark": "bench/context_startup.py", "label": args.label, "repeats": args.repeats, "layouts": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
