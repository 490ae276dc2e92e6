"""``open_run(uri).follow()`` and ``batchgen tail``: committed items as they appear, each once, in commit order,
resumable by cursor, stopping at ``_SUCCESS.json``; against a run in progress on moto, with a restart midway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from batchgen.core import layout
from batchgen.core.errors import InputError, NotFoundError
from batchgen.core.plan import make_plan
from batchgen.dataset import open_run
from batchgen.dataset.follow import SKEW_S, Cursor, follow
from batchgen.storage import LocalStorage, open_storage
from tests._runs import SMALL_SHAPE, keys_under, run_cli, tiny_run_args, write_manifest


def _commit(storage, plan, shard: str, item_id: str, when: float) -> None:
    """A sidecar stands for a commit here: follow reads nothing else of it."""
    key = layout.sidecar_key(plan.run_id, shard, item_id)
    storage.put_bytes(key, b"{}")
    os.utime(storage.root / key, (when, when))


def test_follow_yields_each_once_in_commit_order_and_resumes(tmp_path, tiny_config):
    storage = LocalStorage(tmp_path / "out")
    plan = make_plan(
        write_manifest(tmp_path / "m.parquet", 6), tiny_config.with_overrides({"worker": {"shard_size": 3}}), storage
    )
    ids = [(shard, f"item-{i}") for i, shard in enumerate([plan.shards[0]] * 3 + [plan.shards[1]] * 3)]
    polls: list[list[str]] = []
    now = 1_000_000.0

    def sleep(_):
        polls.append([])

    _commit(storage, plan, *ids[3], now + 1)
    _commit(storage, plan, *ids[0], now + 2)
    follower = follow(storage, plan, poll=1, sleep=sleep)
    seen = []
    for committed in follower:
        seen.append(committed.item.id)
        if len(seen) == 2:
            # Later commits, one of them with an earlier time than the newest seen (a slow PUT): still yielded.
            _commit(storage, plan, *ids[1], now + 1.5)
            _commit(storage, plan, *ids[4], now + 3)
        if len(seen) == 4:
            cursor = committed.cursor
            break
    assert seen == ["item-3", "item-0", "item-1", "item-4"]

    _commit(storage, plan, *ids[2], now + 4)
    _commit(storage, plan, *ids[5], now + 5)
    storage.put_bytes(layout.success_key(plan.run_id), b"{}")
    rest = [c.item.id for c in follow(storage, plan, poll=1, start_after=cursor, sleep=sleep)]
    assert rest == ["item-2", "item-5"]  # nothing repeated, nothing missed, then it stops at _SUCCESS.json


def test_cursor_stays_small_and_rejects_garbage():
    cursor = Cursor()
    for i in range(1000):
        cursor.recent[f"item-{i}"] = float(i)
    cursor.advance(999 - SKEW_S + 1000)  # everything older than the watermark is summarised by it
    assert len(cursor.recent) == 0 and Cursor.parse(str(cursor)).watermark == cursor.watermark
    with pytest.raises(InputError, match="not a cursor"):
        Cursor.parse("not-a-cursor")


def _wait_for_run(uri: str, proc: subprocess.Popen):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return open_run(uri)
        except (NotFoundError, InputError):
            time.sleep(0.2)
    raise AssertionError(f"the run was never planned: {proc.communicate()}")


@pytest.mark.slow
def test_follow_a_run_in_progress_on_s3_with_a_restart(s3_uri, tmp_path, tiny_model_dir):
    manifest = write_manifest(tmp_path / "grow.parquet", 8)
    shape = ["--num-frames", str(SMALL_SHAPE["num_frames"]), "--height", "32", "--width", "32"]
    args = ["run", str(manifest), "--output", s3_uri, *tiny_run_args(tiny_model_dir), *shape, "--shard-size", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchgen", *args, "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run = _wait_for_run(s3_uri, proc)
        first, cursor = [], None
        for committed in run.follow(poll=0.2):
            first.append(committed.item.id)
            cursor = committed.cursor
            if len(first) == 3:
                break  # the consumer stops midway...
        assert proc.poll() is None, "the run ended before the follower restarted: the test shows nothing"
        # ...and resumes from its cursor, from the command line, until the run completes.
        tail = run_cli("tail", f"{s3_uri}/{run.run_id}", "--json", "--poll", "0.2", "--start-after", cursor)
        assert tail.returncode == 0, tail.stderr
        second = [json.loads(line)["id"] for line in tail.stdout.splitlines()]
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(first + second) == sorted(f"item-{i}" for i in range(8))  # every item once
    storage = open_storage(s3_uri)
    committed_at = {layout.item_id_from_key(i.key): i.modified for i in storage.list(layout.meta_prefix(run.run_id))}
    for part in (first, second):  # commit order (times only: S3 reports whole seconds, so ties are by key)
        times = [committed_at[item_id] for item_id in part]
        assert times == sorted(times)
    assert keys_under(storage, layout.success_key(run.run_id))
