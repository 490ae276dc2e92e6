"""Mochi's attention processors for sequence-parallel ranks: ``USPMochiAttnProcessor`` (the native Ulysses x Ring
path of ``batchgen.parallel.usp``) and ``XFuserMochiAttnProcessor`` (xDiT's, ``--sp-backend xfuser``), with the
projections and RoPE they share with the single-process processor (``batchgen.models.mochi.joint``).

xDiT's attention takes no mask, so ``XFuserMochiAttnProcessor`` gives it one sample at a time with that sample's
valid text tokens as the joint tensors at the rear (``joint_strategy="rear"``), as mochi-xdit runs Mochi.
"""

from __future__ import annotations

import torch

from batchgen.parallel.choice import AttentionChooser
from batchgen.parallel.usp import (
    Axis,
    JointText,
    SequenceLayout,
    all_gather_cat,
    ring_joint_attention,
    ulysses_gather_heads,
    ulysses_scatter_heads,
)
from batchgen.parallel.xfuser_backend import long_context_attention, valid_text_indices


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Mochi's interleaved RoPE, as diffusers' MochiAttnProcessor2_0 applies it (fp32 rotation, input dtype out)."""
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def project_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Mochi's per-stream projections, q/k RMSNorm and RoPE (visual only): tensors [B, S, H, D]."""
    query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
    key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
    value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
    query, key = attn.norm_q(query), attn.norm_k(key)
    enc_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)))
    enc_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)))
    enc_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, *image_rotary_emb)
        key = apply_rotary_emb(key, *image_rotary_emb)
    return query, key, value, enc_query, enc_key, enc_value


def project_out(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor):
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if hasattr(attn, "to_add_out"):  # the last block keeps no text stream (context_pre_only)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


class USPMochiAttnProcessor:
    """Drop-in for diffusers' ``MochiAttnProcessor2_0`` on a rank that holds a slice of the visual tokens.

    Same call signature; ``hidden_states`` and ``image_rotary_emb`` are this rank's slice (of the padded sequence
    described by ``layout``), the text stream is the full replicated one with its mask ([B, L], valid tokens
    anywhere; ``batchgen.models.mochi.joint.gather_valid_text`` puts them first). Returns (this slice's visual
    output, the full text output with padded text rows 0). The whole CFG batch goes through each kernel call
    together; nothing here waits on the host (no ``nonzero``, no ``.item()``).
    """

    def __init__(
        self,
        ulysses: Axis,
        ring: Axis,
        *,
        kernel: str = "auto",
        layout: SequenceLayout | None = None,
        chooser: AttentionChooser | None = None,
    ):
        self.ulysses = ulysses
        self.ring = ring
        self.kernel = kernel
        self.layout = layout
        self.chooser = chooser or AttentionChooser(kernel=kernel)

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        query, key, value, enc_query, enc_key, enc_value = project_qkv(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb
        )
        heads, u = attn.heads, self.ulysses.size
        if heads % u:
            raise ValueError(f"ulysses degree {u} does not divide {heads} heads")
        local_heads = heads // u
        head_slice = slice(self.ulysses.rank * local_heads, (self.ulysses.rank + 1) * local_heads)

        qkv = ulysses_scatter_heads(torch.stack([query, key, value]), self.ulysses)  # [3, B, S_chunk, H/u, D]
        q, k, v = (t.transpose(1, 2) for t in qkv)  # [B, H/u, S_chunk, D]
        text_q, text_k, text_v = (t[:, :, head_slice].transpose(1, 2) for t in (enc_query, enc_key, enc_value))
        text = JointText(text_q, text_k, text_v, mask=attention_mask.bool())
        vis_out, text_out = ring_joint_attention(
            q, k, v, text, self.ring, layout=self.layout, kernel=self.kernel, chooser=self.chooser
        )

        vis_out = ulysses_gather_heads(vis_out.transpose(1, 2), self.ulysses)  # [B, S_local, H, D]
        text_full = all_gather_cat(text_out.transpose(1, 2), self.ulysses, dim=2, kind="text_gather")  # [B, L, H, D]
        return project_out(attn, vis_out.flatten(2, 3), text_full.flatten(2, 3))


class XFuserMochiAttnProcessor:
    """Drop-in for diffusers' ``MochiAttnProcessor2_0`` on a rank holding a slice of the visual tokens."""

    def __init__(self, ulysses: Axis, ring: Axis):
        self.attention = long_context_attention()
        self.ulysses = ulysses
        self.ring = ring

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        query, key, value, enc_query, enc_key, enc_value = project_qkv(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb
        )
        batch, local_tokens = query.shape[:2]
        visual_out, text_out = [], torch.zeros_like(enc_query)
        for b in range(batch):
            idx = valid_text_indices(attention_mask, b)
            rows = slice(b, b + 1)
            joint = {}
            if idx.numel():
                joint = {
                    "joint_tensor_query": enc_query[rows, idx],
                    "joint_tensor_key": enc_key[rows, idx],
                    "joint_tensor_value": enc_value[rows, idx],
                    "joint_strategy": "rear",
                }
            out = self.attention(None, query[rows], key[rows], value[rows], **joint)  # [1, S_local + L_valid, H, D]
            visual_out.append(out[:, :local_tokens])
            text_out[b, idx] = out[0, local_tokens:]
        return project_out(attn, torch.cat(visual_out).flatten(2, 3), text_out.flatten(2, 3))
