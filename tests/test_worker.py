"""The worker loop against real storage (folder and moto S3) and the real tiny Mochi generator.

Failures are injected by a thin wrapper around the real generator (``Scripted``): the component under test is
the worker, and an exception from ``generate`` is exactly what a real generation failure looks like to it.
Multi-rank cases run real processes over torch.distributed gloo.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import threading
import traceback

import numpy as np
import pytest

from batchgen.core import layout
from batchgen.core.errors import EXIT_INCOMPLETE, EXIT_OK, EXIT_TERMINATED
from batchgen.core.plan import load_plan
from batchgen.core.progress import scan_run
from batchgen.core.video import encode_mp4
from batchgen.storage import LocalStorage, open_storage
from batchgen.worker.context import SingleProcess
from batchgen.worker.loop import StopRequest, run_worker, scan_shard
from tests._runs import assert_exactly_once, keys_under, plan_run, tiny_run_config

SIDECAR_FIELDS = {
    "id", "shard", "run_id", "prompt", "negative_prompt", "seed", "num_frames", "height", "width",
    "num_inference_steps", "guidance_scale", "fps", "video_key", "video_uri", "sha256", "size_bytes", "frames",
    "duration_s", "model", "timings", "attempt", "host", "batchgen_version", "parallel", "created_at", "adopted",
}  # fmt: skip


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from batchgen.models.mochi.generator import MochiGenerator

    real = MochiGenerator(tiny_model_dir, device="cpu")
    yield real
    real.close()


class Scripted:
    """The real generator, with failures injected by item id."""

    def __init__(self, real, *, fail=None, bad_frames=(), during=None):
        self.real = real
        self.model_identity = real.model_identity
        self.fail = dict(fail or {})
        self.bad_frames = set(bad_frames)
        self.during = during or {}
        self.calls: list[str] = []

    def prepare(self, items):
        self.real.prepare(items)

    def generate(self, item):
        self.calls.append(item.id)
        if item.id in self.during:
            self.during[item.id](item)
        if self.fail.get(item.id, 0) > 0:
            self.fail[item.id] -= 1
            raise RuntimeError(f"injected failure for {item.id}")
        video = self.real.generate(item)
        if item.id in self.bad_frames and video is not None:  # only the writer rank gets frames
            video.frames = video.frames[..., :2]  # two channels: not a video the encoder can take
        return video

    def close(self):
        pass


def local(tmp_path):
    return LocalStorage(tmp_path / "out")


def test_commit_then_resume_generates_nothing(storage, generator, tmp_path, tiny_config):
    plan = plan_run(storage, tmp_path, 3, tiny_run_config(tiny_config, shard_size=2))
    first = Scripted(generator)
    summary = run_worker(storage, plan, plan.shards, first, SingleProcess())

    assert (summary.generated, summary.resumed, summary.failed, summary.exit_code) == (3, 0, 0, EXIT_OK)
    assert sorted(first.calls) == ["item-0", "item-1", "item-2"]
    sidecars = assert_exactly_once(storage, plan)
    for sidecar in sidecars.values():
        assert SIDECAR_FIELDS <= set(sidecar)
        assert sidecar["adopted"] is False and sidecar["attempt"] == 1
        assert {"text_encode", "denoise", "decode", "encode_mp4", "upload"} <= set(sidecar["timings"])
        assert sidecar["model"] == {"family": plan.config.model.family, **generator.model_identity}
        assert sidecar["model"]["fingerprint"] and sidecar["model"]["family"] == "mochi"
        assert sidecar["video_uri"] == storage.url(sidecar["video_key"])
        assert sidecar["fps"] == tiny_config.generation.fps
    for shard in plan.shards:
        stats = json.loads(storage.get_bytes(layout.stats_key(plan.run_id, shard)))
        assert stats["done"] == stats["total"] == plan.items_in_shard(shard) and stats["failed"] == 0
    assert scan_run(storage, plan).complete

    again = Scripted(generator)
    summary = run_worker(storage, plan, plan.shards, again, SingleProcess())
    assert (summary.generated, summary.resumed, summary.exit_code) == (0, 3, EXIT_OK)
    assert again.calls == []
    assert assert_exactly_once(storage, plan) == sidecars


def _blank_video(item, frames=None):
    shape = (frames or item.num_frames, item.height, item.width, 3)
    return encode_mp4(np.full(shape, 90, np.uint8), 30, 18)


ORPHANS = [
    # (case, bytes left at the video key before the worker starts, expected outcome)
    ("decodable orphan is adopted", _blank_video, "adopted"),
    ("undecodable orphan is replaced", lambda item: b"\x00\x00\x00 not an mp4", "regenerated"),
    (
        "orphan with the wrong frame count is replaced",
        lambda item: _blank_video(item, frames=item.num_frames + 6),
        "regenerated",
    ),
]


@pytest.mark.parametrize("case,orphan,outcome", ORPHANS, ids=[c[0] for c in ORPHANS])
def test_orphan_video(case, orphan, outcome, generator, tmp_path, tiny_config):
    storage = local(tmp_path)
    plan = plan_run(storage, tmp_path, 1, tiny_run_config(tiny_config, shard_size=1))
    item = scan_shard(storage, plan.run_id, plan.shards[0]).items[0]
    left = orphan(item)
    storage.put_bytes(layout.video_key(plan.run_id, plan.shards[0], item.id), left)

    scripted = Scripted(generator)
    summary = run_worker(storage, plan, plan.shards, scripted, SingleProcess())
    sidecar = assert_exactly_once(storage, plan)[item.id]
    if outcome == "adopted":
        assert scripted.calls == [] and summary.adopted == 1 and summary.generated == 0
        assert sidecar["adopted"] is True and sidecar["timings"] == {}
        assert sidecar["sha256"] == hashlib.sha256(left).hexdigest()
    else:
        assert scripted.calls == [item.id] and summary.generated == 1
        assert sidecar["adopted"] is False and sidecar["sha256"] != hashlib.sha256(left).hexdigest()


def test_video_written_by_another_worker_during_generation_is_adopted(generator, tmp_path, tiny_config):
    storage = local(tmp_path)
    plan = plan_run(storage, tmp_path, 1, tiny_run_config(tiny_config, shard_size=1))
    shard = plan.shards[0]
    theirs: dict[str, bytes] = {}

    def concurrent_winner(item):
        theirs["video"] = _blank_video(item)
        storage.put_bytes(layout.video_key(plan.run_id, shard, item.id), theirs["video"], if_absent=True)

    run_worker(storage, plan, plan.shards, Scripted(generator, during={"item-0": concurrent_winner}), SingleProcess())
    sidecar = assert_exactly_once(storage, plan)["item-0"]
    assert sidecar["adopted"] is True
    assert sidecar["sha256"] == hashlib.sha256(theirs["video"]).hexdigest()


FAILURES = [
    # (case, Scripted kwargs, max_attempts, committed?, calls of item-1, error text)
    ("retried then committed", {"fail": {"item-1": 1}}, 3, True, 2, None),
    ("recorded after the last attempt", {"fail": {"item-1": 9}}, 2, False, 2, "injected failure for item-1"),
    ("encoding failure is an item failure", {"bad_frames": {"item-1"}}, 2, False, 2, "frames"),
]


@pytest.mark.parametrize("case,kwargs,max_attempts,committed,calls,error", FAILURES, ids=[c[0] for c in FAILURES])
def test_item_failures(
    case, kwargs, max_attempts, committed, calls, error, generator, tmp_path, tiny_config, monkeypatch
):
    storage = local(tmp_path)
    plan = plan_run(storage, tmp_path, 2, tiny_run_config(tiny_config, shard_size=2, max_attempts=max_attempts))
    shard = plan.shards[0]
    scripted = Scripted(generator, **kwargs)
    summary = run_worker(storage, plan, plan.shards, scripted, SingleProcess())

    assert scripted.calls.count("item-1") == calls
    error_key = layout.error_key(plan.run_id, shard, "item-1")
    stats = json.loads(storage.get_bytes(layout.stats_key(plan.run_id, shard)))  # the shard finished regardless
    if committed:
        sidecars = assert_exactly_once(storage, plan)
        assert sidecars["item-1"]["attempt"] == 2
        assert summary.exit_code == EXIT_OK and not storage.exists(error_key)
        return
    assert_exactly_once(storage, plan, expect_done={"item-0"})
    record = json.loads(storage.get_bytes(error_key))
    assert error in record["error"] and record["attempts"] == max_attempts and record["id"] == "item-1"
    assert (summary.failed, summary.exit_code) == (1, EXIT_INCOMPLETE)
    assert (stats["done"], stats["failed"]) == (1, 1)
    progress = scan_run(storage, plan)
    assert (progress.done, progress.failed, progress.finished_shards) == (1, 1, set())

    # A later launch (BATCHGEN_ATTEMPT=1) with a healthy generator retries only the failed item.
    monkeypatch.setenv("BATCHGEN_ATTEMPT", "1")
    healthy = Scripted(generator)
    summary = run_worker(storage, plan, plan.shards, healthy, SingleProcess())
    assert healthy.calls == ["item-1"] and summary.exit_code == EXIT_OK
    assert assert_exactly_once(storage, plan)["item-1"]["attempt"] == 2
    assert not storage.exists(error_key)
    assert scan_run(storage, plan).finished_shards == {shard}


def test_stop_requested_before_start_writes_nothing(generator, tmp_path, tiny_config):
    storage = local(tmp_path)
    plan = plan_run(storage, tmp_path, 2, tiny_run_config(tiny_config, shard_size=2))
    stop = threading.Event()
    stop.set()
    scripted = Scripted(generator)
    summary = run_worker(storage, plan, plan.shards, scripted, SingleProcess(), stop=stop)
    assert summary.exit_code == EXIT_TERMINATED and scripted.calls == []
    assert keys_under(storage, f"{plan.run_id}/videos/") == keys_under(storage, f"{plan.run_id}/stats/") == []


def test_sigterm_during_generation_abandons_the_item(generator, tmp_path, tiny_config):
    storage = local(tmp_path)
    plan = plan_run(storage, tmp_path, 3, tiny_run_config(tiny_config, shard_size=3))

    def preempted(item):
        os.kill(os.getpid(), signal.SIGTERM)

    stop = StopRequest()
    with stop.handling_signals():
        summary = run_worker(
            storage, plan, plan.shards, Scripted(generator, during={"item-1": preempted}), SingleProcess(), stop=stop
        )
    assert summary.interrupted == signal.SIGTERM and summary.exit_code == EXIT_TERMINATED
    # item-0 was committed before the signal; item-1 was abandoned mid-generation without a trace.
    assert_exactly_once(storage, plan, expect_done={"item-0"})
    assert keys_under(storage, f"{plan.run_id}/stats/") == []
    assert keys_under(storage, f"{plan.run_id}/errors/") == []


def test_resume_scan_is_a_few_listings(s3_uri, tmp_path, tiny_config):
    """1,200 committed items: the scan costs one read of the shard file and a listing per 1,000 keys."""
    storage = open_storage(s3_uri)
    count = 1200
    plan = plan_run(storage, tmp_path, count, tiny_run_config(tiny_config, shard_size=count))
    shard = plan.shards[0]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: storage.put_bytes(layout.sidecar_key(plan.run_id, shard, f"item-{i}"), b"{}"),
                range(count - 1),
            )
        )

    fresh = open_storage(s3_uri)
    before = fresh.request_count
    scan = scan_shard(fresh, plan.run_id, shard)
    # first-use bucket check + items file + 2 range listings of meta/ + errors/ + 2 range listings of videos/
    # (one item is not done, so orphans are possible)
    assert fresh.request_count - before <= 7
    assert len(scan.done) == count - 1 and [i.id for i in scan.pending] == [f"item-{count - 1}"]

    storage.put_bytes(layout.sidecar_key(plan.run_id, shard, f"item-{count - 1}"), b"{}")
    before = fresh.request_count
    scan = scan_shard(fresh, plan.run_id, shard)
    assert fresh.request_count - before <= 5  # all done: no videos/ listing, one stats head instead
    assert scan.pending == []


# -- several ranks over torch.distributed (gloo) ------------------------------------------------------------


def _rank_main(rank, world, port, model_dir, root, run_id, degrees, script, result_path):
    """One rank: TorchContext over gloo, the real generator wrapped with this rank's script."""
    try:
        from datetime import timedelta

        import torch.distributed as dist

        from batchgen.core.topology import Topology
        from batchgen.models.mochi.generator import MochiGenerator
        from batchgen.parallel.runtime import TorchContext

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        context = TorchContext.from_process_group(Topology(world, *degrees))
        real = MochiGenerator(model_dir, context=context, device="cpu")

        def die(item):
            os._exit(9)

        actions = script.get(rank, {})
        scripted = Scripted(
            real,
            fail=actions.get("fail"),
            bad_frames=actions.get("bad_frames", ()),
            during={k: die for k in actions.get("die", ())},
        )
        storage = LocalStorage(root)
        try:
            summary = run_worker(storage, load_plan(storage, run_id), ["shard-000000"], scripted, context)
            result = {"exit_code": summary.exit_code, "failed": summary.failed, "generated": summary.generated}
        except BaseException as e:  # noqa: BLE001 - reported to the test
            result = {"raised": type(e).__name__, "message": str(e)}
        with open(result_path, "w") as f:
            json.dump(result, f)
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        os._exit(1)


RANK_CASES = [
    # (case, (dp, cfg, ulysses, ring), per-rank script, expected done, expected error records, rank results)
    # A failure after the group's collectives (here: the writer's encoding) is retried by the whole group in
    # lockstep, then recorded; a rank that dies makes the survivor's next collective fail, naming its rank.
    (
        "ulysses 2: the group retries a writer-side failure together; a dead rank stops the other",
        (1, 1, 2, 1),
        {0: {"bad_frames": ["item-1"]}, 1: {"die": ["item-2"]}},
        {"item-0"},
        {"item-1": "frames"},
        {0: {"raised": "GroupFailure", "message": "rank 0"}, 1: None},
    ),
    (
        "dp 2: one group's failure leaves the other group's items alone",
        (2, 1, 1, 1),
        {1: {"fail": {"item-1": 9}}},
        {"item-0", "item-2"},
        {"item-1": "injected failure for item-1"},
        {0: {"exit_code": EXIT_OK, "failed": 0, "generated": 2}, 1: {"exit_code": EXIT_INCOMPLETE, "failed": 1}},
    ),
]


@pytest.mark.parametrize("case,degrees,script,done,errors,results", RANK_CASES, ids=[c[0][:9] for c in RANK_CASES])
def test_ranks_agree(case, degrees, script, done, errors, results, tiny_model_dir, tmp_path, tiny_config):
    from batchgen.launch.local import free_port

    storage = local(tmp_path)
    plan = plan_run(storage, tmp_path, 3, tiny_run_config(tiny_config, shard_size=3, max_attempts=2))
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    paths = {rank: tmp_path / f"rank{rank}.json" for rank in range(2)}
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(
                rank,
                2,
                port,
                str(tiny_model_dir),
                str(storage.root),
                plan.run_id,
                degrees,
                script,
                str(paths[rank]),
            ),
        )
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode is not None, "a rank hung"
    for rank, expected in results.items():
        if expected is None:
            assert procs[rank].exitcode == 9  # the rank that died
            continue
        got = json.loads(paths[rank].read_text())
        for key, value in expected.items():
            assert value in got[key] if key == "message" else got[key] == value, (rank, got)
    assert_exactly_once(storage, plan, expect_done=done)
    for item_id, text in errors.items():
        record = json.loads(storage.get_bytes(layout.error_key(plan.run_id, "shard-000000", item_id)))
        assert text in record["error"] and record["attempts"] == 2
