"""An item's content key: the sha256 of everything that decides its video's bytes, so equal keys mean the same
video and a committed one can be copied instead of generated again (``batchgen.dataset.reuse``).

In: the model family, the weights' fingerprint, every ``Item`` field but its id and manifest row (prompt, negative
prompt, seed, frames, size, steps, guidance) and the run-wide generation settings that are no item field (fps and crf
change the encoding, the token limit the text embedding). Out: the parallel degrees, offload and the retry settings,
which change how a video is made, never which. Both field lists are derived from ``Item`` and ``GenerationConfig``,
so a setting added there enters the key without a change here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from batchgen.core.config import GenerationConfig
from batchgen.core.item import Item

CONTENT_FORMAT = 1
ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(Item) if f.name not in ("id", "row"))
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig) if f.name not in ITEM_FIELDS)


def _run_part(generation: GenerationConfig, family: str, weights: str) -> dict[str, Any]:
    part = {name: getattr(generation, name) for name in RUN_FIELDS}
    return {"format": CONTENT_FORMAT, "family": family, "weights": weights or "", **part}


def _key(run_part: dict[str, Any], values: Iterable[tuple[str, Any]]) -> str:
    payload = {**run_part, **dict(values)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def content_key(item: Item | dict[str, Any], generation: GenerationConfig, family: str, weights: str) -> str:
    """The content key of one item (an ``Item`` or a dict with its fields); ``weights`` '' when unknown."""
    fields = item.to_dict() if isinstance(item, Item) else item
    return _key(_run_part(generation, family, weights), ((name, fields[name]) for name in ITEM_FIELDS))


def content_keys(
    batch: pa.RecordBatch | pa.Table, generation: GenerationConfig, family: str, weights: str
) -> list[str]:
    """The content keys of a batch of resolved items (``ITEM_SCHEMA`` columns), in row order."""
    run_part = _run_part(generation, family, weights)
    columns = [batch.column(name).to_pylist() for name in ITEM_FIELDS]
    return [_key(run_part, zip(ITEM_FIELDS, row, strict=True)) for row in zip(*columns, strict=True)]
