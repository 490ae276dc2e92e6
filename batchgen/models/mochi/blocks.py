"""Mochi's transformer block for ``--compile`` and ``--fp8`` (``ModelSpec.block_code``): the block's elementwise
regions compiled around the eager attention call, the FP8 gate's inputs and the stock attention processor.

A diffusers ``MochiTransformerBlock`` runs: norm1 / norm1_context (fp32 RMSNorm + modulation) -> ``attn1`` (the
attention processor: all-to-all, ring send/recv, SDPA) -> residual gates, norm2..norm4 and the SwiGLU MLPs. The
regions before and after ``attn1`` are about 30% of an H200 forward as unfused elementwise kernels that write full
fp32 tensors to memory (issue 9's profile). They are compiled as two functions; ``attn1`` is called between them
eagerly, so every collective stays outside the compiled graphs and no graph breaks inside them. The 47 ordinary
blocks share one graph per region and the last block (``context_pre_only``) gets its own.
The two region functions mirror ``MochiTransformerBlock.forward`` in diffusers 0.42
(src/diffusers/models/transformers/transformer_mochi.py); tests compare them to the eager block.
"""

from __future__ import annotations

import torch

from batchgen.models.common.fp8 import GATE_SEED, GATE_TEXT_TOKENS, GATE_TOKENS


def _pre_attention(block, hidden_states, encoder_hidden_states, temb):
    norm_hidden, gate_msa, scale_mlp, gate_mlp = block.norm1(hidden_states, temb)
    if block.context_pre_only:
        return norm_hidden, (gate_msa, scale_mlp, gate_mlp), block.norm1_context(encoder_hidden_states, temb), ()
    norm_context, *context_mods = block.norm1_context(encoder_hidden_states, temb)
    return norm_hidden, (gate_msa, scale_mlp, gate_mlp), norm_context, tuple(context_mods)


def _post_attention(block, hidden_states, encoder_hidden_states, attn_hidden, attn_context, mods, context_mods):
    gate_msa, scale_mlp, gate_mlp = mods
    hidden_states = _mlp_update(
        block.norm2, block.norm3, block.ff, block.norm4, hidden_states, attn_hidden, gate_msa, scale_mlp, gate_mlp
    )
    if not block.context_pre_only:
        encoder_hidden_states = _mlp_update(
            block.norm2_context,
            block.norm3_context,
            block.ff_context,
            block.norm4_context,
            encoder_hidden_states,
            attn_context,
            *context_mods,
        )
    return hidden_states, encoder_hidden_states


def _mlp_update(norm2, norm3, ff, norm4, residual, attn_out, gate_msa, scale_mlp, gate_mlp):
    residual = residual + norm2(attn_out, torch.tanh(gate_msa).unsqueeze(1))
    normed = norm3(residual, 1 + scale_mlp.unsqueeze(1).to(torch.float32))
    return residual + norm4(ff(normed), torch.tanh(gate_mlp).unsqueeze(1))


_compiled_pre = torch.compile(_pre_attention, dynamic=False)


_compiled_post = torch.compile(_post_attention, dynamic=False)


def compiled_forward(self, hidden_states, encoder_hidden_states, temb, encoder_attention_mask, image_rotary_emb=None):
    norm_hidden, mods, norm_context, context_mods = _compiled_pre(self, hidden_states, encoder_hidden_states, temb)
    attn_hidden, attn_context = self.attn1(
        hidden_states=norm_hidden,
        encoder_hidden_states=norm_context,
        image_rotary_emb=image_rotary_emb,
        attention_mask=encoder_attention_mask,
    )
    return _compiled_post(self, hidden_states, encoder_hidden_states, attn_hidden, attn_context, mods, context_mods)


def gate_inputs(block, device) -> dict:
    generator = torch.Generator("cpu").manual_seed(GATE_SEED)
    width = block.norm1.linear.in_features
    text_width = block.attn1.add_k_proj.in_features
    mask = torch.ones(1, GATE_TEXT_TOKENS, dtype=torch.bool)
    mask[:, GATE_TEXT_TOKENS // 2 :] = False
    return {
        "hidden_states": torch.randn(1, GATE_TOKENS, width, generator=generator).to(device),
        "encoder_hidden_states": torch.randn(1, GATE_TEXT_TOKENS, text_width, generator=generator).to(device),
        "temb": torch.randn(1, width, generator=generator).to(device),
        "encoder_attention_mask": mask.to(device),
    }


def stock_processor():
    """diffusers' own attention processor (the FP8 gate compares the block as diffusers runs it)."""
    from diffusers.models.transformers.transformer_mochi import MochiAttnProcessor2_0

    return MochiAttnProcessor2_0()


def visual_output(output):
    """The visual stream of a block's output (Mochi's blocks return the visual and the text streams)."""
    return output[0]
