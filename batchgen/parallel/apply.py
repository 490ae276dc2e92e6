"""Apply CFG and sequence parallelism to a diffusers transformer from outside the model.

Nothing in diffusers is forked or subclassed; the model keeps its class and call signature, so the stock pipelines
(and batchgen's generators) call it as before. Where to split and gather is data: the family's
``batchgen.models.ParallelPlan`` (module names, RoPE token dimension, processor factory), as diffusers' ``_cp_plan``.
What is installed:

- every block's attention processor (``plan.attention``) becomes a parallel processor (native USP or xfuser), or,
  without sequence parallelism, the family's single-process one (Mochi: ``MochiJointAttnProcessor``, the whole CFG
  batch in one attention call, no host syncs);
- a pre-hook on the first block pads the visual tokens to a multiple of ulysses x ring (zeros at the end; the
  processors keep padded keys out of every softmax) and keeps this rank's contiguous slice, and a hook on
  ``plan.rope`` pads and slices the RoPE rows the same way (RoPE is computed for all tokens, so positions are
  global);
- per-token timesteps ([B, N], Wan 2.2 TI2V) are padded and sliced like the tokens, in a pre-hook on the model;
- a hook on ``plan.output`` all-gathers the visual tokens over the sequence-parallel group and drops the padding
  (everything after the blocks is per-token, so the output norm runs on the slice);
- with cfg degree 2, a pre-hook on the model hands this rank its half of the [uncond, cond] batch and a hook on
  the output all-gathers the halves, so every rank returns the full prediction.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from batchgen.core.errors import TopologyError
from batchgen.models import MOCHI, ParallelPlan
from batchgen.parallel.choice import AttentionChooser, Timer
from batchgen.parallel.usp import COMM_STATS, Axis, SequenceLayout, all_gather_cat

log = logging.getLogger("batchgen.parallel.apply")

_STATE_ATTR = "_batchgen_parallel"
_BATCHED_ARGS = (
    "hidden_states",
    "encoder_hidden_states",
    "timestep",
    "encoder_attention_mask",
    "encoder_hidden_states_image",
)


@dataclass
class _ParallelState:
    cfg: Axis
    sp: Axis
    handles: list = field(default_factory=list)
    original_processors: list = field(default_factory=list)
    cfg_split: bool = False
    warned_odd_batch: bool = False
    backend: str = "native"
    layout: SequenceLayout = field(default_factory=SequenceLayout)
    plan: ParallelPlan = MOCHI.parallel_plan
    attention: str = "auto"
    """``[parallel] attention`` (Mochi's joint attention: ``batchgen.parallel.choice``)."""
    timer: Timer | None = None
    """What measures the candidates under 'auto'; None: CUDA events on CUDA, no measuring elsewhere."""
    chooser: AttentionChooser | None = None


def parallelize_transformer(
    transformer,
    context,
    *,
    plan: ParallelPlan = MOCHI.parallel_plan,
    backend: str | None = None,
    kernel: str = "auto",
    attention: str = "auto",
    timer: Timer | None = None,
):
    """Install CFG / sequence parallelism on ``transformer`` (in place) and return it.

    ``plan`` is the family's ``ParallelPlan`` (Mochi's by default). ``attention``: ``[parallel] attention``, the
    path of Mochi's joint attention ('auto' measures with ``timer``, by default CUDA events on CUDA). ``context`` is a ``TorchContext``, or any
    context without a ``topology`` (``SingleProcess``): one process. ``backend`` defaults to the context's parallel
    config ('native' when it has none). Every rank of a data-parallel group must call the returned model with the
    same full CFG batch; each returns the full noise prediction.
    """
    if getattr(transformer, _STATE_ATTR, None) is not None:
        raise RuntimeError("transformer is already parallelized")
    topology = getattr(context, "topology", None)
    single = Axis(group=None, size=1, rank=0, ranks=(0,))
    axes = getattr(context, "axes", None) or {"cfg": single, "sp": single}
    heads = transformer.config.num_attention_heads
    if topology is not None and heads % topology.ulysses:
        raise TopologyError(f"ulysses degree {topology.ulysses} does not divide the model's {heads} attention heads")
    state = _ParallelState(
        cfg=axes["cfg"],
        sp=axes["sp"],
        backend=backend or getattr(context, "sp_backend", None) or "native",
        plan=plan,
        attention=attention,
        timer=timer,
    )
    blocks = getattr(transformer, plan.blocks)
    processors = plan.processors(transformer, context, state, kernel)
    for block, processor in zip(blocks, processors, strict=True):
        attention_module = getattr(block, plan.attention)
        state.original_processors.append(attention_module.processor)
        attention_module.processor = processor
    signature = inspect.signature(transformer.forward)
    if state.sp.size > 1:
        state.handles += [
            transformer.register_forward_pre_hook(_split_token_timestep_hook(state, signature), with_kwargs=True),
            blocks[0].register_forward_pre_hook(_split_tokens_hook(state), with_kwargs=True),
            getattr(transformer, plan.rope).register_forward_hook(_split_rope_hook(state)),
            getattr(transformer, plan.output).register_forward_hook(_gather_tokens_hook(state)),
        ]
    if state.cfg.size > 1:
        state.handles += [
            transformer.register_forward_pre_hook(_split_cfg_hook(state, signature), with_kwargs=True),
            transformer.register_forward_hook(_gather_cfg_hook(state)),
        ]
    setattr(transformer, _STATE_ATTR, state)
    if topology is not None:
        backend_name = state.backend if state.sp.size > 1 else "-"
        log.info("parallelized transformer: %s, backend %s", topology.describe(), backend_name)
    return transformer


def unparallelize_transformer(transformer) -> None:
    """Remove everything ``parallelize_transformer`` installed (the model is then the stock single-process one)."""
    state: _ParallelState | None = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    for block, processor in zip(getattr(transformer, state.plan.blocks), state.original_processors, strict=False):
        getattr(block, state.plan.attention).processor = processor
    delattr(transformer, _STATE_ATTR)


def installed_plan(transformer) -> ParallelPlan | None:
    """The ``ParallelPlan`` ``parallelize_transformer`` installed on ``transformer``, or None."""
    state: _ParallelState | None = getattr(transformer, _STATE_ATTR, None)
    return state.plan if state is not None else None


def attention_facts(transformer) -> dict[str, Any] | None:
    """The sidecar's ``parallel.attention``: the setting, and the path, kernel and candidate timings of the latest
    forward (``AttentionChooser.facts``); None where no choice is made (Wan, the xfuser backend)."""
    state: _ParallelState | None = getattr(transformer, _STATE_ATTR, None)
    if state is None or state.chooser is None:
        return None
    return state.chooser.facts()


def valid_local_tokens(transformer) -> int | None:
    """How many of this rank's visual rows in the blocks are real tokens (the rest is padding); None when the
    sequence is not split. Valid after the first block's pre-hook has seen the current shape."""
    state: _ParallelState | None = getattr(transformer, _STATE_ATTR, None)
    if state is None or state.sp.size == 1:
        return None
    chunk = state.layout.padded // state.sp.size
    return max(0, min(chunk, state.layout.tokens - state.sp.rank * chunk))


def _pad_and_slice(rows: torch.Tensor, dim: int, sp: Axis) -> torch.Tensor:
    """Zero rows appended along ``dim`` up to a multiple of ``sp.size``, then this rank's contiguous slice."""
    total = rows.shape[dim]
    chunk = -(-total // sp.size)
    pad = chunk * sp.size - total
    if pad:
        shape = list(rows.shape)
        shape[dim] = pad
        rows = torch.cat([rows, rows.new_zeros(shape)], dim=dim)
    return rows.narrow(dim, sp.rank * chunk, chunk)


def _split_tokens_hook(state: _ParallelState):
    def split(hidden: torch.Tensor) -> torch.Tensor:
        total = hidden.shape[1]
        padded = -(-total // state.sp.size) * state.sp.size
        if padded != total and state.backend != "native":
            raise TopologyError(
                f"{total} visual tokens do not divide by ulysses x ring = {state.sp.size} and the {state.backend} "
                "backend cannot pad the sequence (its attention takes no mask); use --sp-backend native"
            )
        if padded != total and (total, padded) != (state.layout.tokens, state.layout.padded):
            log.info("visual tokens: %d, padded to %d for ulysses x ring = %d", total, padded, state.sp.size)
        state.layout.tokens, state.layout.padded = total, padded
        return _pad_and_slice(hidden, 1, state.sp)

    def hook(module, args, kwargs):
        if args:  # positional call (gradient checkpointing): hidden_states first
            return (split(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": split(kwargs["hidden_states"])}

    return hook


def _split_token_timestep_hook(state: _ParallelState, signature: inspect.Signature):
    """Per-token timesteps [B, N] (Wan 2.2 TI2V) modulate the tokens they belong to, in the blocks and in the
    output norm before ``plan.output``: they are split like the tokens (diffusers' Wan ``_cp_plan`` splits
    ``timestep`` on dim 1 too). A timestep per sample ([B]) is left alone."""

    def hook(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        timestep = bound.arguments.get("timestep")
        if not isinstance(timestep, torch.Tensor) or timestep.ndim != 2:
            return args, kwargs
        bound.arguments["timestep"] = _pad_and_slice(timestep, 1, state.sp)
        return bound.args, bound.kwargs

    return hook


def _split_rope_hook(state: _ParallelState):
    dim = state.plan.rope_token_dim

    def hook(module, args, output):
        cos, sin = output  # rows follow token order along ``dim``
        return _pad_and_slice(cos, dim, state.sp), _pad_and_slice(sin, dim, state.sp)

    return hook


def _gather_tokens_hook(state: _ParallelState):
    def hook(module, args, output):
        gathered = all_gather_cat(output, state.sp, dim=1, kind="output_gather")
        return gathered[:, : state.layout.tokens]

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
