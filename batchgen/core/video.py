"""Frames -> H.264 MP4 bytes (PyAV, libx264, yuv420p, faststart) and a decoding probe. No torch.

The result is bytes: the worker hashes and uploads them, so nothing half-written ever lands in the output.
FFmpeg's faststart pass (moving the index to the front so players can start before the download ends)
reopens the file by name, so the muxer writes into a private temporary directory that is removed at once.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

import numpy as np

CODEC: Final = "libx264"
PIXEL_FORMAT = "yuv420p"


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    """Frames actually decoded (not the container's claim)."""
    width: int
    height: int
    fps: float
    duration_s: float


def encode_mp4(frames: np.ndarray, fps: int, crf: int) -> bytes:
    """Encode uint8 RGB frames [F, H, W, 3] as an H.264 MP4 playable anywhere (yuv420p, moov atom first)."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a uint8 numpy array, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [frames, height, width, 3], got {list(frames.shape)}")
    count, height, width, _ = frames.shape
    if count < 1:
        raise ValueError("frames is empty: a video needs at least one frame")
    if height % 2 or width % 2:
        # yuv420p subsamples chroma 2x2; odd sizes would be silently cropped or rejected by libx264.
        raise ValueError(f"height and width must be even for yuv420p, got {height}x{width}")
    if not isinstance(fps, int) or not 1 <= fps <= 240:
        raise ValueError(f"fps must be an integer between 1 and 240, got {fps!r}")
    if not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer between 0 and 51, got {crf!r}")

    with tempfile.TemporaryDirectory(prefix="batchgen-mp4-") as scratch:
        path = os.path.join(scratch, "video.mp4")
        _mux(frames, path, fps=fps, crf=crf)
        with open(path, "rb") as f:
            return f.read()


def _mux(frames: np.ndarray, path: str, *, fps: int, crf: int) -> None:
    import av

    count, height, width, _ = frames.shape
    with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(CODEC, rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = PIXEL_FORMAT
        stream.time_base = Fraction(1, fps)
        # One encoder thread per video: the workers already use every core for generation. PyAV's default
        # thread_type (SLICE) would otherwise ask libx264 for sliced threading, so libavcodec threading is off.
        # Bytes are not promised to repeat: on AVX-512 CPUs libx264 gives slightly different streams for the same
        # frames from run to run (seen on AMD EPYC; gone with AVX-512 masked off), so the worker hashes what it
        # stores and adopts an existing video rather than expecting a re-encode to match it.
        stream.options = {"crf": str(crf), "preset": "medium"}
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "NONE"
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[index]), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def probe_mp4(data: bytes) -> VideoInfo:
    """Decode every frame of an MP4; ValueError if it is not a decodable video."""
    import av

    if not data:
        raise ValueError("not a video: empty data")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ValueError("not a video: no video stream")
            stream = container.streams.video[0]
            count = 0
            width = height = 0
            for frame in container.decode(stream):
                count += 1
                width, height = frame.width, frame.height
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
    except av.error.FFmpegError as e:
        raise ValueError(f"not a decodable video: {e}") from None
    if count == 0:
        raise ValueError("not a video: no decodable frames")
    duration = count / fps if fps else 0.0
    return VideoInfo(frames=count, width=width, height=height, fps=fps, duration_s=round(duration, 6))


def frames_from_mp4(data: bytes) -> np.ndarray:
    """Decode an MP4 back to uint8 RGB frames [F, H, W, 3] (for checks and tests)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
