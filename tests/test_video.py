"""MP4 encoding and probing with real PyAV/libx264."""

from __future__ import annotations

import numpy as np
import pytest

from batchgen.core.video import encode_mp4, frames_from_mp4, probe_mp4


def smooth_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Moving colour gradients: natural enough that H.264 at a sane CRF reproduces them closely."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    frames = []
    for t in range(count):
        channels = [
            127.5 + 100 * np.sin(x / width * 2 * np.pi + phases[c] + 0.3 * t) * np.cos(y / height * np.pi + 0.1 * t)
            for c in range(3)
        ]
        frames.append(np.stack(channels, axis=-1))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize(
    ("count", "height", "width", "fps", "crf", "min_psnr"),
    [
        (13, 64, 64, 30, 18, 35.0),
        (7, 48, 80, 24, 18, 35.0),
        (31, 32, 48, 30, 0, 33.0),  # CRF 0: only yuv420p's chroma subsampling loses anything
        (1, 16, 16, 30, 30, 20.0),
    ],
)
def test_round_trip_keeps_frames_size_rate_and_pixels(count, height, width, fps, crf, min_psnr):
    frames = smooth_frames(count, height, width)
    data = encode_mp4(frames, fps=fps, crf=crf)

    info = probe_mp4(data)
    assert (info.frames, info.height, info.width) == (count, height, width)
    assert info.fps == pytest.approx(fps)
    assert info.duration_s == pytest.approx(count / fps, abs=1e-5)

    decoded = frames_from_mp4(data)
    assert decoded.shape == frames.shape
    assert psnr(decoded, frames) >= min_psnr


def test_faststart_puts_moov_before_mdat():
    data = encode_mp4(smooth_frames(7, 32, 32), fps=30, crf=18)
    assert data[4:8] == b"ftyp"
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


def test_same_frames_give_the_same_picture():
    # Not the same bytes: libx264's AVX-512 paths vary the stream slightly between runs (see video._mux).
    frames = smooth_frames(13, 64, 64, seed=3)
    decoded = [frames_from_mp4(encode_mp4(frames, fps=30, crf=18)) for _ in range(4)]
    for video in decoded:
        assert video.shape == frames.shape
        assert psnr(video, frames) > 33
    assert min(psnr(a, b) for a in decoded for b in decoded if a is not b) > 38


def test_lower_crf_is_more_faithful():
    frames = smooth_frames(13, 64, 64, seed=1)
    good = psnr(frames_from_mp4(encode_mp4(frames, fps=30, crf=10)), frames)
    poor = psnr(frames_from_mp4(encode_mp4(frames, fps=30, crf=45)), frames)
    assert good > poor + 3


@pytest.mark.parametrize(
    ("frames", "fps", "crf", "message"),
    [
        (np.zeros((3, 16, 16, 3), np.float32), 30, 18, "uint8"),
        (np.zeros((16, 16, 3), np.uint8), 30, 18, "shape"),
        (np.zeros((3, 16, 16, 4), np.uint8), 30, 18, "shape"),
        (np.zeros((0, 16, 16, 3), np.uint8), 30, 18, "empty"),
        (np.zeros((3, 15, 16, 3), np.uint8), 30, 18, "even"),
        (np.zeros((3, 16, 17, 3), np.uint8), 30, 18, "even"),
        (np.zeros((3, 16, 16, 3), np.uint8), 0, 18, "fps"),
        (np.zeros((3, 16, 16, 3), np.uint8), 30, 52, "crf"),
    ],
)
def test_encode_rejects_bad_input(frames, fps, crf, message):
    with pytest.raises(ValueError, match=message):
        encode_mp4(frames, fps=fps, crf=crf)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"^not a video: empty data$"),
        (b"not a video at all", r"^not a decodable video: .*Invalid data found when processing input"),
        (b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64, r"^not a decodable video: .*Invalid data found"),
    ],
)
def test_probe_rejects_undecodable_data(data, message):
    with pytest.raises(ValueError, match=message):
        probe_mp4(data)


def test_probe_rejects_truncated_video():
    data = encode_mp4(smooth_frames(13, 64, 64), fps=30, crf=18)
    with pytest.raises(ValueError, match=r"^not a video: no decodable frames$"):
        probe_mp4(data[: len(data) // 3])
