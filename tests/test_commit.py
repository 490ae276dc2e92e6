"""The commit protocol (``worker.commit.Committer``) alone: a real folder storage, a plan and bytes; no process
context, no generator, no torch. The loop's lockstep and retries are tested in test_worker.py."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from batchgen.core import layout
from batchgen.core.config import RunConfig
from batchgen.core.errors import ModelMismatchError
from batchgen.core.plan import load_shard_items
from batchgen.core.progress import scan_run
from batchgen.core.records import Sidecar
from batchgen.core.video import encode_mp4
from batchgen.models.api import GeneratedVideo
from batchgen.storage import LocalStorage
from batchgen.worker.commit import Committer
from batchgen.worker.loop import scan_shard
from tests._runs import SMALL_SHAPE, plan_run

WEIGHTS = {"path": "/models/mochi", "fingerprint": "ab" * 16}


@pytest.fixture
def run(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    config = RunConfig().with_overrides({"generation": dict(SMALL_SHAPE), "worker": {"shard_size": 4}})
    plan = plan_run(storage, tmp_path, 4, config)
    shard = plan.shards[0]
    return storage, plan, shard, load_shard_items(storage, plan.run_id, shard)


def frames(item, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(40, 220, (item.num_frames, item.height, item.width, 3), dtype=np.uint8)


def committer(storage, plan, identity=WEIGHTS):
    return Committer(storage, plan, model_identity=identity, world_size=2, dp_size=1, launch_attempt=1)


def sidecar_of(storage, plan, shard, item):
    data = storage.get_bytes(layout.sidecar_key(plan.run_id, shard, item.id))
    return Sidecar.parse(data, run_id=plan.run_id, shard=shard, item_id=item.id)


def test_commit_writes_video_then_sidecar_and_pins_the_weights(run):
    storage, plan, shard, items = run
    writer = committer(storage, plan)
    video = GeneratedVideo(frames(items[0]), timings={"denoise": 1.5}, extra={"parallel": {"ulysses": 2}, "k": 1})
    writer.commit(shard, items[0], video, attempt=2, clear_error=False)
    stored = storage.get_bytes(layout.video_key(plan.run_id, shard, items[0].id))
    record = sidecar_of(storage, plan, shard, items[0])
    assert record["sha256"] == hashlib.sha256(stored).hexdigest() and record["size_bytes"] == len(stored)
    assert (record["adopted"], record["attempt"], record["frames"]) == (False, 3, items[0].num_frames)
    assert record["parallel"] == {"world_size": 2, "dp_size": 1, "ulysses": 2} and record["extra"] == {"k": 1}
    assert {"denoise", "encode_mp4", "upload"} <= set(record["timings"]) and record["quality"]["flags"] == []
    pin = json.loads(storage.get_bytes(layout.model_pin_key(plan.run_id)))
    assert pin["fingerprint"] == WEIGHTS["fingerprint"] and writer.committed[shard][items[0].id] == record
    assert scan_run(storage, plan).shards[shard].done_ids == {items[0].id}


def test_a_stored_video_is_adopted_not_overwritten(run):
    storage, plan, shard, items = run
    earlier = encode_mp4(frames(items[0], seed=1), 30, 18)  # a crashed attempt's video: no sidecar
    key = layout.video_key(plan.run_id, shard, items[0].id)
    storage.put_bytes(key, earlier)
    committer(storage, plan).commit(shard, items[0], GeneratedVideo(frames(items[0], 2)), 1, clear_error=False)
    record = sidecar_of(storage, plan, shard, items[0])
    assert storage.get_bytes(key) == earlier and record["sha256"] == hashlib.sha256(earlier).hexdigest()
    assert record["adopted"] is True and record["timings"] == {}


def test_an_undecodable_stored_video_is_replaced(run):
    storage, plan, shard, items = run
    key = layout.video_key(plan.run_id, shard, items[0].id)
    storage.put_bytes(key, b"not an mp4")
    committer(storage, plan).commit(shard, items[0], GeneratedVideo(frames(items[0])), 1, clear_error=False)
    record = sidecar_of(storage, plan, shard, items[0])
    assert record["adopted"] is False and record["sha256"] == hashlib.sha256(storage.get_bytes(key)).hexdigest()


def test_orphans_are_adopted_or_deleted(run):
    storage, plan, shard, items = run
    good, short, garbage = items[:3]
    storage.put_bytes(layout.video_key(plan.run_id, shard, good.id), encode_mp4(frames(good), 30, 18))
    storage.put_bytes(layout.video_key(plan.run_id, shard, short.id), encode_mp4(frames(short)[:1], 30, 18))
    storage.put_bytes(layout.video_key(plan.run_id, shard, garbage.id), b"\x00" * 64)
    scan = scan_shard(storage, plan.run_id, shard)
    assert scan.orphans == {good.id, short.id, garbage.id}
    committer(storage, plan).adopt_orphans(scan)
    assert scan.adopted == {good.id} and good.id in scan.done
    assert sidecar_of(storage, plan, shard, good)["adopted"] is True
    for gone in (short, garbage):  # wrong frame count, undecodable: deleted, generated again later
        assert storage.head(layout.video_key(plan.run_id, shard, gone.id)) is None


def test_other_weights_are_refused_before_anything_is_written(run):
    storage, plan, shard, items = run
    committer(storage, plan).commit(shard, items[0], GeneratedVideo(frames(items[0])), 1, clear_error=False)
    other = committer(storage, plan, {"path": "/elsewhere", "fingerprint": "cd" * 16})
    with pytest.raises(ModelMismatchError, match="one run never mixes two models"):
        other.commit(shard, items[1], GeneratedVideo(frames(items[1])), 1, clear_error=False)
    assert storage.head(layout.video_key(plan.run_id, shard, items[1].id)) is None


def test_bad_frames_write_nothing(run):
    storage, plan, shard, items = run
    with pytest.raises(ValueError, match="expected uint8"):
        committer(storage, plan).commit(
            shard, items[0], GeneratedVideo(frames(items[0])[..., :2]), 1, clear_error=False
        )
    assert list(storage.list(f"{plan.run_id}/videos/")) == [] and list(storage.list(f"{plan.run_id}/meta/")) == []


def test_error_record_then_commit_clears_it_and_stats_come_last(run):
    storage, plan, shard, items = run
    writer = committer(storage, plan)
    writer.record_error(shard, items[1], 3, RuntimeError("out of memory"), dp_rank=0)
    error = json.loads(storage.get_bytes(layout.error_key(plan.run_id, shard, items[1].id)))
    assert (error["error"], error["attempts"], error["row"], error["launch_attempt"]) == (
        "RuntimeError: out of memory", 3, items[1].row, 1,
    )  # fmt: skip
    writer.record_error(shard, items[2], 3, None, dp_rank=0)
    writer.commit(shard, items[0], GeneratedVideo(frames(items[0])), 1, clear_error=False)
    writer.commit(shard, items[1], GeneratedVideo(frames(items[1])), 1, clear_error=True)
    assert storage.head(layout.error_key(plan.run_id, shard, items[1].id)) is None
    scan = scan_shard(storage, plan.run_id, shard)
    stats = writer.finish_shard(scan, resumed=0, adopted=0, seconds=1.23456)
    stored = json.loads(storage.get_bytes(layout.stats_key(plan.run_id, shard)))
    assert stored == {**stored, "total": 4, "done": 2, "failed": 1, "committed_during_pass": 2, "seconds": 1.235}
    assert stats.done == 2 and list(storage.list(layout.index_parts_prefix(plan.run_id)))
