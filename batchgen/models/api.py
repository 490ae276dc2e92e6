"""What the worker loop needs from a generator. No torch import here: the worker and its tests run a
stand-in generator without loading torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from batchgen.core.item import Item


@dataclass
class GeneratedVideo:
    frames: np.ndarray
    """uint8 array [frames, height, width, 3] (RGB)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: 'text_encode' (this item's share), 'denoise', 'decode'."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts recorded in the sidecar (e.g. parallel degrees)."""


class VideoGenerator(Protocol):
    model_identity: dict[str, Any]
    """{'path': ..., 'fingerprint': ...} recorded in every sidecar."""

    def prepare(self, items: Sequence[Item]) -> None:
        """Called once per shard with the items this process group will generate (T5 runs here, once)."""

    def generate(self, item: Item) -> GeneratedVideo | None:
        """Render one item. Collective across a parallel group: every rank of the group calls it with the
        same item; the group's writer rank gets the video, the others get None."""

    def close(self) -> None:
        """Release the model and the GPU."""
