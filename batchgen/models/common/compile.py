"""``--compile``: torch.compile the elementwise regions of every Mochi or Wan block, leaving attention eager.

A diffusers ``MochiTransformerBlock`` runs: norm1 / norm1_context (fp32 RMSNorm + modulation) -> ``attn1`` (the
attention processor: all-to-all, ring send/recv, SDPA) -> residual gates, norm2..norm4 and the SwiGLU MLPs. The
regions before and after ``attn1`` are about 30% of an H200 forward as unfused elementwise kernels that write full
fp32 tensors to memory (issue 9's profile). They are compiled as two functions; ``attn1`` is called between them
eagerly, so every collective stays outside the compiled graphs and no graph breaks inside them.

The functions take the block as an argument. Dynamo treats a module argument's parameters as graph inputs, so the
47 ordinary blocks share one graph per region and the last block (``context_pre_only``) gets its own: one
compilation per video shape (``dynamic=False``: each shape gets specialised kernels), about four graphs.
The RoPE frequency module is compiled too (once per shape; its token-split hook runs outside the graph).
The two region functions mirror ``MochiTransformerBlock.forward`` in diffusers 0.42
(src/diffusers/models/transformers/transformer_mochi.py); tests compare them to the eager block.
"""

from __future__ import annotations

import logging
import time
from types import MethodType

import torch

from batchgen.core.errors import ConfigError

log = logging.getLogger("batchgen.generate.compile")

# Graphs per shape: two regions x (ordinary, last block) plus RoPE; room for a few shapes per worker.
RECOMPILE_LIMIT = 64
_STATE_ATTR = "_batchgen_compiled"


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


def _compiled_block_forward(
    self, hidden_states, encoder_hidden_states, temb, encoder_attention_mask, image_rotary_emb=None
):
    norm_hidden, mods, norm_context, context_mods = _compiled_pre(self, hidden_states, encoder_hidden_states, temb)
    attn_hidden, attn_context = self.attn1(
        hidden_states=norm_hidden,
        encoder_hidden_states=norm_context,
        image_rotary_emb=image_rotary_emb,
        attention_mask=encoder_attention_mask,
    )
    return _compiled_post(self, hidden_states, encoder_hidden_states, attn_hidden, attn_context, mods, context_mods)


# Wan: diffusers' WanTransformerBlock.forward in three regions around its two eager attention calls (attn1, the
# sequence-parallel one, and attn2, cross-attention to the text).


def _wan_modulation(block, temb):
    if temb.ndim == 4:  # per-token modulation [B, N, 6, D] (Wan 2.2 TI2V)
        return [m.squeeze(2) for m in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    return list((block.scale_shift_table + temb.float()).chunk(6, dim=1))


def _wan_pre_attention(block, hidden_states, temb):
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = _wan_modulation(block, temb)
    norm_hidden = (block.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
    return norm_hidden, (gate_msa, c_shift_msa, c_scale_msa, c_gate_msa)


def _wan_pre_cross_attention(block, hidden_states, attn_output, gate_msa):
    hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)
    return hidden_states, block.norm2(hidden_states.float()).type_as(hidden_states)


def _wan_feed_forward(block, hidden_states, attn_output, c_shift_msa, c_scale_msa, c_gate_msa):
    hidden_states = hidden_states + attn_output
    norm_hidden = (block.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(hidden_states)
    ff_output = block.ffn(norm_hidden)
    return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


_compiled_wan_pre = torch.compile(_wan_pre_attention, dynamic=False)
_compiled_wan_cross = torch.compile(_wan_pre_cross_attention, dynamic=False)
_compiled_wan_ff = torch.compile(_wan_feed_forward, dynamic=False)


def _compiled_wan_block_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    norm_hidden, (gate_msa, *ff_mods) = _compiled_wan_pre(self, hidden_states, temb)
    attn_output = self.attn1(norm_hidden, None, None, rotary_emb)
    hidden_states, norm_hidden = _compiled_wan_cross(self, hidden_states, attn_output, gate_msa)
    attn_output = self.attn2(norm_hidden, encoder_hidden_states, None, None)
    return _compiled_wan_ff(self, hidden_states, attn_output, *ff_mods)


class CompiledBlocks:
    """Installed on a transformer by ``compile_blocks``; tells which video shapes were compiled and how long the
    first (compiling) step of each took."""

    def __init__(self) -> None:
        self.shapes: dict[tuple, float] = {}

    def is_new(self, shape: tuple) -> bool:
        return shape not in self.shapes

    def record(self, shape: tuple, first_step_s: float, graphs: int) -> None:
        self.shapes[shape] = first_step_s
        log.info(
            "compiled transformer blocks for latent shape %s: first step %.2fs, %d new graph(s)",
            shape,
            first_step_s,
            graphs,
        )


def compile_blocks(transformer) -> CompiledBlocks:
    """Compile every block's regions and the RoPE module of ``transformer`` in place (idempotent): Mochi's or Wan's
    blocks (ConfigError for another model)."""
    blocks, block_forward = _blocks_and_forward(transformer)
    existing = getattr(transformer, _STATE_ATTR, None)
    if existing is not None:
        return existing
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.forward = MethodType(block_forward, block)
    transformer.rope.forward = torch.compile(transformer.rope.forward, dynamic=False)
    state = CompiledBlocks()
    setattr(transformer, _STATE_ATTR, state)
    log.info("transformer blocks compiled lazily: norms, modulation, MLPs and RoPE; attention stays eager")
    return state


def _blocks_and_forward(transformer):
    from diffusers import MochiTransformer3DModel, WanTransformer3DModel

    if isinstance(transformer, MochiTransformer3DModel):
        return transformer.transformer_blocks, _compiled_block_forward
    if isinstance(transformer, WanTransformer3DModel):
        return transformer.blocks, _compiled_wan_block_forward
    raise ConfigError(f"parallel.compile (--compile) is available for Mochi and Wan, not {type(transformer).__name__}")


def graph_count() -> int:
    """Graphs Dynamo compiled in this process so far (for the log: a new shape adds a handful, a repeat none)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class FirstStepTimer:
    """Times a loop's first step when it compiles a new shape (the compile cost, reported in the sidecar)."""

    def __init__(self, compiled: CompiledBlocks | None, shape: tuple):
        self.active = compiled is not None and compiled.is_new(shape)
        self.compiled, self.shape = compiled, shape
        self.seconds = 0.0
        self._graphs = graph_count() if self.active else 0
        self._started = time.perf_counter()

    def step_done(self) -> None:
        if self.active:
            self.seconds = time.perf_counter() - self._started
            self.compiled.record(self.shape, self.seconds, graph_count() - self._graphs)
            self.active = False
