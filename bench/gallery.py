"""Gallery at scale (CPU + headless chromium): a 10,000-video gallery is written and browsed.
Writes bench/results/gallery-cpu.json.

The run is planned from a real 10,000-row manifest; its index rows are synthetic (every video points at one real
MP4, every thumbnail is that MP4's contact sheet, already in place) so the figures are the gallery's own work:
writing the pages, then in Debian's chromium the time to show page 1 and the last page with every thumbnail
loaded, the cards in the DOM and the JS heap. Usage: python bench/gallery.py [--videos N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchgen.core import layout  # noqa: E402
from batchgen.core.config import RunConfig  # noqa: E402
from batchgen.core.plan import make_plan  # noqa: E402
from batchgen.core.video import encode_mp4  # noqa: E402
from batchgen.dataset import open_run  # noqa: E402
from batchgen.dataset.gallery import DEFAULT_PAGE_SIZE, contact_sheet, thumb_key, write_gallery  # noqa: E402
from batchgen.storage import LocalStorage  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gallery-cpu.json"
VISIBLE_THUMBNAILS_LOADED = """[...document.images]
  .filter(image => image.getBoundingClientRect().top < innerHeight)
  .every(image => image.complete && image.naturalWidth > 0)"""
LOADED_COUNT = "[...document.images].filter(image => image.complete && image.naturalWidth > 0).length"


def synthetic_run(folder: Path, videos: int) -> tuple[Path, bytes, list[str], str]:
    storage = LocalStorage(folder / "out")
    ids = [f"video-{i:06d}" for i in range(videos)]
    prompts = [f"a lighthouse on a cliff at dusk, waves below, take {i}" for i in range(videos)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), folder / "big.parquet")
    plan = make_plan(folder / "big.parquet", RunConfig(), storage)
    rng = np.random.default_rng(0)
    mp4 = encode_mp4(rng.integers(0, 256, (13, 480, 848, 3), dtype=np.uint8), 30, 28)
    sha = hashlib.sha256(mp4).hexdigest()
    key = layout.video_key(plan.run_id, plan.shards[0], ids[0])
    storage.put_bytes(key, mp4)
    flags = [["black"] if i % 97 == 0 else [] for i in range(videos)]
    index = pa.table(
        {
            "key": [key] * videos, "id": ids, "prompt": prompts, "seed": list(range(videos)), "sha256": [sha] * videos,
            "frames": [13] * videos, "video_width": [848] * videos, "video_height": [480] * videos, "fps": [30] * videos,
            "quality_luma_mean": rng.uniform(20, 200, videos), "quality_luma_min": [0.0] * videos,
            "quality_luma_max": [255.0] * videos, "quality_black_frame_fraction": [0.0] * videos,
            "quality_motion_mean": rng.uniform(0, 30, videos), "quality_flags": pa.array(flags, pa.list_(pa.string())),
        }
    )  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(index, sink)
    storage.put_bytes(layout.index_key(plan.run_id), sink.getvalue().to_pybytes())
    return storage.root / plan.run_id, contact_sheet(mp4), ids, sha


def browse(index_html: Path, pages: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    figures = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        for name, number in (("first_page", 1), ("last_page", pages)):
            start = time.perf_counter()
            page.goto(f"{index_html.as_uri()}#page={number}")
            page.wait_for_selector(f'#cards[data-page="{number}"]')
            page.wait_for_function(VISIBLE_THUMBNAILS_LOADED)
            figures[f"{name}_ms"] = round((time.perf_counter() - start) * 1000, 1)
        figures["cards_in_dom"] = page.locator(".card").count()
        figures["thumbnails_loaded"] = page.evaluate(LOADED_COUNT)  # lazy: only those near the viewport
        figures["js_heap_mib"] = round(page.evaluate("performance.memory.usedJSHeapSize") / 2**20, 1)
        browser.close()
    figures["console_errors"] = len(errors)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gallery-") as scratch:
        folder = Path(scratch)
        run_dir, thumb, ids, sha = synthetic_run(folder, args.videos)
        out = LocalStorage(folder / "gallery")
        for item_id in ids:  # thumbnails in place: the figure below is page writing, not 10,000 decodes
            out.put_bytes(thumb_key({"id": item_id, "sha256": sha}), thumb)
        start = time.perf_counter()
        summary = write_gallery(open_run(str(run_dir)), out)
        write_s = time.perf_counter() - start
        results = {
            "videos": args.videos,
            "page_size": DEFAULT_PAGE_SIZE,
            "pages": summary["pages"],
            "write_pages_seconds": round(write_s, 2),
            "page_script_kib": round((out.root / "data" / "page-00001.js").stat().st_size / 1024, 1),
            **browse(out.root / "index.html", summary["pages"]),
        }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
