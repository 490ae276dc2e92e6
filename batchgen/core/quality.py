"""The quality gate: cheap per-video measurements and the black/frozen flags they raise. numpy (and PyAV for
stored videos) only, so the worker loop and the index stay free of torch.

Measured on BT.601 luma (the weights libx264's yuv420p conversion uses), 0-255, streaming frame by frame so a
163-frame 480x848 video costs a few hundred milliseconds and one frame of extra memory:

- ``luma_mean``, ``luma_min``, ``luma_max``: over every pixel of every frame;
- ``black_frame_fraction``: share of frames that are black in ffmpeg blackdetect's sense (at least
  ``black_pixel_fraction`` of the pixels at or below ``black_luma``), so a night scene with a lit window is not;
- ``motion_mean``: mean absolute luma difference between consecutive frames (None for a one-frame video).

Flags: ``black`` when ``black_frame_fraction >= quality.black_frame_fraction``; ``frozen`` when
``motion_mean < quality.frozen_motion``. Non-finite latents or VAE output are not a flag but an item failure
(``NonFiniteError``): clamping would turn NaN into an all-black video that looks committed and fine.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np

from batchgen.core.config import QualityConfig

_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class NonFiniteError(ValueError):
    """The generator produced NaN or infinite values: the item fails and nothing of it is written."""


class QualityRejected(ValueError):
    """A flagged video under ``quality.on_flag = "fail"``: the item fails with the flags as its reason."""


def describe_non_finite(what: str, total: int, nan: int, inf: int) -> str:
    return (
        f"{what} contain {nan} NaN and {inf} infinite value(s) of {total}: the sample diverged, "
        "so it is not encoded (a NaN would otherwise become an all-black video)"
    )


def require_finite(values: np.ndarray, what: str) -> None:
    """NonFiniteError naming ``what`` and the count of bad values, unless every value is finite."""
    if np.issubdtype(values.dtype, np.integer) or np.isfinite(values).all():
        return
    nan, finite = int(np.isnan(values).sum()), int(np.isfinite(values).sum())
    raise NonFiniteError(describe_non_finite(what, values.size, nan, values.size - nan - finite))


def _luma(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float32) @ _BT601


def measure(frames: Iterable[np.ndarray], config: QualityConfig) -> dict[str, Any]:
    """Measurements and flags of uint8 RGB frames [H, W, 3] given one at a time (the sidecar's ``quality``)."""
    count = black = 0
    luma_sum, luma_min, luma_max, motion_sum = 0.0, 255.0, 0.0, 0.0
    pixels = 1
    previous = None
    for frame in frames:
        luma = _luma(frame)
        pixels = luma.size
        count += 1
        luma_sum += float(luma.sum(dtype=np.float64))
        luma_min, luma_max = min(luma_min, float(luma.min())), max(luma_max, float(luma.max()))
        black += int(np.count_nonzero(luma <= config.black_luma) >= config.black_pixel_fraction * pixels)
        if previous is not None:
            motion_sum += float(np.abs(luma - previous).mean(dtype=np.float64))
        previous = luma
    if count == 0:
        raise ValueError("no frames to measure")
    report: dict[str, Any] = {  # the sidecar's field type (records.Sidecar.quality)
        "luma_mean": round(luma_sum / (count * pixels), 3),
        "luma_min": round(luma_min, 3),
        "luma_max": round(luma_max, 3),
        "black_frame_fraction": round(black / count, 4),
        "motion_mean": round(motion_sum / (count - 1), 4) if count > 1 else None,
    }
    report["flags"] = _flags(report, config)
    return report


def _flags(report: dict[str, Any], config: QualityConfig) -> list[str]:
    flags = []
    if report["black_frame_fraction"] >= config.black_frame_fraction:
        flags.append("black")
    if report["motion_mean"] is not None and report["motion_mean"] < config.frozen_motion:
        flags.append("frozen")
    return flags


def gate(frames: np.ndarray, config: QualityConfig) -> dict[str, Any]:
    """Measure frames [F, H, W, 3] before encoding; QualityRejected if flagged and ``on_flag`` is 'fail'."""
    require_finite(frames, "frames")
    report = measure(iter(frames), config)
    if report["flags"] and config.on_flag == "fail":
        raise QualityRejected(
            f"quality gate: video flagged {'+'.join(report['flags'])} (black frames "
            f"{report['black_frame_fraction']:.0%}, mean luma {report['luma_mean']}, motion {report['motion_mean']}) "
            "and quality.on_flag is 'fail'"
        )
    return report


def measure_mp4(data: bytes, config: QualityConfig) -> dict[str, Any]:
    """Measurements of a stored video, decoded frame by frame (for adopted videos and re-measuring)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        return measure((frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)), config)
