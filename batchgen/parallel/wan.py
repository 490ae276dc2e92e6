"""Wan's attention under batchgen's parallelism (``WAN.parallel_plan.processors``).

Single process: diffusers' own ``WanAttnProcessor`` (Wan's self-attention has no text and no mask, so the stock
processor already runs the whole CFG batch in one call). Sequence parallelism: not yet wired (the USP processor for
Wan's self-attention lands with the Wan USP work); until then a topology that splits the sequence is refused.
"""

from __future__ import annotations

from batchgen.errors import TopologyError


def wan_processors(transformer, context, state, kernel: str) -> list:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    blocks = getattr(transformer, state.plan.blocks)
    if state.sp.size == 1:
        return [WanAttnProcessor() for _ in blocks]
    raise TopologyError("sequence parallelism for Wan is not available yet; use ulysses 1 and ring 1")
