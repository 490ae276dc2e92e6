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

import pyarrow as pa
import pyarrow.compute as pc

from batchgen.core.config import GenerationConfig
from batchgen.core.item import ITEM_SCHEMA, Item

CONTENT_FORMAT = 1
ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(Item) if f.name not in ("id", "row"))
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig) if f.name not in ITEM_FIELDS)


def _run_part(generation: GenerationConfig, family: str, weights: str) -> bytes:
    part = {name: getattr(generation, name) for name in RUN_FIELDS}
    text = json.dumps({"format": CONTENT_FORMAT, "family": family, "weights": weights or "", **part}, sort_keys=True)
    return text.encode() + b"\n"


def _encoded(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as unambiguous text: strings length-prefixed ('5:a cat'), numbers as Arrow prints them."""
    text = pc.cast(column, pa.string())
    if not pa.types.is_string(column.type):
        return text
    return pc.binary_join_element_wise(pc.cast(pc.utf8_length(text), pa.string()), text, ":")


def content_keys(
    batch: pa.RecordBatch | pa.Table, generation: GenerationConfig, family: str, weights: str
) -> list[str]:
    """The content keys of a batch of resolved items (``ITEM_SCHEMA`` columns), in row order: the item fields are
    joined by Arrow (vectorised), so only the hashing is per row."""
    prefix = hashlib.sha256(_run_part(generation, family, weights))
    rows = pc.binary_join_element_wise(*(_encoded(batch.column(name)) for name in ITEM_FIELDS), "|")
    keys = []
    for row in pc.cast(rows, pa.binary()).to_pylist():
        digest = prefix.copy()
        digest.update(row)
        keys.append(digest.hexdigest())
    return keys


def content_key(item: Item, generation: GenerationConfig, family: str, weights: str) -> str:
    """The content key of one item; ``weights`` '' when unknown. Computed as a batch of one, so it always equals
    what ``content_keys`` gives for the same item."""
    return content_keys(pa.Table.from_pylist([item.to_dict()], ITEM_SCHEMA), generation, family, weights)[0]
