"""Wan's transformer block for ``--compile`` and ``--fp8`` (``ModelSpec.block_code``): diffusers'
``WanTransformerBlock.forward`` in three compiled regions around its two eager attention calls (attn1, the
sequence-parallel one, and attn2, cross-attention to the text), the FP8 gate's inputs and the stock processor.
"""

from __future__ import annotations

import torch

from batchgen.models.common.fp8 import GATE_SEED, GATE_TEXT_TOKENS, GATE_TOKENS


def _modulation(block, temb):
    if temb.ndim == 4:  # per-token modulation [B, N, 6, D] (Wan 2.2 TI2V)
        return [m.squeeze(2) for m in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    return list((block.scale_shift_table + temb.float()).chunk(6, dim=1))


def _pre_attention(block, hidden_states, temb):
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = _modulation(block, temb)
    norm_hidden = (block.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
    return norm_hidden, (gate_msa, c_shift_msa, c_scale_msa, c_gate_msa)


def _pre_cross_attention(block, hidden_states, attn_output, gate_msa):
    hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)
    return hidden_states, block.norm2(hidden_states.float()).type_as(hidden_states)


def _feed_forward(block, hidden_states, attn_output, c_shift_msa, c_scale_msa, c_gate_msa):
    hidden_states = hidden_states + attn_output
    norm_hidden = (block.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(hidden_states)
    ff_output = block.ffn(norm_hidden)
    return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


_compiled_pre = torch.compile(_pre_attention, dynamic=False)


_compiled_cross = torch.compile(_pre_cross_attention, dynamic=False)


_compiled_ff = torch.compile(_feed_forward, dynamic=False)


def compiled_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    norm_hidden, (gate_msa, *ff_mods) = _compiled_pre(self, hidden_states, temb)
    attn_output = self.attn1(norm_hidden, None, None, rotary_emb)
    hidden_states, norm_hidden = _compiled_cross(self, hidden_states, attn_output, gate_msa)
    attn_output = self.attn2(norm_hidden, encoder_hidden_states, None, None)
    return _compiled_ff(self, hidden_states, attn_output, *ff_mods)


def gate_inputs(block, device) -> dict:
    """A Wan block's inputs: visual tokens, embedded text (already at the model width) and the six modulation
    vectors. No RoPE: the gate is about the linears, and RoPE is not one."""
    generator = torch.Generator("cpu").manual_seed(GATE_SEED)
    width = block.attn1.to_q.in_features
    return {
        "hidden_states": torch.randn(1, GATE_TOKENS, width, generator=generator).to(device),
        "encoder_hidden_states": torch.randn(1, GATE_TEXT_TOKENS, width, generator=generator).to(device),
        "temb": torch.randn(1, 6, width, generator=generator).to(device),
        "rotary_emb": None,
    }


def stock_processor():
    """diffusers' own attention processor (the FP8 gate compares the block as diffusers runs it)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return WanAttnProcessor()


def visual_output(output):
    """A Wan block returns the visual stream alone."""
    return output
