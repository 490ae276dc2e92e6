"""Model families: one ``ModelSpec`` per family holds every fact the rest of batchgen needs (no torch here)."""

from batchgen.models.spec import (
    FAMILIES,
    MOCHI,
    WAN,
    ModelSpec,
    ParallelPlan,
    check_weights,
    detect_family,
    spec_for,
    uses_cfg,
)

__all__ = [
    "FAMILIES",
    "MOCHI",
    "WAN",
    "ModelSpec",
    "ParallelPlan",
    "check_weights",
    "detect_family",
    "spec_for",
    "uses_cfg",
]
