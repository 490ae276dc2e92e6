"""``batchgen run`` end to end: real processes, the real tiny Mochi, real MP4s, a moto S3 server or a folder."""

from __future__ import annotations

import re

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.core import layout
from batchgen.core.plan import load_plan
from batchgen.storage import open_storage
from tests._runs import assert_exactly_once, keys_under, run_cli, tiny_run_args, write_manifest

pytestmark = pytest.mark.slow

ITEMS = 6


def run_id_of(stdout: str) -> str:
    match = re.search(r"^run\s+(\S+)$", stdout, re.M)
    assert match, stdout
    return match.group(1)


def check_complete_run(storage, run_id: str, tmp_path, *, expected_frames: int) -> dict[str, dict]:
    """Every MP4 decodes with the expected frame count; the index equals the sidecars for all three readers."""
    plan = load_plan(storage, run_id)
    sidecars = assert_exactly_once(storage, plan)
    assert len(sidecars) == ITEMS
    assert {s["frames"] for s in sidecars.values()} == {expected_frames}
    assert storage.exists(layout.success_key(run_id))

    local_index = tmp_path / f"{run_id}-index.parquet"
    local_index.write_bytes(storage.get_bytes(layout.index_key(run_id)))
    expected = sorted((s["id"], s["video_key"], storage.url(s["video_key"]), s["sha256"]) for s in sidecars.values())
    by_pandas = pd.read_parquet(local_index)
    by_arrow = pq.read_table(local_index).to_pylist()
    by_duckdb = duckdb.sql(f"SELECT id, key, uri, sha256 FROM read_parquet('{local_index}') ORDER BY id").fetchall()
    assert sorted(by_pandas[["id", "key", "uri", "sha256"]].itertuples(index=False, name=None)) == expected
    assert sorted((r["id"], r["key"], r["uri"], r["sha256"]) for r in by_arrow) == expected
    assert sorted(by_duckdb) == expected
    for row in by_arrow:  # every sidecar field made it into the index, flattened
        sidecar = sidecars[row["id"]]
        assert row["prompt"] == sidecar["prompt"] and row["seed"] == sidecar["seed"]
        assert row["model_fingerprint"] == sidecar["model"]["fingerprint"]
        assert row["model_family"] == sidecar["model"]["family"] == "mochi"
        assert row["timings_denoise"] == sidecar["timings"]["denoise"]
    return sidecars


def snapshot(storage, run_id: str) -> dict[str, bytes]:
    keys = keys_under(storage, f"{run_id}/meta/") + keys_under(storage, f"{run_id}/videos/")
    return {key: storage.get_bytes(key) for key in keys}


@pytest.mark.parametrize("backend,workers", [("s3", 2), ("folder", 1)])
def test_run_then_rerun_generates_nothing(backend, workers, request, tmp_path, tiny_model_dir):
    uri = request.getfixturevalue("s3_uri") if backend == "s3" else str(tmp_path / "out")
    manifest = write_manifest(tmp_path / "prompts.parquet", ITEMS)
    args = ["run", str(manifest), "--output", uri, *tiny_run_args(tiny_model_dir), "--shard-size", "2"]

    first = run_cli(*args, "--workers", str(workers))
    assert first.returncode == 0, first.stderr
    run_id = run_id_of(first.stdout)
    assert f"{ITEMS} done ({ITEMS} generated now, 0 reused, 0 resumed), 0 failed" in first.stdout
    assert "done" in first.stderr and "items/s" in first.stderr and "ETA" in first.stderr  # the progress display
    storage = open_storage(uri)
    check_complete_run(storage, run_id, tmp_path, expected_frames=13)
    before = snapshot(storage, run_id)

    second = run_cli(*args, "--workers", str(workers))
    assert second.returncode == 0, second.stderr
    assert "Nothing to generate" in second.stdout
    assert f"{ITEMS} done (0 generated now, 0 reused, {ITEMS} resumed)" in second.stdout
    assert snapshot(storage, run_id) == before

    status = run_cli("status", uri)
    assert status.returncode == 0 and f"{ITEMS}/{ITEMS} done" in status.stdout and "complete" in status.stdout


def test_run_with_ulysses_2(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "prompts.parquet", ITEMS)
    result = run_cli(
        "run", str(manifest), "--output", str(out), *tiny_run_args(tiny_model_dir), "--shard-size", "3",
        "--nproc-per-worker", "2", "--ulysses-degree", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    storage = open_storage(str(out))
    sidecars = check_complete_run(storage, run_id_of(result.stdout), tmp_path, expected_frames=13)
    assert {(s["parallel"]["world_size"], s["parallel"]["ulysses"]) for s in sidecars.values()} == {(2, 2)}


def test_bad_topology_fails_before_anything_starts(tmp_path, tiny_model_dir):
    manifest = write_manifest(tmp_path / "prompts.parquet", 2)
    result = run_cli(
        "run", str(manifest), "--output", str(tmp_path / "out"), *tiny_run_args(tiny_model_dir),
        "--nproc-per-worker", "2", "--ulysses-degree", "3",
    )  # fmt: skip
    assert result.returncode == 6, result.stderr
    assert "ulysses degree 3 does not divide" in result.stderr
    assert not list((tmp_path / "out").glob("*/videos"))


def test_item_shape_that_cannot_split_across_ranks_fails_before_any_worker_starts(tmp_path, tiny_model_dir):
    # One frame at 48x48 is 1 latent frame of 3x3 patches: 9 visual tokens, which 2 ranks cannot split evenly.
    # The native backend pads them; the xfuser backend cannot, and is refused up front.
    manifest = tmp_path / "odd.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["even", "odd"],
                "prompt": ["a fox", "a boat"],
                "num_frames": [13, 1],
                "height": [64, 48],
                "width": [64, 48],
            }
        ),
        manifest,
    )
    result = run_cli(
        "run", str(manifest), "--output", str(tmp_path / "out"), *tiny_run_args(tiny_model_dir),
        "--nproc-per-worker", "2", "--ulysses-degree", "2", "--sp-backend", "xfuser",
    )  # fmt: skip
    assert result.returncode == 6, result.stderr
    assert (
        "1 frames at 48x48: N=9; the xfuser backend cannot pad, so ulysses x ring must divide 9 but is 2x1=2 (items odd)"
        in result.stderr
    )
    assert "13 frames at 64x64" not in result.stderr
    assert not list((tmp_path / "out").glob("*/videos"))
