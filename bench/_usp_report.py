"""What the CPU USP benchmarks (usp_cpu.py for Mochi, wan_usp_cpu.py for Wan) share: running a layout on 1 or
more gloo processes, the parallel transformer under test, one result row per layout (medians, bytes per rank
against the formula), the machine facts and the printed table."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any


def parallel_transformer(transformer, degrees: dict[str, int], num_heads: int, **plan: Any):
    """``transformer`` wrapped for ``degrees`` (on torchrun's environment), and its context; unchanged and None on
    one process."""
    if not degrees:
        return transformer, None
    from batchgen.core.config import ParallelConfig
    from batchgen.parallel.apply import parallelize_transformer
    from batchgen.parallel.runtime import TorchContext

    config = ParallelConfig(
        ulysses_degree=degrees.get("ulysses", 1), ring_degree=degrees.get("ring", 1), cfg_degree=degrees.get("cfg", 1)
    )
    context = TorchContext.from_env(config, num_heads=num_heads, timeout_s=60)
    return parallelize_transformer(transformer, context, **plan), context


def run_layout(world: int, worker: Callable[..., dict], degrees: dict[str, int], *args: Any) -> list[dict]:
    """``worker(degrees, *args)`` on ``world`` gloo processes (in this process, one thread, for one)."""
    if world == 1:
        import torch

        torch.set_num_threads(1)
        return [worker({}, *args)]
    from tests._dist import run_world

    return run_world(world, worker, degrees, *args, timeout_s=300)


def layout_row(
    unit: str,
    world: int,
    degrees: dict[str, int],
    tokens: int,
    results: list[dict],
    expected: dict[str, int],
    **facts: Any,
) -> dict:
    """One layout's row: ``results[r][f"{unit}_s"]`` (seconds per step or forward) and
    ``results[r][f"bytes_per_{unit}"]`` of every rank, next to the ``expected`` bytes; ``facts`` follow the
    process count."""
    per_rank_median = [statistics.median(r[f"{unit}_s"]) for r in results]
    measured = results[0][f"bytes_per_{unit}"]
    totals = [sum(r[f"bytes_per_{unit}"].values()) for r in results]  # every rank sends the same: show it
    sp = degrees.get("ulysses", 1) * degrees.get("ring", 1)
    return {
        "layout": " x ".join(f"{k} {v}" for k, v in degrees.items()) or "single process",
        "processes": world,
        **facts,
        "visual_tokens": tokens,
        "padded_tokens": -(-tokens // sp) * sp,
        "degrees": {name: degrees.get(name, 1) for name in ("ulysses", "ring", "cfg")},
        f"median_{unit}_s": statistics.median(per_rank_median),
        f"max_rank_median_{unit}_s": max(per_rank_median),
        f"bytes_per_{unit}_per_rank": {
            "measured": measured,
            "formula": expected,
            "measured_total": sum(measured.values()),
            "formula_total": sum(expected.values()),
            "rank_totals": totals,
        },
        "matches_formula": measured == expected and len(set(totals)) == 1,
    }


def machine() -> dict[str, Any]:
    import torch

    return {
        "threads_per_process": 1,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_and_print(report: dict, out: str, title: str, unit: str) -> int:
    """Write ``report`` to ``out``, print its layouts as a table; 0 when every layout matched its formula."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    rows = report["layouts"]
    print(f"{title}, {os.cpu_count()} CPUs, 1 thread/process")
    print(
        f"{'layout':<22} {'procs':>5} {'tokens':>9} {unit + ' s':>12} {'KiB/' + unit + '/rank':>18} {'formula KiB':>12}  ok"
    )
    for row in rows:
        b = row[f"bytes_per_{unit}_per_rank"]
        tokens = f"{row['visual_tokens']}>{row['padded_tokens']}"
        print(
            f"{row['layout']:<22} {row['processes']:>5} {tokens:>9} {row[f'median_{unit}_s']:>12.4f} "
            f"{b['measured_total'] / 1024:>18.1f} {b['formula_total'] / 1024:>12.1f}  "
            f"{'yes' if row['matches_formula'] else 'NO'}"
        )
    print(f"wrote {out}")
    return 0 if all(r["matches_formula"] for r in rows) else 1
