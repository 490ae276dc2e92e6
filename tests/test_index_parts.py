"""Issue 10, item 2: the run index assembled from per-shard parts the workers write; a part is rebuilt only when
its shard changed, and a rerun of a complete run writes nothing."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

from batchgen.core import layout
from batchgen.core.plan import load_shard_items
from batchgen.dataset.index import finalize
from batchgen.storage import open_storage
from batchgen.worker.context import SingleProcess
from batchgen.worker.loop import run_worker
from tests._runs import keys_under, plan_run, tiny_run_config
from tests.test_trust import NeverGenerates, index_rows, put_orphans


@pytest.fixture
def worked_run(storage, tmp_path, tiny_config):
    """Three shards committed by the worker (which wrote their parts), nothing finalised yet."""
    plan = plan_run(storage, tmp_path, 5, tiny_run_config(tiny_config, shard_size=2))
    items = {s: load_shard_items(storage, plan.run_id, s) for s in plan.shards}
    put_orphans(storage, plan, items)
    assert run_worker(storage, plan, plan.shards, NeverGenerates("f1"), SingleProcess()).adopted == 5
    return plan, items


def parts(storage, plan) -> dict[str, str]:
    """part key -> etag."""
    return {i.key: i.etag for i in storage.list(layout.index_parts_prefix(plan.run_id))}


def test_worker_writes_parts_and_finalising_only_reads_them(s3_uri, tmp_path, tiny_config):
    storage = open_storage(s3_uri)
    plan = plan_run(storage, tmp_path, 5, tiny_run_config(tiny_config, shard_size=2))
    items = {s: load_shard_items(storage, plan.run_id, s) for s in plan.shards}
    put_orphans(storage, plan, items)
    run_worker(storage, plan, plan.shards, NeverGenerates("f1"), SingleProcess())
    written = parts(storage, plan)
    assert sorted(k.rsplit("/", 1)[1].rsplit("-", 1)[0] for k in written) == plan.shards

    before = storage.request_count
    result = finalize(storage, plan)
    requests = storage.request_count - before
    assert (result.complete, result.rows, result.written) == (True, 5, True)
    assert parts(storage, plan) == written  # no part rebuilt: the workers' are current
    # head index, 3 listings (stats, errors, meta), parts listing, 3 part gets, the run's content map put, index
    # put, marker put, head index
    assert requests == 12, requests
    assert [r["row"] for r in index_rows(storage, plan)] == [0, 1, 2, 3, 4]


def test_rerun_of_a_complete_run_writes_nothing(storage, worked_run):
    plan, _ = worked_run
    assert finalize(storage, plan).written
    index = storage.head(layout.index_key(plan.run_id))
    marker = storage.head(layout.success_key(plan.run_id))
    snapshot = {k: storage.head(k) for k in keys_under(storage, plan.run_id)}

    again = finalize(storage, plan)
    assert (again.complete, again.rows, again.written) == (True, 5, False)
    assert storage.head(layout.index_key(plan.run_id)) == index
    assert storage.head(layout.success_key(plan.run_id)) == marker
    assert {k: storage.head(k) for k in keys_under(storage, plan.run_id)} == snapshot


def test_only_the_changed_shards_part_is_rebuilt(storage, worked_run):
    plan, items = worked_run
    assert finalize(storage, plan).complete
    before = parts(storage, plan)
    shard = plan.shards[1]
    storage.delete(layout.sidecar_key(plan.run_id, shard, items[shard][0].id))

    result = finalize(storage, plan)
    assert (result.complete, result.rows, result.written) == (False, 4, True)
    after = parts(storage, plan)
    unchanged = {k: e for k, e in before.items() if f"/{shard}-" not in k}
    assert {k: e for k, e in after.items() if f"/{shard}-" not in k} == unchanged  # same objects, not rewritten
    (new_part,) = [k for k in after if f"/{shard}-" in k]
    assert new_part not in before  # the stale part was replaced and deleted
    assert not storage.exists(layout.success_key(plan.run_id))


def test_index_from_parts_reads_with_one_call(storage, worked_run, tmp_path):
    plan, _ = worked_run
    finalize(storage, plan)
    local = tmp_path / "index.parquet"
    local.write_bytes(storage.get_bytes(layout.index_key(plan.run_id)))
    frame = pd.read_parquet(local)
    assert list(frame["row"]) == [0, 1, 2, 3, 4] and frame["adopted"].all()
    assert duckdb.sql(f"SELECT count(DISTINCT id) FROM '{local}'").fetchall() == [(5,)]
