"""The CLI under real torchrun: sequence-parallel latents equal the single-process run, a failing rank ends the job
quickly with the rank named, and a topology that cannot fit fails before any weights load."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TOLERANCE = 1e-4


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {
        **os.environ,
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "TORCHELASTIC_ERROR_FILE": "",  # keep torchrun's failure summary on stderr
    }


def _torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "--monitor-interval=0.5", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())


def _generate_args(model_dir: Path, out: Path, latents: Path, *extra: str) -> list[str]:
    return [
        "generate", "--model-dir", str(model_dir), "--prompt", "a red car in the city at night", "--seed", "3",
        "--steps", "2", "--out", str(out), "--save-latents", str(latents), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_generate_latents_under_torchrun_ulysses2_match_single_process(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    # 13 frames at 48x80: 3 latent frames of 3 x 5 patches = 45 visual tokens, padded to 46 for ulysses 2.
    shape = ("--num-frames", "13", "--height", "48", "--width", "80")
    single = subprocess.run(
        [sys.executable, "-m", "batchgen",
         *_generate_args(tiny_model_dir, tmp_path / "one.mp4", tmp_path / "one.st", *shape)],
        capture_output=True, text=True, timeout=240, env=_env(),
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    parallel = _torchrun(
        2, "-m", "batchgen",
        *_generate_args(tiny_model_dir, tmp_path / "two.mp4", tmp_path / "two.st", "--ulysses-degree", "2", *shape),
    )  # fmt: skip
    assert parallel.returncode == 0, parallel.stderr
    assert "ulysses 2" in parallel.stderr  # the topology each rank logged
    assert "visual tokens: 45, padded to 46 for ulysses x ring = 2" in parallel.stderr
    a, b = load_file(tmp_path / "one.st")["latents"], load_file(tmp_path / "two.st")["latents"]
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOLERANCE
    assert (tmp_path / "two.mp4").stat().st_size > 0


FAILING_SCRIPT = """
import sys
from batchgen.core.config import ParallelConfig
from batchgen.parallel.runtime import TorchContext

# A collective timeout far past the test's own: only torchrun stopping rank 0 can end the job in time.
context = TorchContext.from_env(ParallelConfig(ulysses_degree=2), num_heads=4, timeout_s=900)
if context.rank == 1:
    sys.exit("rank 1 gives up")
context.all_true(True)  # rank 0 waits in a collective for a peer that will never come
print("unreachable")
"""


def test_failing_rank_ends_the_job_quickly_and_is_named(tmp_path):
    script = tmp_path / "fail_one_rank.py"
    script.write_text(FAILING_SCRIPT)
    result = _torchrun(2, str(script), timeout=300)  # a hang ends in TimeoutExpired: rank 0 would wait 900 s
    assert result.returncode != 0
    output = result.stdout + result.stderr
    # The surviving rank ends either way, never after gloo's 900 s: torch.distributed.elastic's agent stops it
    # (multiprocessing/api.py, "closing signal"), or, when the failed rank's socket closes first, its own collective
    # fails (gloo's "Connection closed by peer"; then torchrun lists both ranks, rank 0 as the first observed).
    stopped = re.search(r"Sending process \d+ closing signal SIGTERM", output)
    assert stopped or "Connection closed by peer" in output, output[-3000:]
    assert "rank 1 gives up" in output
    assert "rank      : 1" in output or "rank: 1" in output, output[-3000:]
    assert "unreachable" not in output


def test_topology_error_under_torchrun_lists_working_degrees(tiny_model_dir, tmp_path):
    # 1 frame at 48x48: N = 9 visual tokens, which ulysses 2 cannot split without padding (xfuser cannot pad).
    result = _torchrun(
        2, "-m", "batchgen",
        *_generate_args(tiny_model_dir, tmp_path / "x.mp4", tmp_path / "x.st", "--ulysses-degree", "2",
                        "--sp-backend", "xfuser", "--num-frames", "1", "--height", "48", "--width", "48"),
        timeout=120,
    )  # fmt: skip
    assert result.returncode != 0  # plain torchrun exits 1 for any failed worker
    assert "1 frames at 48x48: N=9; the xfuser backend cannot pad, so ulysses x ring must divide 9 but is 2x1=2" in (
        result.stderr
    )
    assert "working: 1, 3" in result.stderr
    assert not (tmp_path / "x.mp4").exists()
