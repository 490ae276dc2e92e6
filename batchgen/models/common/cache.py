"""First-block cache for the transformer (Mochi's or Wan's blocks), agreed across the ranks of a parallel group.

Each step runs block 0 and measures how much its residual (output - input) moved since the last fully computed
step: ``sum|r - r_ref| / sum|r_ref|``. Below the threshold the other blocks are skipped and their residual from
that step is added instead; otherwise they run and both residuals become the new reference. This is diffusers'
``FirstBlockCache`` (src/diffusers/hooks/first_block_cache.py: relative absmean change of the head block's
residual, tail residuals reused) with two differences that make it safe under parallelism:

- The two sums are all-reduced over the sequence-parallel and cfg groups before the decision, so every rank of a
  group sees the metric of the whole [uncond, cond] x all-tokens residual, decides the same, and no rank waits in
  an attention collective that the others skipped. The rows that pad the sequence to a multiple of ulysses x ring
  are left out of the sums (one process has none), so a USP group skips the same steps as one process.
- The reference is only replaced on computed steps (as ParaAttention does), and the comparison is strict, so
  threshold 0 never skips: the output is then exactly the uncached one.

State is per item (``reset`` before each denoising loop); the counts go to the item's sidecar.
"""

from __future__ import annotations

import logging
from types import MethodType

import torch
import torch.distributed as dist

from batchgen.models import MOCHI, ParallelPlan
from batchgen.parallel.apply import installed_plan, valid_local_tokens

log = logging.getLogger("batchgen.generate.cache")


class FirstBlockCache:
    def __init__(self, transformer, threshold: float, axes=(), *, plan: ParallelPlan | None = None):
        """``axes``: the ``Axis`` objects (sp, cfg) whose ranks share one forward and must decide alike. ``plan``:
        the family's ``ParallelPlan`` (where the blocks are); by default the one the transformer was
        parallelized with, else Mochi's."""
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.transformer = transformer
        self.axes = [axis for axis in axes if axis.size > 1]
        blocks = list(getattr(transformer, (plan or installed_plan(transformer) or MOCHI.parallel_plan).blocks))
        if len(blocks) < 2:
            raise ValueError("the first-block cache needs at least two transformer blocks")
        _wrap(blocks[0], self._head)
        for block in blocks[1:-1]:
            _wrap(block, self._middle)
        _wrap(blocks[-1], self._tail)
        self._joint = True
        self.reset()

    def reset(self) -> None:
        """Forget the previous item: its first step always computes every block."""
        self._reference: torch.Tensor | None = None
        # Set by the last computed step's last and first blocks: () until then.
        self._tail_residuals: tuple[torch.Tensor, ...] = ()
        self._head_output: tuple[torch.Tensor, ...] = ()
        self._skip = False
        self.steps_computed = 0
        self.steps_reused = 0
        self.last_change: float | None = None

    def facts(self) -> dict[str, float | int]:
        return {"threshold": self.threshold, "steps_computed": self.steps_computed, "steps_reused": self.steps_reused}

    # Block wrappers: ``forward`` is the block's own (possibly compiled) forward. A Mochi block returns both
    # streams (visual, text); a Wan block only the visual one (its text is not updated by the blocks).

    def _head(self, forward, hidden_states, encoder_hidden_states, *args, **kwargs):
        output = forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        self._joint = isinstance(output, tuple)
        streams = self._streams(output)
        residual = streams[0] - hidden_states
        self._skip = self._agree_to_skip(residual)
        if self._skip:
            self.steps_reused += 1
            return self._output(tuple(s + r for s, r in zip(streams, self._tail_residuals, strict=True)))
        self.steps_computed += 1
        self._reference = residual
        self._head_output = streams
        return output

    def _middle(self, forward, hidden_states, encoder_hidden_states, *args, **kwargs):
        if self._skip:
            return self._output((hidden_states, encoder_hidden_states))
        return forward(hidden_states, encoder_hidden_states, *args, **kwargs)

    def _tail(self, forward, hidden_states, encoder_hidden_states, *args, **kwargs):
        if self._skip:
            return self._output((hidden_states, encoder_hidden_states))
        output = forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        streams = self._streams(output)
        self._tail_residuals = tuple(s - h for s, h in zip(streams, self._head_output, strict=True))
        return output

    def _streams(self, output) -> tuple[torch.Tensor, ...]:
        return output if self._joint else (output,)

    def _output(self, streams: tuple[torch.Tensor, ...]):
        """What a block of this model returns, from (visual, text) or (visual,)."""
        return streams[:2] if self._joint else streams[0]

    def _agree_to_skip(self, residual: torch.Tensor) -> bool:
        if self._reference is None:
            return False
        reference = self._reference
        valid = valid_local_tokens(self.transformer)
        if valid is not None:  # hidden states are (batch, tokens, width); padding rows sit at the end
            residual, reference = residual[:, :valid], reference[:, :valid]
        # fp64 sums: the group's partial sums add up to the single-process figure up to summation order.
        sums = torch.stack(
            [(residual - reference).abs().sum(dtype=torch.float64), reference.abs().sum(dtype=torch.float64)]
        )
        for axis in self.axes:
            dist.all_reduce(sums, group=axis.group)
        change_sum, reference_sum = sums.tolist()
        self.last_change = change_sum / reference_sum if reference_sum > 0 else float("inf")
        return self.last_change < self.threshold


def _wrap(block, wrapper) -> None:
    forward = block.forward

    def cached_forward(self, *args, **kwargs):
        return wrapper(forward, *args, **kwargs)

    block.forward = MethodType(cached_forward, block)


def group_axes(context) -> list:
    """The axes whose ranks run one forward together: sequence-parallel and cfg (not dp: other items)."""
    axes = getattr(context, "axes", None) or {}
    return [axes[name] for name in ("sp", "cfg") if name in axes]
