"""Datasets that grow: content keys, reuse of committed videos across runs under one output, duplicate rows.

The growing run (issue 21) is a whole-CLI test: a 4-row manifest, then the same rows shuffled plus 2 new ones plus
one old prompt with another seed, into the same output: exactly 3 are generated, the new run's index has all 7 with
the sha256s of the videos, and the first run is byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.core import layout
from batchgen.core.config import GenerationConfig
from batchgen.core.content import content_key
from batchgen.core.item import Item
from batchgen.core.plan import load_plan, load_shard_items, make_plan
from batchgen.dataset.index import finalize_run
from batchgen.models.api import GeneratedVideo
from batchgen.storage import open_storage
from batchgen.worker.context import SingleProcess
from batchgen.worker.loop import run_worker
from tests._runs import assert_exactly_once, keys_under, run_cli, tiny_run_args, tiny_run_config
from tests.test_e2e import run_id_of

FIRST = [("fox", "a red fox running through fresh snow", 1), ("waves", "waves breaking on a rocky shore", 2),
         ("boat", "a paper boat drifting down a rain gutter", 3), ("clouds", "clouds over a mountain ridge", 4)]  # fmt: skip
GROWN = [FIRST[2], FIRST[0], ("bird", "a hummingbird near a pink flower", 5), FIRST[3], FIRST[1],
         ("city", "city traffic at night from above", 6), ("fox-2", FIRST[0][1], 99)]  # fmt: skip


def write_rows(path, rows) -> str:
    ids, prompts, seeds = zip(*rows, strict=True)
    pq.write_table(pa.table({"id": list(ids), "prompt": list(prompts), "seed": list(seeds)}), path)
    return str(path)


def test_content_key_covers_what_changes_the_video_and_nothing_else():
    item = Item("a", "a cat", "", 7, 13, 32, 32, 2, 4.5, 0)
    generation = GenerationConfig()
    key = content_key(item, generation, "mochi", "ab" * 16)
    assert key == content_key(Item("b", "a cat", "", 7, 13, 32, 32, 2, 4.5, 5), generation, "mochi", "ab" * 16)
    for other in (
        content_key(Item("a", "a dog", "", 7, 13, 32, 32, 2, 4.5, 0), generation, "mochi", "ab" * 16),
        content_key(Item("a", "a cat", "", 8, 13, 32, 32, 2, 4.5, 0), generation, "mochi", "ab" * 16),
        content_key(Item("a", "a cat", "blur", 7, 13, 32, 32, 2, 4.5, 0), generation, "mochi", "ab" * 16),
        content_key(Item("a", "a cat", "", 7, 13, 32, 32, 3, 4.5, 0), generation, "mochi", "ab" * 16),
        content_key(item, GenerationConfig(crf=20), "mochi", "ab" * 16),
        content_key(item, GenerationConfig(fps=24), "mochi", "ab" * 16),
        content_key(item, generation, "wan", "ab" * 16),
        content_key(item, generation, "mochi", "cd" * 16),
        content_key(item, generation, "mochi", ""),
    ):
        assert other != key


def _sidecars(storage, run_id: str) -> dict[str, dict]:
    return {
        layout.item_id_from_key(k): json.loads(storage.get_bytes(k)) for k in keys_under(storage, f"{run_id}/meta/")
    }


def _snapshot(storage, run_id: str) -> dict[str, bytes]:
    return {k: storage.get_bytes(k) for k in keys_under(storage, layout.run_prefix(run_id))}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["folder", "s3"])
def test_growing_run_generates_only_what_is_new(backend, request, tmp_path, tiny_model_dir):
    uri = request.getfixturevalue("s3_uri") if backend == "s3" else str(tmp_path / "out")
    common = ["--output", uri, *tiny_run_args(tiny_model_dir), "--shard-size", "3"]
    first = run_cli("run", write_rows(tmp_path / "prompts.parquet", FIRST), *common)
    assert first.returncode == 0, first.stderr
    first_id = run_id_of(first.stdout)
    storage = open_storage(uri)
    before = _snapshot(storage, first_id)

    grown = write_rows(tmp_path / "prompts-v2.parquet", GROWN)
    planned = run_cli("plan", grown, *common, "--json")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["estimate"]["items"] == 3  # only what is left to generate is costed
    second = run_cli("run", grown, *common)
    assert second.returncode == 0, second.stderr
    assert "7 done (3 generated now, 4 reused, 0 resumed)" in second.stdout, second.stdout
    second_id = run_id_of(second.stdout)
    plan = load_plan(storage, second_id)
    assert (plan.reuse.copies, plan.reuse.duplicates) == (4, 0)

    sidecars = assert_exactly_once(storage, plan)
    copied = {i for i, s in sidecars.items() if "reused_from" in s}
    assert copied == {"fox", "waves", "boat", "clouds"}
    for item_id in copied:
        assert sidecars[item_id]["reused_from"] == {
            "run_id": first_id,
            "key": layout.video_key(first_id, sidecars[item_id]["reused_from"]["key"].split("/")[2], item_id),
        }
    index = pq.read_table(pa.BufferReader(storage.get_bytes(layout.index_key(second_id)))).to_pylist()
    assert sorted(r["id"] for r in index) == sorted(r[0] for r in GROWN)
    for row in index:
        assert (
            row["sha256"] == hashlib.sha256(storage.get_bytes(row["key"])).hexdigest() == sidecars[row["id"]]["sha256"]
        )
        assert row["content_key"] == sidecars[row["id"]]["content_key"]
        assert (row["reused_from_run_id"] is not None) == (row["id"] in copied)
    first_index = {
        r["id"]: r["sha256"]
        for r in pq.read_table(pa.BufferReader(storage.get_bytes(layout.index_key(first_id)))).to_pylist()
    }
    assert {i: sidecars[i]["sha256"] for i in copied} == first_index
    assert sidecars["fox-2"]["sha256"] != first_index["fox"]  # another seed: generated
    assert _snapshot(storage, first_id) == before  # the first run is untouched

    verify = run_cli("verify", uri, "--run-id", second_id, "--deep")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    status = run_cli("status", uri, "--run-id", second_id)
    assert status.returncode == 0 and "4 reused" in status.stdout, status.stdout


@pytest.mark.slow
def test_duplicate_rows_are_generated_once_and_validate_names_them(tmp_path, tiny_model_dir):
    rows = [("a", "a red fox in snow", 1), ("b", "waves on a shore", 2), ("a-again", "a red fox in snow", 1),
            ("c", "a paper boat", 3), ("a-third", "a red fox in snow", 1)]  # fmt: skip
    manifest = write_rows(tmp_path / "dupes.parquet", rows)
    validate = run_cli("validate", manifest, "--json")
    assert validate.returncode == 0, validate.stderr
    assert json.loads(validate.stdout)["warnings"] == [
        "row(s) 2, 4 have the same content as row 0 (prompt, seed and settings): generated once, copied for the others"
    ]
    out = str(tmp_path / "out")
    result = run_cli("run", manifest, "--output", out, *tiny_run_args(tiny_model_dir), "--shard-size", "2")
    assert result.returncode == 0, result.stderr
    assert "5 done (3 generated now, 2 reused, 0 resumed)" in result.stdout, result.stdout
    storage = open_storage(out)
    plan = load_plan(storage, run_id_of(result.stdout))
    assert (plan.reuse.copies, plan.reuse.duplicates) == (0, 2)
    sidecars = assert_exactly_once(storage, plan)
    for copy in ("a-again", "a-third"):
        assert sidecars[copy]["reused_from"] == {"run_id": plan.run_id, "key": sidecars["a"]["video_key"]}
        assert sidecars[copy]["sha256"] == sidecars["a"]["sha256"]


class RandomFrames:
    """A stand-in generator with known weights: noise frames (the quality gate passes them), counting its calls."""

    def __init__(self, fingerprint: str):
        self.model_identity = {"path": f"/models/{fingerprint}", "fingerprint": fingerprint}
        self.generated: list[str] = []

    def prepare(self, items):
        pass

    def generate(self, item):
        self.generated.append(item.id)
        rng = np.random.default_rng(item.seed)
        return GeneratedVideo(rng.integers(0, 255, (item.num_frames, item.height, item.width, 3), dtype=np.uint8))

    def close(self):
        pass


def test_a_copy_interrupted_before_its_sidecar_is_committed_once_by_the_next_scan(storage, tmp_path, tiny_config):
    weights = "ab" * 16
    config = tiny_run_config(tiny_config, shard_size=2).with_overrides({"model": {"weights": weights}})
    first = make_plan(write_rows(tmp_path / "first.parquet", FIRST), config, storage)
    assert run_worker(storage, first, first.shards, RandomFrames(weights), SingleProcess()).exit_code == 0
    assert finalize_run(storage, first)
    before = _snapshot(storage, first.run_id)

    grown = make_plan(write_rows(tmp_path / "grown.parquet", GROWN), config, storage)
    assert (grown.reuse.copies, grown.reuse.duplicates) == (4, 0)
    # A worker died between the copy and its sidecar: the copy is an orphan video of the new run.
    by_id = {i.id: (s, i) for s in grown.shards for i in load_shard_items(storage, grown.run_id, s)}
    first_items = {i.id: s for s in first.shards for i in load_shard_items(storage, first.run_id, s)}
    storage.copy(
        layout.video_key(first.run_id, first_items["boat"], "boat"),
        layout.video_key(grown.run_id, by_id["boat"][0], "boat"),
    )

    generator = RandomFrames(weights)
    summary = run_worker(storage, grown, grown.shards, generator, SingleProcess())
    assert (summary.exit_code, summary.reused, summary.adopted) == (0, 4, 0)
    assert sorted(generator.generated) == ["bird", "city", "fox-2"]
    sidecars = assert_exactly_once(storage, grown)
    assert sidecars["boat"]["reused_from"] == {
        "run_id": first.run_id,
        "key": layout.video_key(first.run_id, first_items["boat"], "boat"),
    }
    assert _snapshot(storage, first.run_id) == before
    # A second pass finds everything committed: nothing is copied or generated again.
    again = RandomFrames(weights)
    assert run_worker(storage, grown, grown.shards, again, SingleProcess()).reused == 0 and again.generated == []
