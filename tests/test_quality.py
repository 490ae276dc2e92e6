"""The quality gate: measurements and flags (numpy), NaN from a tiny model whose weights are NaN, and black or
frozen frames through the real worker, storage, encoder and index."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.core import layout
from batchgen.core.config import QualityConfig
from batchgen.core.errors import EXIT_INCOMPLETE, EXIT_OK
from batchgen.core.quality import NonFiniteError, QualityRejected, gate, measure, measure_mp4
from batchgen.core.video import encode_mp4
from batchgen.dataset.index import build_index
from batchgen.storage import LocalStorage
from batchgen.worker.context import SingleProcess
from batchgen.worker.loop import run_worker, scan_shard
from tests._runs import assert_exactly_once, keys_under, plan_run, tiny_run_config

SHAPE = (7, 32, 32, 3)


def moving(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, SHAPE, dtype=np.uint8)


def frozen_from(frames: np.ndarray) -> np.ndarray:
    return np.repeat(frames[:1], len(frames), axis=0)


def test_measurements_and_flags():
    config = QualityConfig()
    ok = measure(iter(moving()), config)
    assert ok["flags"] == [] and 100 < ok["luma_mean"] < 155 and ok["motion_mean"] > 50
    assert ok["luma_min"] < 10 and ok["luma_max"] > 245

    black = measure(iter(np.zeros(SHAPE, np.uint8)), config)
    assert black["flags"] == ["black", "frozen"]  # all black is also motionless
    assert (black["luma_mean"], black["luma_max"], black["black_frame_fraction"], black["motion_mean"]) == (0, 0, 1, 0)

    assert measure(iter(frozen_from(moving())), config)["flags"] == ["frozen"]

    # A night scene: dark, but a lit window (more than blackdetect's 2%) keeps frames from counting as black.
    night = np.full(SHAPE, 8, np.uint8)
    night[:, :6, :6] = 240
    night[1::2, -1, -1] = 30  # some motion
    report = measure(iter(night), config)
    assert report["black_frame_fraction"] == 0 and "black" not in report["flags"]
    # Half the frames black reaches the default black_frame_fraction.
    fade = moving()
    fade[:4] = 0
    assert measure(iter(fade), config)["black_frame_fraction"] == pytest.approx(4 / 7, abs=1e-4)
    assert "black" in measure(iter(fade), config)["flags"]

    single = measure(iter(moving()[:1]), config)
    assert single["motion_mean"] is None and single["flags"] == []


def test_gate_and_encoded_measurements():
    with pytest.raises(NonFiniteError, match=r"frames contain 1 NaN and 1 infinite value\(s\) of 6"):
        gate(np.array([[[[np.nan, np.inf, 0.5], [0, 0, 0]]]], np.float32), QualityConfig())
    with pytest.raises(QualityRejected, match="flagged black"):
        gate(np.zeros(SHAPE, np.uint8), QualityConfig(on_flag="fail"))
    assert gate(np.zeros(SHAPE, np.uint8), QualityConfig())["flags"] == ["black", "frozen"]

    # What a stored (encoded) video measures is close to its frames' measurements.
    frames = np.clip(moving()[:, :, :, :1].astype(int) // 2 + 60, 0, 255).astype(np.uint8).repeat(3, axis=-1)
    raw, stored = measure(iter(frames), QualityConfig()), measure_mp4(encode_mp4(frames, 30, 18), QualityConfig())
    assert stored["luma_mean"] == pytest.approx(raw["luma_mean"], abs=3)
    assert stored["flags"] == raw["flags"] == []


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from batchgen.models.mochi.generator import MochiGenerator

    real = MochiGenerator(tiny_model_dir, device="cpu")
    yield real
    real.close()


class Frames:
    """The real generator, with the frames of some items replaced (black, or the first frame held)."""

    def __init__(self, real, replace):
        self.real, self.replace = real, replace
        self.model_identity = real.model_identity

    def prepare(self, items):
        self.real.prepare(items)

    def generate(self, item):
        video = self.real.generate(item)
        if item.id in self.replace:
            video.frames = self.replace[item.id](video.frames)
        return video

    def close(self):
        pass


REPLACE = {"item-1": np.zeros_like, "item-2": frozen_from}


def test_flags_are_recorded_in_sidecar_and_index(generator, tmp_path, tiny_config):
    storage = LocalStorage(tmp_path / "out")
    plan = plan_run(storage, tmp_path, 3, tiny_run_config(tiny_config, shard_size=3))
    summary = run_worker(storage, plan, plan.shards, Frames(generator, REPLACE), SingleProcess())
    assert summary.exit_code == EXIT_OK
    sidecars = assert_exactly_once(storage, plan)
    flags = {item_id: sidecar["quality"]["flags"] for item_id, sidecar in sidecars.items()}
    assert flags == {"item-0": [], "item-1": ["black", "frozen"], "item-2": ["frozen"]}
    assert sidecars["item-1"]["quality"]["luma_max"] == 0

    build_index(storage, plan)
    local = tmp_path / "index.parquet"
    local.write_bytes(storage.get_bytes(layout.index_key(plan.run_id)))
    table = pq.read_table(local)
    assert table.schema.field("quality_flags").type == pa.list_(pa.string())
    assert table.column("quality_flags").to_pylist() == [[], ["black", "frozen"], ["frozen"]]
    assert table.column("quality_motion_mean").to_pylist()[0] == sidecars["item-0"]["quality"]["motion_mean"]


def test_flagged_videos_are_counted_by_status_and_run(generator, tmp_path, tiny_config, capsys):
    """Issue 19 item 6: the count comes from the shards' parts, the sidecars of a shard without one, or the index."""
    from batchgen.cli import main
    from batchgen.core.progress import scan_run
    from batchgen.dataset.index import flagged_videos
    from batchgen.launch.local import RunOutcome

    storage = LocalStorage(tmp_path / "out")
    plan = plan_run(storage, tmp_path, 3, tiny_run_config(tiny_config, shard_size=2))
    run_worker(storage, plan, plan.shards, Frames(generator, REPLACE), SingleProcess())
    progress = scan_run(storage, plan)
    assert flagged_videos(storage, plan, progress) == 2  # from the parts the worker wrote
    for info in storage.list(layout.index_parts_prefix(plan.run_id)):
        if plan.shards[0] in info.key:
            storage.delete(info.key)  # item-1 (black) is in the first shard: now read from its sidecars
    assert flagged_videos(storage, plan, progress) == 2
    build_index(storage, plan)
    for key in keys_under(storage, layout.index_parts_prefix(plan.run_id)):
        storage.put_bytes(key, b"not parquet")  # the index is current: it is read, not the parts
    assert flagged_videos(storage, plan, scan_run(storage, plan)) == 2

    assert main(["status", storage.uri]) == EXIT_OK
    assert "flagged   2 of 3 videos (black or frozen frames" in capsys.readouterr().out
    assert main(["status", storage.uri, "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["flagged"] == 2
    outcome = RunOutcome(plan, storage.uri, 3, 3, 0, 0, 3, 1.0, True, 3, flagged=2)
    assert "flagged   2 of 3 videos (black or frozen frames; the index's quality_flags says which)" in (
        outcome.summary_lines(storage)
    )


def test_on_flag_fail_records_the_reason_and_writes_no_video(generator, tmp_path, tiny_config):
    storage = LocalStorage(tmp_path / "out")
    config = tiny_run_config(tiny_config, shard_size=3, max_attempts=1).with_overrides({"quality": {"on_flag": "fail"}})
    plan = plan_run(storage, tmp_path, 3, config)
    summary = run_worker(storage, plan, plan.shards, Frames(generator, REPLACE), SingleProcess())
    assert (summary.generated, summary.failed, summary.exit_code) == (1, 2, EXIT_INCOMPLETE)
    assert_exactly_once(storage, plan, expect_done={"item-0"})
    shard = plan.shards[0]
    for item_id, flagged in (("item-1", "black+frozen"), ("item-2", "frozen")):
        record = json.loads(storage.get_bytes(layout.error_key(plan.run_id, shard, item_id)))
        assert f"QualityRejected: quality gate: video flagged {flagged}" in record["error"]


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its DiT's output projection set to NaN: every denoising step then yields NaN."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("models") / "nan-mochi"
    shutil.copytree(tiny_model_dir, folder)
    (weights,) = (folder / "transformer").glob("*.safetensors")
    tensors = load_file(weights)
    tensors["proj_out.weight"].fill_(float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def test_nan_weights_fail_the_item_and_commit_nothing(nan_model_dir, tmp_path, tiny_config):
    from batchgen.models.mochi.generator import MochiGenerator

    storage = LocalStorage(tmp_path / "out")
    plan = plan_run(storage, tmp_path, 1, tiny_run_config(tiny_config, shard_size=1, max_attempts=2))
    nan_generator = MochiGenerator(nan_model_dir, device="cpu")
    try:
        summary = run_worker(storage, plan, plan.shards, nan_generator, SingleProcess())
    finally:
        nan_generator.close()
    assert (summary.failed, summary.exit_code) == (1, EXIT_INCOMPLETE)
    record = json.loads(storage.get_bytes(layout.error_key(plan.run_id, plan.shards[0], "item-0")))
    assert record["attempts"] == 2
    assert record["error"].startswith(
        "NonFiniteError: latents after denoising contain 384 NaN and 0 infinite"
    )  # 12 x 2 x 4 x 4
    assert keys_under(storage, f"{plan.run_id}/videos/") == keys_under(storage, f"{plan.run_id}/meta/") == []


def test_adopted_orphan_video_is_measured_from_its_frames(generator, tmp_path, tiny_config):
    storage = LocalStorage(tmp_path / "out")
    plan = plan_run(storage, tmp_path, 1, tiny_run_config(tiny_config, shard_size=1))
    item = scan_shard(storage, plan.run_id, plan.shards[0]).items[0]
    black = encode_mp4(np.zeros((item.num_frames, item.height, item.width, 3), np.uint8), 30, 18)
    storage.put_bytes(layout.video_key(plan.run_id, plan.shards[0], item.id), black)  # a crash left it, no sidecar
    assert run_worker(storage, plan, plan.shards, Frames(generator, {}), SingleProcess()).adopted == 1
    sidecar = assert_exactly_once(storage, plan)[item.id]
    assert sidecar["adopted"] is True and sidecar["quality"]["flags"] == ["black", "frozen"]
