"""Index, success marker, progress and the status/index commands, from storage objects alone.

Sidecars here are written directly (the sidecar is a documented JSON format; the worker tests check that the
worker writes it), so these tests run without a model.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.cli import main
from batchgen.core import layout
from batchgen.core.errors import StorageError
from batchgen.core.plan import load_shard_items
from batchgen.core.progress import scan_run
from batchgen.dataset.index import BASE_SCHEMA, build_index, finalize_run
from batchgen.storage import open_storage
from tests._runs import plan_run, tiny_run_config


def sidecar(storage, plan, shard, item, *, adopted=False, **extra):
    key = layout.video_key(plan.run_id, shard, item.id)
    data = {
        **item.to_dict(),
        "shard": shard, "run_id": plan.run_id, "fps": 30, "crf": 18,
        "video_key": key, "video_uri": storage.url(key), "sha256": "ab" * 32, "size_bytes": 1000 + item.row,
        "frames": item.num_frames, "video_width": item.width, "video_height": item.height, "duration_s": 0.2,
        "model": {"path": "/m", "fingerprint": "f" * 64},
        "timings": {} if adopted else {"text_encode": 0.1, "denoise": 1.5, "decode": 0.3, "encode_mp4": 0.05,
                                       "upload": 0.01},
        "attempt": 1, "host": "h", "batchgen_version": "0.1.0",
        "parallel": {"world_size": 2, "dp_size": 1, "ulysses": 2},
        "created_at": "2026-01-02T03:04:05.678Z", "adopted": adopted, **extra,
    }  # fmt: skip
    storage.put_bytes(layout.sidecar_key(plan.run_id, shard, item.id), json.dumps(data).encode())
    return data


@pytest.fixture
def small_plan(storage, tmp_path, tiny_config):
    plan = plan_run(storage, tmp_path, 5, tiny_run_config(tiny_config, shard_size=2))
    items = {s: load_shard_items(storage, plan.run_id, s) for s in plan.shards}
    return plan, items


def commit_all(storage, plan, items, **kwargs):
    for shard, shard_items in items.items():
        for item in shard_items:
            sidecar(storage, plan, shard, item, **kwargs)


def test_index_rows_types_and_readers(storage, small_plan, tmp_path):
    plan, items = small_plan
    shard0, shard1 = plan.shards[:2]
    written = [sidecar(storage, plan, shard1, items[shard1][1]), sidecar(storage, plan, shard0, items[shard0][0])]
    written.append(sidecar(storage, plan, shard0, items[shard0][1], adopted=True))

    assert build_index(storage, plan) == 3
    local = tmp_path / "index.parquet"
    local.write_bytes(storage.get_bytes(layout.index_key(plan.run_id)))
    table = pq.read_table(local)
    assert table.schema.names[: len(BASE_SCHEMA)] == BASE_SCHEMA.names
    assert table.schema.field("created_at").type == pa.timestamp("ms", tz="UTC")
    assert {"parallel_ulysses", "video_key"} & set(table.schema.names) == {"parallel_ulysses"}
    rows = table.to_pylist()
    assert [r["row"] for r in rows] == [0, 1, 3]  # manifest order, whatever the listing order
    adopted = rows[1]
    assert adopted["adopted"] is True and adopted["timings_denoise"] is None
    assert rows[0]["timings_denoise"] == 1.5 and rows[0]["model_fingerprint"] == "f" * 64
    assert rows[0]["uri"] == storage.url(rows[0]["key"])
    assert rows[0]["created_at"] == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)

    frame = pd.read_parquet(local)
    assert list(frame["id"]) == [r["id"] for r in rows]
    by_duckdb = duckdb.sql(f"SELECT count(*), sum(size_bytes) FROM read_parquet('{local}')").fetchall()
    assert by_duckdb == [(3, sum(s["size_bytes"] for s in written))]


def test_invalid_sidecar_names_its_key(storage, small_plan):
    plan, items = small_plan
    shard = plan.shards[0]
    key = layout.sidecar_key(plan.run_id, shard, items[shard][0].id)
    storage.put_bytes(key, b"{not json")
    with pytest.raises(StorageError, match=key):
        build_index(storage, plan)


def test_success_marker_only_when_every_item_is_done(storage, small_plan):
    plan, items = small_plan
    first = plan.shards[0]
    sidecar(storage, plan, first, items[first][0])
    assert finalize_run(storage, plan) is False
    assert not storage.exists(layout.success_key(plan.run_id))

    commit_all(storage, plan, items)
    assert finalize_run(storage, plan) is True
    marker = json.loads(storage.get_bytes(layout.success_key(plan.run_id)))
    assert (marker["items"], marker["index_rows"]) == (5, 5)

    storage.delete(layout.sidecar_key(plan.run_id, first, items[first][0].id))  # a run that lost an item
    assert finalize_run(storage, plan) is False
    assert not storage.exists(layout.success_key(plan.run_id))


PROGRESS = [
    # (case, done per shard index, stats on shards, failed (shard, item index), done, failed, finished, complete)
    ("nothing yet", {}, set(), [], 0, 0, set(), False),
    ("partial shard without stats", {0: [0]}, set(), [], 1, 0, set(), False),
    ("finished shard", {0: [0, 1]}, {0}, [], 2, 0, {0}, False),
    ("failed item keeps its shard unfinished", {0: [0]}, {0}, [(0, 1)], 1, 1, set(), False),
    ("stale error of a done item is ignored", {0: [0, 1]}, {0}, [(0, 1)], 2, 0, {0}, False),
    ("everything", {0: [0, 1], 1: [0, 1], 2: [0]}, {0, 1, 2}, [], 5, 0, {0, 1, 2}, True),
]


@pytest.mark.parametrize(
    "case,done,stats,failed,n_done,n_failed,finished,complete", PROGRESS, ids=[c[0] for c in PROGRESS]
)
def test_scan_run(case, done, stats, failed, n_done, n_failed, finished, complete, storage, small_plan):
    plan, items = small_plan
    for index, positions in done.items():
        shard = plan.shards[index]
        for position in positions:
            sidecar(storage, plan, shard, items[shard][position])
    for index in stats:
        storage.put_bytes(layout.stats_key(plan.run_id, plan.shards[index]), b"{}")
    for index, position in failed:
        shard = plan.shards[index]
        storage.put_bytes(layout.error_key(plan.run_id, shard, items[shard][position].id), b"{}")
    progress = scan_run(storage, plan)
    assert (progress.done, progress.failed, progress.total) == (n_done, n_failed, 5)
    assert progress.finished_shards == {plan.shards[i] for i in finished}
    assert progress.complete is complete
    assert progress.pending == 5 - n_done - n_failed


def test_scan_run_uses_one_listing_for_many_small_unfinished_shards(s3_uri, tmp_path, tiny_config):
    storage = open_storage(s3_uri)
    plan = plan_run(storage, tmp_path, 40, tiny_run_config(tiny_config, shard_size=1))
    before = storage.request_count
    assert scan_run(storage, plan).pending == 40
    assert storage.request_count - before == 3  # stats/, errors/ and the whole run's meta/, not 40 shard listings


def test_status_and_index_commands(storage_uri, tmp_path, tiny_config, capsys):
    storage = open_storage(storage_uri)
    plan = plan_run(storage, tmp_path, 5, tiny_run_config(tiny_config, shard_size=2))
    items = {s: load_shard_items(storage, plan.run_id, s) for s in plan.shards}

    assert main(["status", storage_uri]) == 0
    out = capsys.readouterr().out
    assert f"run       {plan.run_id}" in out and "0/5 done" in out and "not started" in out

    assert main(["index", storage_uri]) == 5  # incomplete: the index covers what is done (nothing)
    assert "0 rows" in capsys.readouterr().out

    commit_all(storage, plan, items)
    assert main(["index", storage_uri, "--run-id", plan.run_id]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["status", storage_uri, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["done"], data["complete"], data["success_marker"]) == (5, True, True)

    other = plan_run(storage, tmp_path, 2, tiny_run_config(tiny_config, shard_size=2), name="other")
    assert main(["status", storage_uri]) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and plan.run_id in out and other.run_id in out
    assert main(["index", storage_uri]) == 2  # which run? the user must say
