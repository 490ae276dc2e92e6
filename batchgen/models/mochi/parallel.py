"""Mochi's attention under batchgen's parallelism (``MOCHI.parallel_plan.processors``): the joint-attention
processor of every block: native USP or xDiT's (``batchgen.models.mochi.attention``), or on one process the whole
CFG batch in one call (``batchgen.models.mochi.joint``)."""

from __future__ import annotations

from batchgen.models.mochi.attention import USPMochiAttnProcessor
from batchgen.models.mochi.joint import MochiJointAttnProcessor
from batchgen.parallel.choice import AttentionChooser


def mochi_processors(transformer, context, state, kernel: str) -> list:
    """Mochi's joint-attention processors for every block."""
    blocks = getattr(transformer, state.plan.blocks)
    backend = state.backend if state.sp.size > 1 else "native"
    if backend == "native":
        # One chooser for every block: the ranks of one forward (sp and cfg) decide together, once per shape.
        state.chooser = AttentionChooser(state.attention, kernel=kernel, axes=(state.sp, state.cfg), timer=state.timer)
    if state.sp.size == 1:
        return [MochiJointAttnProcessor(chooser=state.chooser) for _ in blocks]
    ulysses, ring = context.axes["ulysses"], context.axes["ring"]
    if backend == "native":
        return [
            USPMochiAttnProcessor(ulysses, ring, kernel=kernel, layout=state.layout, chooser=state.chooser)
            for _ in blocks
        ]
    if backend == "xfuser":
        # xDiT's attention takes no key mask: its CFG pair always runs per prompt (ParallelConfig refuses 'joint').
        from batchgen.models.mochi.attention import XFuserMochiAttnProcessor
        from batchgen.parallel.xfuser_backend import setup_xfuser_groups

        setup_xfuser_groups(ulysses, ring)
        return [XFuserMochiAttnProcessor(ulysses, ring) for _ in blocks]
    raise ValueError(f"unknown sequence-parallel backend {backend!r}; expected 'native' or 'xfuser'")
