"""bench/quality.py: the per-frame scores, and the script end to end on the tiny model (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from quality import frame_scores  # noqa: E402


def test_frame_scores_tell_identical_from_perturbed_frames():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    same = frame_scores(frames, frames.copy())
    assert same["psnr_db"] == [None, None, None] and same["ssim"] == [1.0, 1.0, 1.0]
    assert same["identical_frames"] == 3
    noisy = frames.astype(np.int16)
    noisy[1] += rng.integers(-8, 9, size=noisy[1].shape, dtype=np.int16)
    scores = frame_scores(frames, noisy.clip(0, 255).astype(np.uint8))
    assert scores["psnr_db"][0] is None and scores["psnr_db"][2] is None
    assert 25 < scores["psnr_db"][1] < 40 and scores["ssim"][1] < 1.0
    assert scores["psnr_min_db"] == scores["psnr_mean_db"] == scores["psnr_db"][1]


@pytest.mark.slow
def test_quality_script_compares_cached_and_uncached_on_the_tiny_model(tmp_path):
    out = tmp_path / "quality.json"
    command = [sys.executable, str(ROOT / "bench" / "quality.py"), "--tiny", "--seeds", "1", "--steps", "8"]
    proc = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    (seed,) = results["seeds"]
    assert len(seed["psnr_db"]) == len(seed["ssim"]) == results["shape"]["frames"] == 13
    assert seed["cache"]["steps_reused"] > 0 and seed["cache"]["steps_computed"] + seed["cache"]["steps_reused"] == 8
    assert seed["psnr_mean_db"] is not None and 0 < seed["ssim_mean"] < 1
    assert results["summary"]["steps_total"] == 8
