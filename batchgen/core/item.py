"""One unit of work: a manifest row with every generation parameter resolved.

``Item`` is the one declaration of an item's fields: the Arrow schema of shard files (``ITEM_SCHEMA``), the
manifest columns a row may set (``MANIFEST_COLUMNS``) and the item part of a sidecar are derived from it.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields
from typing import Any

import pyarrow as pa

ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
"""How batchgen stores each Python field type in Arrow (shard files, the index)."""


@dataclass(frozen=True)
class Item:
    id: str
    """Stable id; safe as an object key ([A-Za-z0-9._-], at most 128 characters)."""
    prompt: str
    negative_prompt: str
    seed: int
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    row: int
    """0-based row number in the manifest, for error messages and ordering."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Item:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def arrow_schema(klass: type) -> pa.Schema:
    """The Arrow schema of a dataclass whose fields are str, int, float or bool, in field order."""
    hints = typing.get_type_hints(klass)
    return pa.schema([(f.name, ARROW_TYPES[hints[f.name]]) for f in fields(klass)])


ITEM_SCHEMA = arrow_schema(Item)
"""Shard files and ``iter_items`` use exactly this schema, whatever the manifest's input types were."""
MANIFEST_COLUMNS = tuple(f.name for f in fields(Item) if f.name != "row")
"""The manifest columns batchgen reads (every item field but ``row``, which is the row's position)."""

EXAMPLES_PER_SHAPE = 3


@dataclass(frozen=True)
class ShapeGroup:
    """How many items of a run share one video shape, with the first few ids as examples.

    The plan stores these so that parallel degrees can be checked against every item (the visual token count
    must divide by ulysses x ring) wherever the plan is at hand, without reading the manifest or the shards again.
    """

    num_frames: int
    height: int
    width: int
    items: int
    examples: tuple[str, ...]
    forwards: int = 0
    """Denoising forwards of these items (steps, x 2 with guidance, row by row) for cost estimates; 0 when not
    counted (plans stored by an older batchgen)."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeGroup:
        return cls(
            num_frames=int(data["num_frames"]),
            height=int(data["height"]),
            width=int(data["width"]),
            items=int(data["items"]),
            examples=tuple(str(e) for e in data["examples"]),
            forwards=int(data.get("forwards", 0)),
        )
