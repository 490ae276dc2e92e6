"""Issue 13: what a run says about itself (progress, status, index, _SUCCESS.json) holds under faults, races and
tampering. One test per reported case, against moto (through the fault proxy where the case is a network fault)
and the file backend."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.cli import main
from batchgen.core import layout
from batchgen.core.errors import AlreadyExistsError, ChangedError, ModelMismatchError, TransientStorageError
from batchgen.core.plan import load_shard_items
from batchgen.core.progress import RunProgress, scan_run
from batchgen.core.video import encode_mp4
from batchgen.dataset.index import finalize_run
from batchgen.launch.local import ProgressDisplay, _supervise
from batchgen.storage import open_storage
from batchgen.worker.context import SingleProcess
from batchgen.worker.loop import run_worker
from tests._runs import keys_under, plan_run, tiny_run_config, write_manifest
from tests.fixtures.faultproxy import FaultProxy
from tests.test_index import commit_all, sidecar


@pytest.fixture
def small_plan(storage, tmp_path, tiny_config):
    plan = plan_run(storage, tmp_path, 5, tiny_run_config(tiny_config, shard_size=2))
    return plan, {s: load_shard_items(storage, plan.run_id, s) for s in plan.shards}


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """A fault proxy that forwards everything unless a test injects a fault."""
    with FaultProxy(s3_server, 0.0, seed=13) as started:
        monkeypatch.setenv("AWS_ENDPOINT_URL", started.url)
        monkeypatch.setenv("BATCHGEN_S3_BACKOFF_S", "0.002")
        monkeypatch.setenv("BATCHGEN_S3_BACKOFF_MAX_S", "0.02")
        yield started


def index_rows(storage, plan) -> list[dict]:
    return pq.read_table(pa.BufferReader(storage.get_bytes(layout.index_key(plan.run_id)))).to_pylist()


# -- case 1: a reset while an error answer is read ----------------------------------------------------------


@pytest.mark.parametrize("fault", ["reset_body", "truncate"])
def test_error_body_cut_short_is_retried_not_exit_1(fault, proxy, s3_uri, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", 3)
    # The 404 of run.json on a new output: botocore reads its body outside its own exception wrapping.
    proxy.inject("GET", "/plan/run.json", fault)
    assert main(["plan", str(manifest), "--output", s3_uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is False
    assert proxy.counts[fault] == 1


def test_reset_while_reading_a_body_is_retried(proxy, s3_uri):
    storage = open_storage(s3_uri)
    storage.put_bytes("run/a.json", b"{}")
    proxy.inject("GET", "/run/a.json", "reset_body", times=2)
    assert storage.get_bytes("run/a.json") == b"{}"
    assert proxy.counts["reset_body"] == 2


def test_error_body_cut_short_every_time_exits_200(proxy, s3_uri, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BATCHGEN_S3_MAX_ATTEMPTS", "3")
    manifest = write_manifest(tmp_path / "m.parquet", 3)
    proxy.inject("GET", "/plan/run.json", "reset_body", times=100)
    assert main(["plan", str(manifest), "--output", s3_uri]) == 200
    assert "run.json" in capsys.readouterr().err


# -- case 2: stats are a cache, not the truth ---------------------------------------------------------------


def test_sidecar_removed_after_stats_makes_the_shard_pending_again(storage, storage_uri, small_plan, capsys):
    plan, items = small_plan
    commit_all(storage, plan, items)
    for shard in plan.shards:
        storage.put_bytes(layout.stats_key(plan.run_id, shard), b"{}")
    assert finalize_run(storage, plan) is True
    shard = plan.shards[0]
    storage.delete(layout.sidecar_key(plan.run_id, shard, items[shard][1].id))

    progress = scan_run(storage, plan)
    assert (progress.done, progress.pending, progress.complete) == (4, 1, False)
    assert progress.unfinished_shards == [shard]  # so `batchgen run` sends a worker there again
    assert main(["status", storage_uri, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["done"], status["complete"], status["success_marker"]) == (4, False, True)
    assert main(["index", storage_uri]) == 5
    assert not storage.exists(layout.success_key(plan.run_id))


# -- case 3: index racing run -------------------------------------------------------------------------------


def test_stale_finaliser_cannot_replace_a_fresher_index_or_remove_the_marker(storage_factory, small_plan):
    plan, items = small_plan
    storage = storage_factory()
    first = plan.shards[0]
    for item in items[first]:
        sidecar(storage, plan, first, item)

    # Finaliser A (a `batchgen index` started mid-run) stalls while it reads sidecars...
    stale = storage_factory()
    reading, release = threading.Event(), threading.Event()
    get_bytes = stale.get_bytes

    def slow_get(key):
        if "/meta/" in key:
            reading.set()
            release.wait(30)
        return get_bytes(key)

    stale.get_bytes = slow_get
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("a", finalize_run(stale, plan)))
    thread.start()
    assert reading.wait(30)
    # ...while the run commits every item and finalises (B)...
    commit_all(storage, plan, items)
    assert finalize_run(storage, plan) is True
    # ...then A finishes with its view of 2 items.
    release.set()
    thread.join(60)

    assert outcome["a"] is True  # A noticed the fresher index and built again
    assert len(index_rows(storage, plan)) == 5
    marker = json.loads(storage.get_bytes(layout.success_key(plan.run_id)))
    assert marker["index_etag"] == storage.head(layout.index_key(plan.run_id)).etag


def test_conditional_replace(storage):
    etag = storage.put_bytes("run/index/index.parquet", b"one", if_absent=True)
    assert etag and storage.head("run/index/index.parquet").etag == etag
    newer = storage.put_bytes("run/index/index.parquet", b"two", if_match=etag)
    assert newer != etag
    with pytest.raises(ChangedError):
        storage.put_bytes("run/index/index.parquet", b"stale", if_match=etag)
    with pytest.raises(AlreadyExistsError):
        storage.put_bytes("run/index/index.parquet", b"stale", if_absent=True)
    with pytest.raises(ChangedError):
        storage.put_bytes("run/other", b"x", if_match=etag)
    assert storage.get_bytes("run/index/index.parquet") == b"two"
    assert [i.key for i in storage.list("run/index/")] == ["run/index/index.parquet"]  # no lock file listed


# -- case 4: a stray file under meta/ -----------------------------------------------------------------------


def test_stray_sidecar_copy_counts_nowhere(storage, storage_uri, small_plan, caplog, capsys):
    plan, items = small_plan
    commit_all(storage, plan, items)
    shard = plan.shards[0]
    kept, lost = items[shard]
    copy = storage.get_bytes(layout.sidecar_key(plan.run_id, shard, kept.id))
    storage.delete(layout.sidecar_key(plan.run_id, shard, lost.id))
    storage.put_bytes(f"{layout.sidecars_prefix(plan.run_id, shard)}{kept.id}-copy.json", copy)

    progress = scan_run(storage, plan)
    assert (progress.done, progress.complete, progress.unfinished_shards) == (4, False, [shard])
    assert f"{kept.id}-copy" in caplog.text
    assert main(["index", storage_uri]) == 5
    assert "4 rows" in capsys.readouterr().out
    ids = [r["id"] for r in index_rows(storage, plan)]
    assert len(ids) == len(set(ids)) == 4 and lost.id not in ids
    assert not storage.exists(layout.success_key(plan.run_id))


def test_sidecar_of_another_item_under_a_planned_name_is_refused(storage, storage_uri, small_plan, capsys):
    plan, items = small_plan
    commit_all(storage, plan, items)
    shard = plan.shards[0]
    kept, lost = items[shard]
    forged = layout.sidecar_key(plan.run_id, shard, lost.id)
    storage.put_bytes(forged, storage.get_bytes(layout.sidecar_key(plan.run_id, shard, kept.id)))
    assert main(["index", storage_uri]) == 3
    assert f"describes {plan.run_id}/{shard}/{kept.id}" in capsys.readouterr().err


# -- case 7: exit codes and process management ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "not utf-8"])
def test_unreadable_config_exits_2_naming_it(kind, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", 2)
    config = tmp_path / "run.toml"
    if kind == "directory":
        config.mkdir()
    else:
        config.write_bytes(b"[generation]\nnegative_prompt = '\xff\xfe'\n")
    assert main(["validate", str(manifest), "--config", str(config)]) == 2
    assert str(config) in capsys.readouterr().err


def test_truncated_text_encoder_weights_exit_2_naming_the_file(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code = main(["generate", "--model-dir", str(model), "--prompt", "a fox", "--out", str(tmp_path / "fox.mp4")])
    assert code == 2
    assert f"{weights}: truncated safetensors file" in capsys.readouterr().err


SLEEPER = """
import pathlib, signal, sys, time
def stop(signum, frame):
    pathlib.Path(sys.argv[1]).write_text(str(signum))
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[1] + ".pid").write_text(str(__import__("os").getpid()))
time.sleep(120)
"""

SUPERVISOR = """
import io, json, sys
from batchgen.launch.local import ProgressDisplay, _supervise
from batchgen.worker.context import SingleProcess
from batchgen.core.progress import RunProgress
commands = [[sys.executable, "-c", sys.argv[1], path] for path in sys.argv[2:]]
codes, signum = _supervise(commands, lambda: RunProgress("r"), ProgressDisplay(io.StringIO(), "r", 0), 0.05)
print(json.dumps({"codes": codes, "signal": signum}))
"""


def _wait_for(paths, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not all(p.exists() and p.read_text() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


def _start_supervisor(tmp_path, count=2):
    marks = [tmp_path / f"worker-{i}" for i in range(count)]
    parent = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, SLEEPER, *map(str, marks)], stdout=subprocess.PIPE, text=True
    )
    pids = [Path(f"{m}.pid") for m in marks]
    _wait_for(pids)
    return parent, marks, [int(p.read_text()) for p in pids]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's prctl")
def test_workers_stop_when_the_run_is_killed_9(tmp_path):
    parent, marks, pids = _start_supervisor(tmp_path)
    parent.kill()
    parent.wait()
    _wait_for(marks)  # each worker got SIGTERM, the graceful stop, from the kernel
    assert {m.read_text() for m in marks} == {str(int(signal.SIGTERM))}
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def test_sighup_stops_the_workers_gracefully(tmp_path):
    parent, marks, _ = _start_supervisor(tmp_path)
    parent.send_signal(signal.SIGHUP)
    out, _ = parent.communicate(timeout=60)
    assert json.loads(out) == {"codes": [143, 143], "signal": int(signal.SIGHUP)}
    assert all(m.read_text() == str(int(signal.SIGTERM)) for m in marks)


def test_failing_progress_poll_stops_the_workers_with_sigterm(tmp_path):
    marks = [tmp_path / "worker-0", tmp_path / "worker-1"]
    commands = [[sys.executable, "-c", SLEEPER, str(m)] for m in marks]
    polls = []

    def poll():
        polls.append(1)
        if len(polls) > 1 and all(Path(f"{m}.pid").exists() for m in marks):
            raise TransientStorageError("S3 list s3://b/out/run/meta/: SlowDown persisted after 10 attempt(s)")
        return RunProgress("r")

    with pytest.raises(TransientStorageError, match="SlowDown"):
        _supervise(commands, poll, ProgressDisplay(io.StringIO(), "r", 0), 0.05)
    assert all(m.read_text() == str(int(signal.SIGTERM)) for m in marks)  # not SIGKILL: they could finish a commit


# -- case 5 (adoption) and case 6: a hash we verified, and one model per run ------------------------------------


class NeverGenerates:
    """A generator for runs where every item is already done or adopted: being called is a test failure."""

    def __init__(self, fingerprint: str):
        self.model_identity = {"path": f"/models/{fingerprint}", "fingerprint": fingerprint}

    def prepare(self, items):
        raise AssertionError(f"prepare called for {[i.id for i in items]}")

    def generate(self, item):
        raise AssertionError(f"generate called for {item.id}")

    def close(self):
        pass


def put_orphans(storage, plan, items) -> dict[str, bytes]:
    videos = {}
    rng = np.random.default_rng(5)
    for shard, shard_items in items.items():
        for item in shard_items:
            frames = rng.integers(0, 255, (item.num_frames, item.height, item.width, 3), dtype=np.uint8)
            videos[item.id] = encode_mp4(frames, 30, 18)
            storage.put_bytes(layout.video_key(plan.run_id, shard, item.id), videos[item.id])
    return videos


def test_adoption_records_the_stored_objects_hash_not_a_short_read(proxy, s3_uri, tmp_path, tiny_config):
    storage = open_storage(s3_uri)
    plan = plan_run(storage, tmp_path, 2, tiny_run_config(tiny_config, shard_size=2))
    items = {s: load_shard_items(storage, plan.run_id, s) for s in plan.shards}
    videos = put_orphans(storage, plan, items)
    victim = items[plan.shards[0]][0].id
    # The store delivers half the video once, with a Content-Length that agrees: nothing on the wire is wrong.
    proxy.strip_checksums = True  # a store without checksums: botocore has nothing to check the body against
    proxy.inject("GET", f"/videos/{plan.shards[0]}/{victim}.mp4", "short")

    summary = run_worker(storage, plan, plan.shards, NeverGenerates("f1"), SingleProcess())
    assert (summary.adopted, summary.exit_code) == (2, 0)
    assert proxy.counts["short"] == 1
    for item_id, data in videos.items():
        sidecar = json.loads(storage.get_bytes(layout.sidecar_key(plan.run_id, plan.shards[0], item_id)))
        assert (sidecar["sha256"], sidecar["size_bytes"]) == (hashlib.sha256(data).hexdigest(), len(data))


def test_other_weights_refuse_to_join_a_run(storage, storage_uri, tmp_path, tiny_config, caplog):
    plan = plan_run(storage, tmp_path, 4, tiny_run_config(tiny_config, shard_size=2))
    items = {s: load_shard_items(storage, plan.run_id, s) for s in plan.shards}
    first = plan.shards[0]
    put_orphans(storage, plan, {first: items[first]})
    assert run_worker(storage, plan, [first], NeverGenerates("aaaa"), SingleProcess()).adopted == 2
    assert json.loads(storage.get_bytes(layout.model_pin_key(plan.run_id)))["fingerprint"] == "aaaa"

    second = plan.shards[1]
    put_orphans(storage, plan, {second: items[second]})
    with pytest.raises(ModelMismatchError) as refused:
        run_worker(storage, plan, [second], NeverGenerates("bbbb"), SingleProcess())
    assert refused.value.exit_code == 4
    assert "aaaa" in str(refused.value) and "bbbb" in str(refused.value)
    assert not keys_under(storage, layout.sidecars_prefix(plan.run_id, second))  # nothing mixed in
    assert run_worker(storage, plan, [second], NeverGenerates("aaaa"), SingleProcess()).adopted == 2


# -- case 5: deleted or damaged videos, batchgen verify --------------------------------------------------------


@pytest.fixture
def committed_run(storage, tmp_path, tiny_config):
    """A complete run of real MP4s whose sidecars the worker wrote (by adopting them), index and marker built."""
    plan = plan_run(storage, tmp_path, 4, tiny_run_config(tiny_config, shard_size=2))
    items = {s: load_shard_items(storage, plan.run_id, s) for s in plan.shards}
    videos = put_orphans(storage, plan, items)
    assert run_worker(storage, plan, plan.shards, NeverGenerates("f1"), SingleProcess()).adopted == 4
    assert finalize_run(storage, plan) is True
    return plan, items, videos


def verify(storage_uri, *flags, capsys) -> tuple[int, dict]:
    code = main(["verify", storage_uri, "--json", *flags])
    return code, json.loads(capsys.readouterr().out)


def test_verify_finds_a_deleted_video_and_repair_makes_it_pending(storage, storage_uri, committed_run, capsys):
    plan, items, videos = committed_run
    assert verify(storage_uri, capsys=capsys) == (0, {"run_id": plan.run_id, "done": 4, "total": 4, "found": [],
                                                        "remaining": []})  # fmt: skip
    shard = plan.shards[1]
    lost = items[shard][0]
    storage.delete(layout.video_key(plan.run_id, shard, lost.id))

    code, report = verify(storage_uri, capsys=capsys)
    assert code == 8
    assert [p["problem"] for p in report["found"]] == ["video missing (its sidecar says it is done)"]
    assert report["found"][0]["uri"] == storage.url(layout.video_key(plan.run_id, shard, lost.id))

    code, report = verify(storage_uri, "--repair", capsys=capsys)
    assert (code, report["done"], report["remaining"]) == (0, 3, [])
    progress = scan_run(storage, plan)
    assert (progress.pending, progress.unfinished_shards) == (1, [shard])
    assert not storage.exists(layout.success_key(plan.run_id))
    assert {r["id"] for r in index_rows(storage, plan)} == {i.id for s in items.values() for i in s} - {lost.id}

    # The next run regenerates it (here: a video for it reappears and is adopted) and the run is whole again.
    storage.put_bytes(layout.video_key(plan.run_id, shard, lost.id), videos[lost.id])
    assert run_worker(storage, plan, [shard], NeverGenerates("f1"), SingleProcess()).adopted == 1
    assert finalize_run(storage, plan) is True
    assert verify(storage_uri, "--deep", capsys=capsys)[0] == 0


def test_verify_deep_finds_changed_bytes_of_the_same_size(storage, storage_uri, committed_run, capsys):
    plan, items, videos = committed_run
    shard = plan.shards[0]
    victim = items[shard][1]
    data = bytearray(videos[victim.id])
    data[len(data) // 2] ^= 0xFF
    storage.put_bytes(layout.video_key(plan.run_id, shard, victim.id), bytes(data))

    assert verify(storage_uri, capsys=capsys)[0] == 0  # the size still matches: only --deep reads the bytes
    code, report = verify(storage_uri, "--deep", capsys=capsys)
    assert code == 8
    assert [p["problem"].split(" ")[0] for p in report["found"]] == ["sha256"]


def test_verify_reports_strays_and_an_index_that_disagrees(storage, storage_uri, committed_run, capsys):
    plan, items, videos = committed_run
    shard = plan.shards[0]
    kept, dropped = items[shard]
    storage.put_bytes(f"{layout.sidecars_prefix(plan.run_id, shard)}copy-of-{kept.id}.json", b"{}")
    storage.put_bytes(f"{layout.videos_prefix(plan.run_id, shard)}copy-of-{kept.id}.mp4", videos[kept.id])
    storage.delete(layout.video_key(plan.run_id, shard, dropped.id))
    storage.delete(layout.sidecar_key(plan.run_id, shard, dropped.id))  # by hand, index and marker left as they were

    code, report = verify(storage_uri, capsys=capsys)
    assert code == 8
    problems = sorted(p["problem"] for p in report["found"])
    assert problems == [
        "index does not match the sidecars (0 missing, 1 extra, 0 changed rows)",
        "stray: not an object of a planned item",
        "stray: not an object of a planned item",
        "success marker present, but only 3 of 4 items are done",
    ]
    code, report = verify(storage_uri, "--repair", capsys=capsys)
    assert code == 8  # strays are reported, never deleted
    assert sorted(p["problem"] for p in report["remaining"]) == ["stray: not an object of a planned item"] * 2


def test_verify_lists_what_an_interrupted_write_left(storage, storage_uri, committed_run, capsys):
    """Issue 19 item 4: a kill during a write leaves a hidden temporary or lock file in a folder output; verify
    names each (S3 has none: an interrupted put leaves no object)."""
    plan, _, _ = committed_run
    if not storage_uri.startswith("file:"):
        assert storage.leftovers(plan.run_id + "/") == []
        return
    root = Path(storage.root)
    temp = root / plan.run_id / "videos" / plan.shards[0] / ".batchgen-tmp-x.mp4.0123abcd"
    lock = root / layout.index_key(plan.run_id).replace("index.parquet", ".batchgen-tmp-lock-index.parquet")
    temp.write_bytes(b"half a video")
    lock.touch()
    code, report = verify(storage_uri, capsys=capsys)
    assert code == 8
    assert {(p["uri"], p["problem"]) for p in report["found"]} == {
        (path.as_uri(), "left by an interrupted write, not part of the dataset: delete it once no batchgen command "
         "writes here") for path in (temp, lock)
    }  # fmt: skip
    temp.unlink()
    finalize_run(storage, plan)  # current: writes nothing, so the stale lock stays until the index is replaced
    storage.delete(layout.success_key(plan.run_id))
    finalize_run(storage, plan)  # a conditional replace of the index takes the stale lock and removes it
    assert not lock.exists()
    assert verify(storage_uri, capsys=capsys)[0] == 0
