"""The consumer's view of a run: open it by URI, read its index as a pyarrow table, select and iterate its videos
with their metadata. ``batchgen export`` and ``batchgen gallery`` are built on it. No torch.

    run = open_run("s3://videos/runs/june-0123456789ab")
    table = run.index()                                   # one row per committed video
    for video in run.videos(run.select(unflagged=True, fraction=0.1, seed=7)):
        data = video.read()                               # the MP4's bytes, sha256 checked
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchgen.core import layout
from batchgen.core.errors import InputError, NotFoundError, StorageError
from batchgen.core.plan import RunPlan, locate_run
from batchgen.dataset.follow import Follower, follow
from batchgen.storage.base import Storage

READ_THREADS = 8  # video gets are latency-bound; a few in flight keep a consumer busy


def open_run(uri: str, run_id: str | None = None) -> Run:
    """A run from its own folder (``<output>/<run-id>``) or from the output root (``run_id``, or the only run);
    see ``plan.locate_run``."""
    return Run(*locate_run(uri, run_id))


@dataclass(frozen=True)
class Video:
    """One committed video: its index row (every sidecar field, flattened) and a way to read it."""

    metadata: dict[str, Any]
    storage: Storage

    @property
    def id(self) -> str:
        return self.metadata["id"]

    @property
    def prompt(self) -> str:
        return self.metadata["prompt"]

    @property
    def uri(self) -> str:
        return self.storage.url(self.metadata["key"])

    @property
    def flags(self) -> list[str]:
        return list(self.metadata.get("quality_flags") or [])

    def read(self) -> bytes:
        """The MP4's bytes; StorageError if they no longer match the sha256 recorded at commit."""
        data = self.storage.get_bytes(self.metadata["key"])
        if hashlib.sha256(data).hexdigest() != self.metadata["sha256"]:
            raise StorageError(f"{self.uri}: content does not match the sha256 in the run's index")
        return data


class Run:
    def __init__(self, storage: Storage, plan: RunPlan):
        self.storage = storage
        self.plan = plan
        self.run_id = plan.run_id

    def __repr__(self) -> str:
        return f"Run({self.storage.url(layout.run_prefix(self.run_id))!r})"

    def index(self) -> pa.Table:
        """``index/index.parquet`` as a table (built by ``batchgen index``, ``run`` or ``submit``)."""
        key = layout.index_key(self.run_id)
        try:
            data = self.storage.get_bytes(key)
        except NotFoundError:
            raise NotFoundError(
                f"{self.storage.url(key)} does not exist yet: build it with "
                f"`batchgen index {self.storage.uri} --run-id {self.run_id}`"
            ) from None
        return pq.read_table(io.BytesIO(data))

    def select(
        self, *, unflagged: bool = False, fraction: float = 1.0, seed: int = 0, table: pa.Table | None = None
    ) -> pa.Table:
        """Rows of the index: without quality flags (``unflagged``) and/or a ``fraction`` sampled by ``seed``.

        The sample is per item (a hash of seed and id), so it does not depend on row order and a smaller
        fraction with the same seed is a subset of a larger one.
        """
        if not 0 < fraction <= 1:
            raise InputError(f"fraction must be in (0, 1], got {fraction}")
        table = self.index() if table is None else table
        if unflagged and "quality_flags" in table.column_names:
            flags = table.column("quality_flags")
            table = table.filter(pc.or_kleene(pc.is_null(flags), pc.equal(pc.list_value_length(flags), 0)))
        if fraction < 1:
            keep = [sample_position(seed, item_id) < fraction for item_id in table.column("id").to_pylist()]
            table = table.filter(pa.array(keep, type=pa.bool_()))
        return table

    def videos(self, table: pa.Table | None = None) -> Iterator[Video]:
        """The videos of ``table`` (default: the whole index) in its order."""
        for row in (self.index() if table is None else table).to_pylist():
            yield Video(row, self.storage)

    def follow(self, poll: float = 30, start_after: str | None = None, *, once: bool = False) -> Follower:
        """The run's committed items as they appear, each once, in commit order, until it is complete (``once``:
        those committed now); resume with the ``cursor`` of the last item handled (``batchgen.dataset.follow``)."""
        return follow(self.storage, self.plan, poll=poll, start_after=start_after, once=once)

    def read_videos(self, table: pa.Table | None = None, threads: int = READ_THREADS) -> Iterator[tuple[Video, bytes]]:
        """``(video, bytes)`` in order, with up to ``threads`` reads in flight (memory: that many videos)."""
        with ThreadPoolExecutor(threads, thread_name_prefix="dataset-read") as pool:
            pending = []
            for video in self.videos(table):
                pending.append((video, pool.submit(video.read)))
                if len(pending) >= threads:
                    done, future = pending.pop(0)
                    yield done, future.result()
            for video, future in pending:
                yield video, future.result()


def sample_position(seed: int, item_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, id)."""
    digest = hashlib.blake2b(f"{seed}:{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
