"""bench/fetch.py end to end at a small size: every variant downloads, verifies and is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "fetch.py"


def test_fetch_benchmark_times_and_verifies_every_variant(tmp_path):
    out = tmp_path / "fetch.json"
    command = [sys.executable, str(SCRIPT), "--size-gib", "0.05", "--repeats", "2", "--transfer", "1x5,4x5"]
    proc = subprocess.run([*command, "--results", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"-> {out}"
    assert proc.stdout.count("(verified)") == 2 * 3
    results = json.loads(out.read_text())
    assert results["size_bytes"] == int(0.05 * 1024**3)
    assert list(results["variants"]) == ["one-stream", "transfer c1/5 MiB", "transfer c4/5 MiB"]
    for figures in results["variants"].values():
        assert len(figures["seconds"]) == 2 and figures["seconds_median"] > 0
    assert results["variants"]["one-stream"]["speedup_vs_one_stream"] == 1.0


def test_fetch_benchmark_refuses_a_malformed_setting(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--transfer", "8-16", "--results", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "expected CONCURRENCYxMIB" in proc.stderr
    assert not (tmp_path / "x.json").exists()
