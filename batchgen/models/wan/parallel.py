"""Wan's attention under batchgen's parallelism (``WAN.parallel_plan.processors``).

Each Wan block has a self-attention over the visual tokens (``attn1``, with RoPE, no text, no mask) and a
cross-attention from the visual tokens to the text (``attn2``). Under sequence parallelism a rank holds a
contiguous slice of the (padded) visual tokens and its RoPE rows (``batchgen.parallel.apply``), and:

- ``attn1`` gets ``USPWanSelfAttnProcessor``: q/k/v of the slice; ``norm_q``/``norm_k`` are RMSNorms across all
  heads (over the inner dim, before the head split), which is per token and so local; Wan's RoPE; Ulysses
  all-to-all (scatter heads, gather sequence); ring attention with the padded keys cut
  (``batchgen.parallel.usp.ring_attention``); the inverse all-to-all; ``to_out``.
- ``attn2`` keeps diffusers' ``WanAttnProcessor``: its queries are the local slice and its keys/values the whole
  text (and, for image-to-video, the image tokens), which every rank holds, so attention per query is already
  exact. Nothing is exchanged.

CFG parallelism needs nothing here: apply.py's hooks split the [uncond, cond] batch by the model's signature
(``hidden_states``, ``timestep``, ``encoder_hidden_states``, ...). Without sequence parallelism both attentions
keep the stock processor, which already runs the whole CFG batch in one call (no text, no mask in ``attn1``).

``--sp-backend xfuser`` is supported, as xDiT runs Wan with sequence parallelism (its
``xfuser/model_executor/models/transformers/transformer_wan.py`` keeps diffusers' projections, norms and RoPE and
hands q/k/v to its USP attention): here the self-attention's q/k/v go to ``xFuserLongContextAttention`` without
joint tensors, and xDiT does the all-to-all and the ring. It cannot pad, as for Mochi: ulysses x ring must divide
the token count.
"""

from __future__ import annotations

import torch

from batchgen.parallel.usp import Axis, SequenceLayout, ring_attention, ulysses_gather_heads, ulysses_scatter_heads


def wan_processors(transformer, context, state, kernel: str) -> list:
    """The self-attention processor of every block (``plan.attention`` is ``attn1``)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    blocks = getattr(transformer, state.plan.blocks)
    if state.sp.size == 1:
        return [WanAttnProcessor() for _ in blocks]
    ulysses, ring = context.axes["ulysses"], context.axes["ring"]
    if state.backend == "native":
        return [USPWanSelfAttnProcessor(ulysses, ring, kernel=kernel, layout=state.layout) for _ in blocks]
    if state.backend == "xfuser":
        from batchgen.parallel.xfuser_backend import long_context_attention, setup_xfuser_groups

        setup_xfuser_groups(ulysses, ring)
        return [XFuserWanSelfAttnProcessor(long_context_attention()) for _ in blocks]
    raise ValueError(f"unknown sequence-parallel backend {state.backend!r}; expected 'native' or 'xfuser'")


def apply_wan_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on [B, S, H, D] exactly as diffusers' ``WanAttnProcessor`` applies it (pairs (2i, 2i+1) rotate
    together, the rotation in the frequencies' dtype, the input dtype out)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def wan_self_qkv(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention q, k, v [B, S, H, D] of the local tokens: projections (fused or not), the across-heads
    RMSNorm on q and k, then RoPE."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (attn.norm_q(query), attn.norm_k(key), value))
    if rotary_emb is not None:
        query, key = apply_wan_rotary_emb(query, *rotary_emb), apply_wan_rotary_emb(key, *rotary_emb)
    return query, key, value


def _check_self_attention(encoder_hidden_states, attention_mask) -> None:
    if encoder_hidden_states is not None or attention_mask is not None:
        raise ValueError("the sequence-parallel Wan processor is for self-attention (attn1): no text, no mask")


def _project_out(attn, out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))


class USPWanSelfAttnProcessor:
    """Drop-in for diffusers' ``WanAttnProcessor`` on a Wan block's self-attention (same call signature) on a rank
    holding a slice of the visual tokens; ``rotary_emb`` is that slice's RoPE rows. The whole CFG batch shares
    every kernel call; nothing waits on the host."""

    def __init__(self, ulysses: Axis, ring: Axis, *, kernel: str = "auto", layout: SequenceLayout | None = None):
        self.ulysses = ulysses
        self.ring = ring
        self.kernel = kernel
        self.layout = layout

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        _check_self_attention(encoder_hidden_states, attention_mask)
        query, key, value = wan_self_qkv(attn, hidden_states, rotary_emb)
        qkv = ulysses_scatter_heads(torch.stack([query, key, value]), self.ulysses)  # [3, B, S_chunk, H/u, D]
        q, k, v = (t.transpose(1, 2) for t in qkv)  # [B, H/u, S_chunk, D]
        out = ring_attention(q, k, v, self.ring, layout=self.layout, kernel=self.kernel)
        out = ulysses_gather_heads(out.transpose(1, 2), self.ulysses)  # [B, S_local, H, D]
        return _project_out(attn, out, query)


class XFuserWanSelfAttnProcessor:
    """Wan's self-attention through xDiT's ``xFuserLongContextAttention`` ([B, S, H, D] in and out, no joint
    tensors), as xDiT's own Wan processor calls it."""

    def __init__(self, attention):
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        _check_self_attention(encoder_hidden_states, attention_mask)
        query, key, value = wan_self_qkv(attn, hidden_states, rotary_emb)
        return _project_out(attn, self.attention(None, query, key, value), query)
