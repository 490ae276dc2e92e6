"""Helpers shared by the worker, end-to-end, crash and concurrency tests: small manifests, plans, CLI
subprocesses and the invariants every finished run must satisfy."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.core import layout
from batchgen.core.config import RunConfig
from batchgen.core.plan import RunPlan, load_shard_items, make_plan
from batchgen.core.video import probe_mp4
from batchgen.storage.base import Storage

PROMPTS = [
    "a red fox running through fresh snow",
    "waves breaking on a rocky shore at dusk",
    "a paper boat drifting down a rain gutter",
    "time-lapse of clouds over a mountain ridge",
    "a hummingbird hovering near a pink flower",
    "city traffic at night seen from above",
    "a candle flame flickering in a dark room",
    "autumn leaves falling in a quiet park",
]


def write_manifest(path: Path, count: int, *, id_prefix: str = "item") -> Path:
    ids = [f"{id_prefix}-{i}" for i in range(count)]
    prompts = [PROMPTS[i % len(PROMPTS)] + (f" #{i}" if i >= len(PROMPTS) else "") for i in range(count)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path)
    return path


# Smallest shape the tiny model takes (2 latent frames of 2x2 patches, 8 visual tokens: Ulysses 2 still fits):
# tests of the worker's bookkeeping spend their time on bookkeeping, not on the VAE.
SMALL_SHAPE = {"num_frames": 7, "height": 32, "width": 32}


def tiny_run_config(tiny_config: RunConfig, *, shard_size: int, max_attempts: int = 3, small: bool = True) -> RunConfig:
    overrides = {"worker": {"shard_size": shard_size, "max_attempts": max_attempts}}
    if small:
        overrides["generation"] = dict(SMALL_SHAPE)
    return tiny_config.with_overrides(overrides)


def plan_run(storage: Storage, folder: Path, count: int, config: RunConfig, *, name: str = "t") -> RunPlan:
    manifest = write_manifest(folder / f"{name}.parquet", count)
    return make_plan(manifest, config, storage)


def all_items(storage: Storage, plan: RunPlan) -> dict[str, tuple[str, object]]:
    """item id -> (shard, Item)."""
    return {i.id: (s, i) for s in plan.shards for i in load_shard_items(storage, plan.run_id, s)}


def keys_under(storage: Storage, prefix: str) -> list[str]:
    return [info.key for info in storage.list(prefix)]


def assert_exactly_once(storage: Storage, plan: RunPlan, *, expect_done: set[str] | None = None) -> dict[str, dict]:
    """Every (expected) item has exactly one video and one sidecar, the sidecar's sha256 and size match the
    stored video, the video decodes with the item's frame count, and no video lacks a sidecar (no orphan).
    Returns the sidecars by item id."""
    items = all_items(storage, plan)
    expected = set(items) if expect_done is None else expect_done
    sidecars: dict[str, dict] = {}
    for shard in plan.shards:
        metas = keys_under(storage, layout.sidecars_prefix(plan.run_id, shard))
        videos = keys_under(storage, layout.videos_prefix(plan.run_id, shard))
        meta_ids = [layout.item_id_from_key(k) for k in metas]
        video_ids = [layout.item_id_from_key(k) for k in videos]
        assert sorted(meta_ids) == sorted(video_ids), f"{shard}: orphan or missing video: {meta_ids} vs {video_ids}"
        for key in metas:
            sidecar = json.loads(storage.get_bytes(key))
            item_id = sidecar["id"]
            assert item_id not in sidecars, f"{item_id} committed twice"
            shard_of, item = items[item_id]
            assert shard_of == shard
            video = storage.get_bytes(sidecar["video_key"])
            assert sidecar["sha256"] == hashlib.sha256(video).hexdigest(), f"{item_id}: sha256 mismatch"
            assert sidecar["size_bytes"] == len(video)
            info = probe_mp4(video)
            assert info.frames == item.num_frames == sidecar["frames"]
            assert (info.height, info.width) == (item.height, item.width)
            sidecars[item_id] = sidecar
    assert set(sidecars) == expected, f"committed {sorted(sidecars)}, expected {sorted(expected)}"
    return sidecars


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m batchgen ARGS`` in a subprocess (a real process: kill -9 and signals behave as in production)."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return subprocess.run(
        [sys.executable, "-m", "batchgen", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def tiny_run_args(tiny_model_dir: Path, *, steps: int = 2) -> list[str]:
    from batchgen.models.common.tiny import TINY_TOML_NAME

    return ["--model-dir", str(tiny_model_dir), "--config", str(tiny_model_dir / TINY_TOML_NAME), "--steps", str(steps)]
