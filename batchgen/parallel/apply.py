"""Apply CFG and sequence parallelism to diffusers' ``MochiTransformer3DModel`` from outside the model.

Nothing in diffusers is forked or subclassed; the model keeps its class and call signature, so the stock
``MochiPipeline`` (and ``MochiGenerator``) call it as before. What is installed:

- every block's ``attn.processor`` becomes a parallel processor (native USP or xfuser);
- a pre-hook on the first block keeps this rank's contiguous slice of the visual tokens, and a hook on
  ``rope`` keeps the matching RoPE rows (RoPE is computed for all tokens, then sliced, so positions are global);
- a hook on ``proj_out`` all-gathers the visual tokens over the sequence-parallel group (everything after the
  blocks is per-token, so norm_out runs on the slice);
- with cfg degree 2, a pre-hook on the model hands this rank its half of the [uncond, cond] batch and a hook on
  the output all-gathers the halves, so every rank returns the full prediction.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from batchgen.errors import TopologyError
from batchgen.parallel.usp import COMM_STATS, Axis, USPMochiAttnProcessor, all_gather_cat

log = logging.getLogger("batchgen.parallel.apply")

_STATE_ATTR = "_batchgen_parallel"
_BATCHED_ARGS = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask")


@dataclass
class _ParallelState:
    cfg: Axis
    sp: Axis
    handles: list = field(default_factory=list)
    original_processors: list = field(default_factory=list)
    cfg_split: bool = False
    token_slice: slice | None = None
    warned_odd_batch: bool = False


def _make_processors(transformer, context, backend: str, kernel: str) -> list:
    ulysses, ring = context.axes["ulysses"], context.axes["ring"]
    if backend == "native":
        return [USPMochiAttnProcessor(ulysses, ring, kernel=kernel) for _ in transformer.transformer_blocks]
    if backend == "xfuser":
        from batchgen.parallel.xfuser_backend import XFuserMochiAttnProcessor, setup_xfuser_groups

        setup_xfuser_groups(ulysses, ring)
        return [XFuserMochiAttnProcessor(ulysses, ring) for _ in transformer.transformer_blocks]
    raise ValueError(f"unknown sequence-parallel backend {backend!r}; expected 'native' or 'xfuser'")


def parallelize_transformer(transformer, context, *, backend: str | None = None, kernel: str = "auto"):
    """Install CFG / sequence parallelism on ``transformer`` (in place) and return it.

    ``context`` is a ``TorchContext``; ``backend`` defaults to the context's parallel config ('native' when it
    has none). With sp and cfg degree 1 the model is returned untouched. Every rank of a data-parallel group must
    call the returned model with the same full CFG batch; each returns the full noise prediction.
    """
    if getattr(transformer, _STATE_ATTR, None) is not None:
        raise RuntimeError("transformer is already parallelized")
    topology = context.topology
    if topology.sp == 1 and topology.cfg == 1:
        return transformer
    heads = transformer.config.num_attention_heads
    if heads % topology.ulysses:
        raise TopologyError(f"ulysses degree {topology.ulysses} does not divide the model's {heads} attention heads")
    backend = backend or getattr(context, "sp_backend", None) or "native"
    state = _ParallelState(cfg=context.axes["cfg"], sp=context.axes["sp"])
    blocks = transformer.transformer_blocks
    if state.sp.size > 1:
        processors = _make_processors(transformer, context, backend, kernel)
        for block, processor in zip(blocks, processors, strict=True):
            state.original_processors.append(block.attn1.processor)
            block.attn1.processor = processor
        state.handles += [
            blocks[0].register_forward_pre_hook(_split_tokens_hook(state), with_kwargs=True),
            transformer.rope.register_forward_hook(_split_rope_hook(state)),
            transformer.proj_out.register_forward_hook(_gather_tokens_hook(state)),
        ]
    if state.cfg.size > 1:
        signature = inspect.signature(transformer.forward)
        state.handles += [
            transformer.register_forward_pre_hook(_split_cfg_hook(state, signature), with_kwargs=True),
            transformer.register_forward_hook(_gather_cfg_hook(state)),
        ]
    setattr(transformer, _STATE_ATTR, state)
    log.info("parallelized transformer: %s, backend %s", topology.describe(), backend if state.sp.size > 1 else "-")
    return transformer


def unparallelize_transformer(transformer) -> None:
    """Remove everything ``parallelize_transformer`` installed (the model is then the stock single-process one)."""
    state: _ParallelState | None = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    for block, processor in zip(transformer.transformer_blocks, state.original_processors, strict=False):
        block.attn1.processor = processor
    delattr(transformer, _STATE_ATTR)


def _token_slice(total: int, sp: Axis) -> slice:
    if total % sp.size:
        raise TopologyError(
            f"{total} visual tokens do not divide by the sequence-parallel degree {sp.size} (ulysses x ring); "
            "check_items should have rejected this item before the weights loaded"
        )
    chunk = total // sp.size
    return slice(sp.rank * chunk, (sp.rank + 1) * chunk)


def _split_tokens_hook(state: _ParallelState):
    def hook(module, args, kwargs):
        if args:  # positional call (gradient checkpointing): hidden_states first
            hidden = args[0]
            state.token_slice = _token_slice(hidden.shape[1], state.sp)
            return (hidden[:, state.token_slice], *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        state.token_slice = _token_slice(hidden.shape[1], state.sp)
        return args, {**kwargs, "hidden_states": hidden[:, state.token_slice]}

    return hook


def _split_rope_hook(state: _ParallelState):
    def hook(module, args, output):
        cos, sin = output  # [N, heads, head_dim / 2] each; rows follow token order
        rows = _token_slice(cos.shape[0], state.sp)
        return cos[rows], sin[rows]

    return hook


def _gather_tokens_hook(state: _ParallelState):
    def hook(module, args, output):
        return all_gather_cat(output, state.sp, dim=1, kind="output_gather")

    return hook


def _split_cfg_hook(state: _ParallelState, signature: inspect.Signature):
    def hook(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        batch = bound.arguments["hidden_states"].shape[0]
        state.cfg_split = batch % state.cfg.size == 0
        if not state.cfg_split:
            # guidance <= 1 gives a batch of 1: both ranks of the pair run it (same result, no exchange).
            if not state.warned_odd_batch:
                log.info("batch of %d does not split over cfg degree %d; both ranks compute it", batch, state.cfg.size)
                state.warned_odd_batch = True
            return args, kwargs
        part = batch // state.cfg.size
        rows = slice(state.cfg.rank * part, (state.cfg.rank + 1) * part)
        for name in _BATCHED_ARGS:
            value = bound.arguments.get(name)
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                bound.arguments[name] = value[rows]
        return bound.args, bound.kwargs

    return hook


def _gather_cfg_hook(state: _ParallelState):
    def hook(module, args, output: Any):
        if not state.cfg_split:
            return output
        if isinstance(output, tuple):
            return (all_gather_cat(output[0], state.cfg, dim=0, kind="cfg_gather"), *output[1:])
        output.sample = all_gather_cat(output.sample, state.cfg, dim=0, kind="cfg_gather")
        return output

    return hook


__all__ = ["parallelize_transformer", "unparallelize_transformer", "COMM_STATS"]
