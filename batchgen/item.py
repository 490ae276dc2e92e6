"""One unit of work: a manifest row with every generation parameter resolved."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
