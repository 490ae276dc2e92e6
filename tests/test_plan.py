"""Planning: deterministic run ids and shard files, reuse, conflicts, crash safety, both storage backends."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.cli import main
from batchgen.core import layout
from batchgen.core.config import GenerationConfig, ParallelConfig, RunConfig, WorkerConfig
from batchgen.core.errors import (
    EXIT_CONFLICT,
    InputError,
    ManifestError,
    NotFoundError,
    PlanConflictError,
    StorageError,
)
from batchgen.core.manifest import iter_item_batches, iter_items, validate_manifest
from batchgen.core.plan import (
    RunPlan,
    list_runs,
    load_plan,
    load_shard_items,
    make_plan,
    parse_shard_selection,
    plan_manifest,
    slugify,
)
from batchgen.storage import open_storage
from batchgen.storage.local import LocalStorage

SMALL = GenerationConfig(num_frames=13, height=64, width=64, num_inference_steps=2)


def config(shard_size: int = 4, **generation) -> RunConfig:
    return RunConfig(generation=dataclasses.replace(SMALL, **generation), worker=WorkerConfig(shard_size=shard_size))


def manifest(path: Path, n: int = 10, **extra) -> Path:
    columns = {"prompt": [f"prompt number {i}" for i in range(n)], "seed": list(range(100, 100 + n)), **extra}
    pq.write_table(pa.table(columns), path, row_group_size=3)
    return path


def shard_bytes(root: Path, plan: RunPlan) -> dict[str, bytes]:
    return {s: (root / layout.shard_plan_key(plan.run_id, s)).read_bytes() for s in plan.shards}


def test_plan_is_a_pure_function_of_inputs(tmp_path):
    m = manifest(tmp_path / "prompts.parquet")
    a = make_plan(m, config(), LocalStorage(tmp_path / "a"))
    b = make_plan(m, config(), LocalStorage(tmp_path / "b"))
    assert a.run_id == b.run_id and a.run_id.startswith("prompts-") and len(a.run_id) == len("prompts-") + 12
    assert a.fingerprint == b.fingerprint and a.run_id.endswith(a.fingerprint[:12])
    assert shard_bytes(tmp_path / "a", a) == shard_bytes(tmp_path / "b", b)
    assert a.shards == ["shard-000000", "shard-000001", "shard-000002"]
    assert [a.items_in_shard(s) for s in a.shards] == [4, 4, 2]

    # The same rows written with another row-group size: same content digest, same run.
    m2 = tmp_path / "other" / "prompts.parquet"
    m2.parent.mkdir()
    pq.write_table(pq.read_table(m), m2, row_group_size=7)
    assert make_plan(m2, config(), LocalStorage(tmp_path / "c")).run_id == a.run_id


@pytest.mark.parametrize(
    ("change", "same_run"),
    [
        (lambda c: dataclasses.replace(c, worker=WorkerConfig(shard_size=5)), False),
        (lambda c: dataclasses.replace(c, generation=dataclasses.replace(c.generation, num_inference_steps=3)), False),
        (lambda c: dataclasses.replace(c, generation=dataclasses.replace(c.generation, fps=24)), False),
        (lambda c: dataclasses.replace(c, generation=dataclasses.replace(c.generation, negative_prompt="x")), False),
        # Runtime settings must not re-key a run: moving it to more GPUs keeps everything committed.
        (lambda c: dataclasses.replace(c, parallel=ParallelConfig(ulysses_degree=4, cfg_degree=2)), True),
        (lambda c: dataclasses.replace(c, parallel=ParallelConfig(sp_backend="xfuser", offload="model")), True),
        (lambda c: dataclasses.replace(c, worker=WorkerConfig(shard_size=4, max_attempts=9)), True),
    ],
    ids=["shard-size", "steps", "fps", "negative-prompt", "degrees", "backend-offload", "max-attempts"],
)
def test_what_changes_the_run_id(tmp_path, change, same_run):
    m = manifest(tmp_path / "m.parquet")
    base = make_plan(m, config(), LocalStorage(tmp_path / "a"))
    other = make_plan(m, change(config()), LocalStorage(tmp_path / "b"))
    assert (other.run_id == base.run_id) is same_run


def test_shard_contents_in_manifest_order(tmp_path):
    m = manifest(tmp_path / "m.parquet", n=10)
    storage = LocalStorage(tmp_path / "out")
    plan = make_plan(m, config(shard_size=4), storage)
    loaded = [item for s in plan.shards for item in load_shard_items(storage, plan.run_id, s)]
    assert loaded == list(iter_items(m, SMALL))
    assert [i.row for i in load_shard_items(storage, plan.run_id, "shard-000002")] == [8, 9]
    with pytest.raises(NotFoundError, match="shard-000003"):
        load_shard_items(storage, plan.run_id, "shard-000003")


def test_replan_reuses_stored_plan_without_rewriting(tmp_path):
    m = manifest(tmp_path / "m.parquet")
    storage = LocalStorage(tmp_path / "out")
    first, reused = plan_manifest(m, config(), storage)
    assert not reused
    files = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    second, reused = plan_manifest(m, config(), storage)
    assert reused and second == first
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file()) == files
    assert load_plan(storage, first.run_id) == first
    assert RunPlan.from_dict(json.loads(json.dumps(first.to_dict()))) == first


def test_plan_counts_items_per_shape_after_overrides(tmp_path, monkeypatch):
    import batchgen.core.manifest

    # Small batches, so counts and examples must carry across batch boundaries.
    monkeypatch.setattr(batchgen.core.manifest, "BATCH_ROWS", 4)
    frames = [None, 7, None, 7, None, 7, 7, None, None, 7, 7]
    widths = [None, None, None, None, 96, None, None, None, None, None, None]
    m = manifest(tmp_path / "m.parquet", n=11, id=[f"c{i}" for i in range(11)], num_frames=frames, width=widths)
    storage = LocalStorage(tmp_path / "out")
    plan = make_plan(m, config(), storage)
    assert [g.to_dict() for g in plan.shapes] == [
        {"num_frames": 7, "height": 64, "width": 64, "items": 6, "examples": ["c1", "c3", "c5"], "forwards": 24},
        {"num_frames": 13, "height": 64, "width": 64, "items": 4, "examples": ["c0", "c2", "c7"], "forwards": 16},
        {"num_frames": 13, "height": 64, "width": 96, "items": 1, "examples": ["c4"], "forwards": 4},
    ]
    assert load_plan(storage, plan.run_id).shapes == plan.shapes
    # A plan stored without shapes (as an older batchgen wrote it) still loads, and replanning fills them in.
    key = layout.plan_key(plan.run_id)
    stored = json.loads(storage.get_bytes(key))
    del stored["shapes"]
    storage.put_bytes(key, json.dumps(stored).encode())
    assert load_plan(storage, plan.run_id).shapes == ()
    assert make_plan(m, config(), storage).shapes == plan.shapes


def test_conflict_names_what_changed_and_how_to_proceed(tmp_path):
    m = manifest(tmp_path / "prompts.parquet", n=10)
    storage = LocalStorage(tmp_path / "out")
    old = make_plan(m, config(), storage)
    manifest(m, n=11)  # one more row
    new_config = config(shard_size=8, height=128, guidance_scale=6.0)
    with pytest.raises(PlanConflictError) as info:
        make_plan(m, new_config, storage)
    text = str(info.value)
    assert old.run_id in text
    assert "manifest content: 10 rows" in text and "-> 11 rows" in text
    assert "generation.height: 64 -> 128" in text
    assert "generation.guidance_scale: 4.5 -> 6.0" in text
    assert "worker.shard_size (--shard-size): 4 -> 8" in text
    assert "generation.num_frames" not in text  # unchanged keys are not listed
    assert "--new-run" in text and "--run-name" in text
    assert list_runs(storage) == [old.run_id]  # nothing written

    # --new-run plans under the new fingerprinted id; the old run stays intact.
    new = make_plan(m, new_config, storage, new_run=True)
    assert new.run_id != old.run_id and new.row_count == 11
    assert load_plan(storage, old.run_id) == old
    # Another name is another run; then all three are listed.
    named = make_plan(m, new_config, storage, run_name="Retry #2")
    assert named.run_id.startswith("retry-2-")
    assert list_runs(storage) == sorted([old.run_id, new.run_id, named.run_id])
    # Re-planning the original inputs still finds the original run.
    manifest(m, n=10)
    assert plan_manifest(m, config(), storage) == (old, True)


def test_conflict_through_cli_exit_4(tmp_path, capsys):
    m = manifest(tmp_path / "m.parquet")
    out = str(tmp_path / "out")
    assert main(["plan", str(m), "--output", out, "--shard-size", "4", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["reused"] is False and first["shards"] == 3
    assert main(["plan", str(m), "--output", out, "--shard-size", "4", "--steps", "9"]) == EXIT_CONFLICT
    err = capsys.readouterr().err
    assert "generation.num_inference_steps: 64 -> 9" in err
    assert main(["plan", str(m), "--output", out, "--shard-size", "4", "--steps", "9", "--new-run"]) == 0
    assert "planned: run m-" in capsys.readouterr().out
    assert main(["plan", str(m), "--output", out, "--shard-size", "4"]) == 0
    assert f"reused the stored plan: run {first['run_id']}" in capsys.readouterr().out


class FailingStorage(LocalStorage):
    """A real LocalStorage whose Nth put of a shard file fails, as a crash or outage mid-plan would."""

    def __init__(self, root, fail_at: int):
        super().__init__(root)
        self.fail_at = fail_at
        self.puts = 0

    def put_bytes(self, key, data, **kwargs):
        if "/plan/shards/" in key:
            self.puts += 1
            if self.puts == self.fail_at:
                raise StorageError(f"injected failure writing {key}")
        return super().put_bytes(key, data, **kwargs)


def test_failure_mid_plan_leaves_no_plan_and_replan_completes(tmp_path):
    m = manifest(tmp_path / "m.parquet", n=40)
    root = tmp_path / "out"
    with pytest.raises(StorageError, match="injected"):
        make_plan(m, config(shard_size=2), FailingStorage(root, fail_at=7))
    storage = LocalStorage(root)
    assert list_runs(storage) == []
    assert not [k for k in (i.key for i in storage.list("")) if k.endswith("run.json")]
    plan, reused = plan_manifest(m, config(shard_size=2), storage)
    assert not reused and len(plan.shards) == 20
    reference = make_plan(m, config(shard_size=2), LocalStorage(tmp_path / "clean"))
    assert shard_bytes(root, plan) == shard_bytes(tmp_path / "clean", reference)


def test_manifest_changed_between_passes_is_refused(tmp_path):
    a = manifest(tmp_path / "a.parquet", n=5)
    b = manifest(tmp_path / "b.parquet", n=6)
    digest = validate_manifest(a, SMALL).digest
    with pytest.raises(ManifestError, match="changed while it was being planned"):
        list(iter_item_batches(b, SMALL, expected_digest=digest))


def test_manifest_gaining_a_null_id_between_passes_is_refused(tmp_path):
    # The second pass skips the row checks; a null id with a null seed once reached derive_seed(None) there.
    a = manifest(tmp_path / "a.parquet", n=3, id=["a", "b", "c"], seed=[1, None, 3])
    b = manifest(tmp_path / "b.parquet", n=3, id=["a", None, "c"], seed=[1, None, 3])
    digest = validate_manifest(a, SMALL).digest
    with pytest.raises(ManifestError, match="a null id after row 0: the file changed while it was being planned"):
        list(iter_item_batches(b, SMALL, expected_digest=digest))


def test_invalid_manifest_plans_nothing(tmp_path):
    m = manifest(tmp_path / "m.parquet", n=3, height=[64, 65, 64])
    storage = LocalStorage(tmp_path / "out")
    with pytest.raises(ManifestError, match="row 1, column 'height'"):
        make_plan(m, config(), storage)
    assert not (tmp_path / "out").exists()


def test_plan_on_s3(tmp_path, s3_uri, s3_client):
    m = manifest(tmp_path / "m.parquet", n=9)
    storage = open_storage(s3_uri)
    plan, reused = plan_manifest(m, config(shard_size=4), storage)
    assert not reused
    bucket, prefix = s3_uri[len("s3://") :].split("/", 1)
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == sorted(
        [f"{prefix}/{layout.plan_key(plan.run_id)}", f"{prefix}/{layout.run_registry_key(plan.name, plan.run_id)}"]
        + [f"{prefix}/{layout.shard_plan_key(plan.run_id, s)}" for s in plan.shards]
    )
    fresh = open_storage(s3_uri)
    assert plan_manifest(m, config(shard_size=4), fresh) == (plan, True)
    assert load_plan(fresh, plan.run_id) == plan
    assert [i.row for i in load_shard_items(fresh, plan.run_id, "shard-000002")] == [8]
    # Identical bytes to a local plan of the same inputs.
    local = make_plan(m, config(shard_size=4), LocalStorage(tmp_path / "local"))
    assert local.run_id == plan.run_id
    for shard in plan.shards:
        assert (
            fresh.get_bytes(layout.shard_plan_key(plan.run_id, shard))
            == (tmp_path / "local" / layout.shard_plan_key(plan.run_id, shard)).read_bytes()
        )


def test_plan_to_file_uri_via_cli(tmp_path, capsys):
    m = manifest(tmp_path / "m.parquet", n=3)
    out = tmp_path / "out dir"
    assert main(["plan", str(m), "--output", out.as_uri(), "--shard-size", "2", "--run-name", "demo"]) == 0
    printed = capsys.readouterr().out
    assert "planned: run demo-" in printed and "3 items in 2 shards of 2" in printed
    run_id = printed.split("run ")[1].split(",")[0]
    assert f"plan: {out.as_uri()}/{run_id}/plan/run.json" in printed
    stored = json.loads((out / run_id / "plan" / "run.json").read_text())
    assert stored["shard_count"] == 2 and stored["row_count"] == 3 and stored["config"]["worker"]["shard_size"] == 2


def test_load_plan_missing_run(tmp_path):
    with pytest.raises(NotFoundError, match="no run 'nope-123'"):
        load_plan(LocalStorage(tmp_path), "nope-123")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", list(range(10))),
        ("0:4", [0, 1, 2, 3]),
        (":2", [0, 1]),
        ("8:", [8, 9]),
        ("1,3,7", [1, 3, 7]),
        ("7, 3,3", [3, 7]),
        ("shard-000004,0:2", [0, 1, 4]),
    ],
)
def test_parse_shard_selection(text, expected, tmp_path):
    plan = make_plan(manifest(tmp_path / "m.parquet", n=10), config(shard_size=1), LocalStorage(tmp_path / "o"))
    assert parse_shard_selection(text, plan) == [layout.shard_id(i) for i in expected]


@pytest.mark.parametrize("text", ["10", "4:4", "5:2", "0:11", "-1", "x", "1,,2", "shard-000010", ""])
def test_parse_shard_selection_rejects(text, tmp_path):
    plan = make_plan(manifest(tmp_path / "m.parquet", n=10), config(shard_size=1), LocalStorage(tmp_path / "o"))
    with pytest.raises(InputError, match="has 10 shards"):
        parse_shard_selection(text, plan)


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("prompts", "prompts"),
        ("My Run #2!", "my-run-2"),
        ("__", "run"),
        ("a" * 60, "a" * 40),
        ("x-" * 30, "x-" * 19 + "x"),
    ],
)
def test_slugify(name, slug):
    assert slugify(name) == slug
