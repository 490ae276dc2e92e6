"""A small finished run for the consumer-side tests (dataset API, export, gallery): the real tiny Mochi through
the real worker, one item's frames replaced by black so the quality flags have something to find, ids with a
dot (WebDataset splits member names at the first one), and the index built."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.core.config import RunConfig
from batchgen.core.plan import RunPlan, make_plan
from batchgen.dataset.index import finalize_run
from batchgen.storage.base import Storage
from batchgen.worker.context import SingleProcess
from batchgen.worker.loop import run_worker
from tests._runs import PROMPTS, tiny_run_config

RUN_ITEMS = 5
BLACK_ITEM = "clip.3"


class BlackFrames:
    """The real generator; ``BLACK_ITEM`` comes out all black (a diverged-looking sample)."""

    def __init__(self, real):
        self.real = real
        self.model_identity = real.model_identity

    def prepare(self, items):
        self.real.prepare(items)

    def generate(self, item):
        video = self.real.generate(item)
        if item.id == BLACK_ITEM:
            video.frames = np.zeros_like(video.frames)
        return video

    def close(self):
        pass


def finished_run(storage: Storage, folder: Path, tiny_config: RunConfig, model_dir: Path) -> RunPlan:
    from batchgen.models.mochi.generator import MochiGenerator

    manifest = folder / "clips.parquet"
    ids = [f"clip.{i}" for i in range(RUN_ITEMS)]
    pq.write_table(pa.table({"id": ids, "prompt": PROMPTS[:RUN_ITEMS], "seed": list(range(RUN_ITEMS))}), manifest)
    plan = make_plan(manifest, tiny_run_config(tiny_config, shard_size=2), storage)
    generator = MochiGenerator(model_dir, device="cpu")
    try:
        assert run_worker(storage, plan, plan.shards, BlackFrames(generator), SingleProcess()).exit_code == 0
    finally:
        generator.close()
    assert finalize_run(storage, plan)
    return plan
