"""``batchgen gallery``: a static HTML page to look through a run's videos, written to a folder or an S3 prefix.

Layout under the output (opened from ``index.html`` straight off the disk or a static bucket: no server)::

    index.html                the page: summary, pager, one card per video
    data/page-00001.js ...    one script per page of cards (``page_size`` videos): the browser loads only the
                              page it shows, so 10,000 videos are 100 small files, and file:// needs no fetch()
    thumbs/<id>-<sha8>.jpg    contact sheet per video: ``THUMB_FRAMES`` evenly spaced frames side by side
                              (PyAV decodes and scales them and encodes the JPEG); named by content, so a
                              rerun only makes the thumbnails it lacks

Each card shows the strip (lazy-loaded), the prompt, seed, shape, the quality measurements and flags, and a link
to the MP4 (``link_base`` + key for S3 runs served over HTTP, the file URI for local runs).
"""

from __future__ import annotations

import io
import json
import logging
from fractions import Fraction
from importlib import resources
from typing import Any

import numpy as np
import pyarrow as pa

from batchgen.core.errors import InputError
from batchgen.dataset.reader import Run, Video, sample_position
from batchgen.storage.base import Storage
from batchgen.storage.local import LocalStorage

log = logging.getLogger("batchgen.gallery")

THUMB_FRAMES = 6
THUMB_HEIGHT = 96
DEFAULT_PAGE_SIZE = 60
_QUALITY = ("luma_mean", "luma_min", "luma_max", "black_frame_fraction", "motion_mean")


def contact_sheet(data: bytes, frames: int = THUMB_FRAMES, height: int = THUMB_HEIGHT) -> bytes:
    """A JPEG of ``frames`` evenly spaced frames of the MP4, each scaled to ``height`` pixels, side by side."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
    picks = sorted({round(i * (len(decoded) - 1) / max(frames - 1, 1)) for i in range(frames)})
    width = max(2, round(decoded[0].width * height / decoded[0].height / 2) * 2)  # even: JPEG's 4:2:0 chroma
    strip = np.hstack([decoded[i].reformat(width=width, height=height, format="rgb24").to_ndarray() for i in picks])
    return _jpeg(strip)


def _jpeg(rgb: np.ndarray) -> bytes:
    import av

    codec = av.CodecContext.create("mjpeg", "w")
    codec.height, codec.width = rgb.shape[:2]
    codec.pix_fmt = "yuvj420p"
    codec.time_base = Fraction(1, 1)
    codec.bit_rate = 8_000_000  # a generous cap for the one frame: the strip stays crisp (a few KB at 96 px)
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(packet) for packet in [*codec.encode(frame), *codec.encode(None)])


def choose(run: Run, sample: int | None, seed: int) -> pa.Table:
    """The whole index, or ``sample`` videos picked by ``seed`` (kept in manifest order)."""
    table = run.index()
    if sample is None or sample >= table.num_rows:
        return table
    if sample < 1:
        raise InputError(f"--sample must be positive, got {sample}")
    ids = table.column("id").to_pylist()
    keep = set(sorted(range(len(ids)), key=lambda row: sample_position(seed, ids[row]))[:sample])
    return table.filter(pa.array([row in keep for row in range(len(ids))]))


def write_gallery(
    run: Run,
    out: Storage,
    *,
    sample: int | None = None,
    seed: int = 0,
    page_size: int = DEFAULT_PAGE_SIZE,
    link_base: str | None = None,
) -> dict[str, int]:
    """Write the gallery of ``run`` under ``out``; index.html goes last, so it never points at missing pages."""
    if page_size < 1:
        raise InputError(f"--page-size must be positive, got {page_size}")
    table = choose(run, sample, seed)
    rows = table.to_pylist()
    have = {info.key for info in out.list("thumbs/")}
    todo = table.filter(pa.array([thumb_key(row) not in have for row in rows], type=pa.bool_()))
    for video, data in run.read_videos(todo):
        out.put_bytes(thumb_key(video.metadata), contact_sheet(data), content_type="image/jpeg")
    cards = [_card(Video(row, run.storage), link_base) for row in rows]
    pages = [cards[start : start + page_size] for start in range(0, len(cards), page_size)] or [[]]
    for number, page in enumerate(pages, start=1):
        script = f"galleryPage({number}, {json.dumps(page, ensure_ascii=True)});\n"
        out.put_bytes(_page_key(number), script.encode(), content_type="text/javascript")
    summary = {"videos": len(cards), "pages": len(pages), "thumbnails_made": todo.num_rows, "flagged": _flagged(cards)}
    out.put_bytes("index.html", _html(run, summary, page_size).encode(), content_type="text/html; charset=utf-8")
    log.info("gallery of %s: %d videos on %d pages -> %s", run.run_id, len(cards), len(pages), out.url("index.html"))
    return summary


def thumb_key(row: dict[str, Any]) -> str:
    return f"thumbs/{row['id']}-{row['sha256'][:8]}.jpg"


def _page_key(number: int) -> str:
    return f"data/page-{number:05d}.js"


def _flagged(cards: list[dict[str, Any]]) -> int:
    return sum(1 for card in cards if card["flags"])


def _card(video: Video, link_base: str | None) -> dict[str, Any]:
    meta = video.metadata
    if link_base:
        href = f"{link_base.rstrip('/')}/{meta['key']}"
    elif isinstance(video.storage, LocalStorage):
        href = video.uri
    else:
        href = None  # an s3:// URI is not a link a browser can follow: shown as text
    return {
        "id": video.id,
        "prompt": video.prompt,
        "seed": meta["seed"],
        "shape": f"{meta['frames']} frames, {meta['video_width']}x{meta['video_height']}, {meta['fps']} fps",
        "thumb": thumb_key(meta),
        "href": href,
        "uri": video.uri,
        "quality": {name: meta.get(f"quality_{name}") for name in _QUALITY},
        "flags": video.flags,
    }


def _html(run: Run, summary: dict[str, int], page_size: int) -> str:
    template = resources.files("batchgen.dataset").joinpath("gallery.html").read_text()
    config = {"run": run.run_id, "pages": summary["pages"], "videos": summary["videos"], "pageSize": page_size}
    config["flagged"] = summary["flagged"]
    return template.replace("/*CONFIG*/null", json.dumps(config, ensure_ascii=True)).replace("<!--TITLE-->", run.run_id)
