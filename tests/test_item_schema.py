"""What an item is, declared once (``Item``): the shard files' Arrow schema, the manifest columns batchgen reads
and the item part of every sidecar follow it."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from batchgen.core.item import ITEM_SCHEMA, MANIFEST_COLUMNS, Item
from batchgen.core.records import Sidecar, _carries_the_item, index_schema


def test_schema_and_columns_follow_the_item():
    names = [f.name for f in dataclasses.fields(Item)]
    assert ITEM_SCHEMA.names == names and list(MANIFEST_COLUMNS) == [n for n in names if n != "row"]
    assert ITEM_SCHEMA.field("guidance_scale").type == pa.float64() and ITEM_SCHEMA.field("seed").type == pa.int64()
    item = Item("a", "p", "", 1, 7, 32, 32, 2, 4.5, 0)
    assert pa.Table.from_pylist([item.to_dict()], ITEM_SCHEMA).to_pylist() == [item.to_dict()]


def test_sidecar_and_index_carry_every_item_field():
    item_fields = {f.name for f in dataclasses.fields(Item)}
    assert item_fields <= {f.name for f in dataclasses.fields(Sidecar)}
    assert item_fields <= set(index_schema().names)


def test_a_record_without_an_item_field_is_refused_at_definition():
    with pytest.raises(TypeError, match=r"must carry Item's fields \['seed'\]"):

        @_carries_the_item
        @dataclasses.dataclass
        class Partial:
            id: str
            prompt: str
            negative_prompt: str
            num_frames: int
            height: int
            width: int
            num_inference_steps: int
            guidance_scale: float
            row: int
