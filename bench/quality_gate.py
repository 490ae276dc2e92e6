"""Consumer-side costs per video (CPU): the quality gate's measurements and the gallery's contact sheet.
Writes bench/results/quality-cpu.json.

1. ``quality.gate`` on 163 frames at 480x848 (Mochi's default output), the work the writer rank adds per item.
2. ``gallery.contact_sheet`` of an encoded 49-frame 480x848 MP4 (decode every frame, scale six, one JPEG).

Frames are a moving gradient with noise (a stand-in for real footage: the cost does not depend on content).
Each figure is the median over ``--repeats`` runs.  Usage: python bench/quality_gate.py [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchgen.core.config import QualityConfig  # noqa: E402
from batchgen.core.quality import gate  # noqa: E402
from batchgen.core.video import encode_mp4  # noqa: E402
from batchgen.dataset.gallery import contact_sheet  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "quality-cpu.json"


def frames(count: int, height: int = 480, width: int = 848) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.arange(width, dtype=np.float32)[None, :, None]
    out = np.empty((count, height, width, 3), np.uint8)
    for index in range(count):
        wave = 127 + 100 * np.sin((x + 4 * index) / 40)
        out[index] = np.clip(wave + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    return out


def median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    video = frames(163)
    gate_s = median_seconds(lambda: gate(video, QualityConfig()), args.repeats)
    mp4 = encode_mp4(video[:49], 30, 18)
    sheet_s = median_seconds(lambda: contact_sheet(mp4), args.repeats)
    results = {
        "quality_gate_seconds_163x480x848": round(gate_s, 3),
        "contact_sheet_seconds_49x480x848": round(sheet_s, 3),
        "contact_sheet_bytes": len(contact_sheet(mp4)),
        "repeats": args.repeats,
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
