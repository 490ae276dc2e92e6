"""Which way a block attends over the CFG batch, chosen by measuring on the device it runs on (``[parallel]
attention``).

Two paths compute the same softmax over each prompt's own valid keys ([visual ; the prompt's valid text]):

- ``joint``: one call for the whole batch under a key-padding mask. No host sync, one launch; but a masked call
  cannot use FlashAttention (it goes to cuDNN with a bias, or to the memory-efficient kernel).
- ``per-prompt``: one unmasked call per prompt, its keys cut to its valid ones. FlashAttention stays eligible;
  it costs a launch per prompt and one host read of the text mask per mask tensor (``PromptKeys``: once per
  forward at most, where diffusers' processor syncs per sample and block).

Which wins depends on the GPU, the torch and cuDNN builds and the shape (README "GPU performance"), so with
``attention = "auto"`` on CUDA each new (query shape, key shape, dtype) -- the video shape under the rank's
layout -- times every candidate (each path under each kernel that passes ``batchgen.parallel.attention``'s probe)
with warm-up and the median of several calls between CUDA events. Every rank measures, the group's rank 0
decides, and the choice is broadcast (``agree``), so the ranks of one forward run the same path. Without a timer
(CPU) 'auto' takes the joint path, which needs no host sync. The timer is injectable (``Timer``), which is how
the CPU tests drive the mechanism.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from batchgen.parallel.attention import attention_with_lse, list_kernels, resolve_kernel

log = logging.getLogger("batchgen.parallel.choice")

PATHS = ("joint", "per-prompt")
# Measuring costs (2 + 5) calls per candidate of one block's attention, once per shape: a few seconds at 163 frames
# against about 64 x 2 x 48 such calls per item.
WARMUP_CALLS = 2
TIMED_CALLS = 5

Timer = Callable[[str, Callable[[], object]], float]
"""(candidate name, the call) -> its median seconds."""


def cuda_event_timer(warmup: int = WARMUP_CALLS, calls: int = TIMED_CALLS) -> Timer:
    """Median seconds of ``calls`` calls after ``warmup`` untimed ones, each between two CUDA events."""

    def timer(name: str, fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        seconds = []
        for _ in range(calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        return statistics.median(seconds)

    return timer


@dataclass(frozen=True)
class AttentionPath:
    path: str
    """'joint' or 'per-prompt'."""
    kernel: str
    """A ``batchgen.parallel.attention`` kernel name."""

    @property
    def name(self) -> str:
        return f"{self.path}/{self.kernel}"


Rows = list[slice | torch.Tensor]
"""Per prompt, its valid keys: a slice when they are a prefix (a view, no gather), else their indices."""


class PromptKeys:
    """Each prompt's valid text tokens, read on the host once per text-mask tensor (the per-prompt path's one
    sync: the same mask tensor serves every block of a forward, and every step of an item on one process)."""

    def __init__(self) -> None:
        self._source: torch.Tensor | None = None
        self._text: list[slice | torch.Tensor] = []
        self._rows: dict[int, Rows] = {}

    def rows(self, text_mask: torch.Tensor, leading: int) -> Rows:
        """Rows of keys [``leading`` always-valid keys ; the text] valid for each prompt."""
        if text_mask is not self._source:  # holding the tensor keeps its identity from being reused
            host = text_mask.bool().cpu()
            self._source = text_mask
            self._text = [_valid(row) for row in host]
            self._rows = {}
        if leading not in self._rows:
            self._rows[leading] = [
                slice(0, leading + text.stop)
                if isinstance(text, slice)
                else torch.cat([torch.arange(leading), leading + text]).to(text_mask.device)
                for text in self._text
            ]
        return self._rows[leading]


def _decision_key(q: torch.Tensor, text_mask: torch.Tensor, site: tuple) -> tuple:
    return (*site, tuple(q.shape), text_mask.shape[1], str(q.dtype).replace("torch.", ""), q.device.type)


def _valid(row: torch.Tensor) -> slice | torch.Tensor:
    count = int(row.sum())
    return slice(0, count) if bool(row[:count].all()) else torch.nonzero(row).flatten()


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, path: AttentionPath, rows: Rows
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_lse`` under ``key_mask`` [B, Sk] by ``path``: (out [B, H, Sq, D], lse [B, H, Sq]); a prompt
    without a valid key gets out 0 and lse -inf, on both paths. ``rows``: ``PromptKeys.rows`` (per-prompt only)."""
    if path.path == "joint":
        return attention_with_lse(q, k, v, key_mask=key_mask, kernel=path.kernel)
    outs, lses = [], []
    for b, keys in enumerate(rows):
        sample = slice(b, b + 1)
        count = keys.stop if isinstance(keys, slice) else keys.numel()
        if not count:
            outs.append(torch.zeros_like(q[sample]))
            lses.append(torch.full(q[sample].shape[:3], -math.inf, device=q.device))
            continue
        out, lse = attention_with_lse(q[sample], k[sample][:, :, keys], v[sample][:, :, keys], kernel=path.kernel)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def candidates(device: torch.device, dtype: torch.dtype, head_dim: int, kernel: str = "auto") -> list[AttentionPath]:
    """Every path under every kernel that works for it here (``kernel`` other than 'auto': that one alone)."""
    found = []
    for path, masked in (("joint", True), ("per-prompt", False)):
        names = list_kernels(device, dtype, head_dim, masked=masked)
        if kernel != "auto":
            names = [resolve_kernel(kernel, device, dtype, head_dim, masked=masked)]
        found += [AttentionPath(path, name) for name in names]
    return found


def timed_candidates(
    device: torch.device, dtype: torch.dtype, head_dim: int, kernel: str = "auto"
) -> list[AttentionPath]:
    """What 'auto' measures: ``candidates`` without the math fallback of a path that has a fused kernel (math is
    the slowest by far; timing it would cost more than any choice saves)."""
    found = candidates(device, dtype, head_dim, kernel)
    fused = {c.path for c in found if c.kernel != "math"}
    return [c for c in found if c.kernel != "math" or c.path not in fused]


def agree(decision: dict[str, Any], axes: Sequence) -> dict[str, Any]:
    """The decision of the group's rank 0 on every rank of a forward's group (the sp and cfg axes, rank 0 of
    each first): a broadcast along sp gives every sp group its first rank's; one along cfg then spreads cfg 0's."""
    for axis in axes:
        if axis.size > 1:
            holder = [decision]
            dist.broadcast_object_list(holder, src=axis.ranks[0], group=axis.group)
            decision = holder[0]
    return decision


class AttentionChooser:
    """The attention path of every block of one transformer: ``setting`` 'auto', 'joint' or 'per-prompt', decided
    once per (query shape, key shape, dtype, device), the same on every rank of ``axes``."""

    def __init__(self, setting: str = "auto", *, kernel: str = "auto", axes: Sequence = (), timer: Timer | None = None):
        if setting not in ("auto", *PATHS):
            raise ValueError(f"attention must be 'auto', 'joint' or 'per-prompt', got {setting!r}")
        self.setting = setting
        self.kernel = kernel
        self.axes = tuple(axes)
        self.timer = timer
        self.prompt_keys = PromptKeys()
        self.decisions: dict[tuple, dict[str, Any]] = {}
        self.last: dict[str, Any] | None = None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        text_mask: torch.Tensor,
        leading: int,
        site: tuple = ("joint",),
        record: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q over keys [``leading`` keys every prompt sees ; the text under ``text_mask`` [B, L]].

        A decision is made at the first call of each (``site``, query shape, text length, dtype, device): all the
        same on every rank of the group at the same call, so the ranks measure and agree together. ``record``:
        this call's decision is the one ``facts`` reports (the visual queries', not the text's)."""
        key_mask = torch.cat([text_mask.new_ones(text_mask.shape[0], leading), text_mask], dim=1)
        shape = _decision_key(q, text_mask, site)
        decision = self.decisions.get(shape)
        if decision is None:
            decision = self.decisions[shape] = self._decide(shape, q, k, v, key_mask, text_mask, leading)
        if record:
            self.last = decision
        path = AttentionPath(decision["path"], decision["kernel"])
        rows = self.prompt_keys.rows(text_mask, leading) if path.path == "per-prompt" else []
        return masked_attention(q, k, v, key_mask, path, rows)

    def decided(self, q: torch.Tensor, text_mask: torch.Tensor, site: tuple = ("joint",)) -> bool:
        """Whether ``attend`` with these arguments runs without measuring (and without collectives)."""
        return _decision_key(q, text_mask, site) in self.decisions

    def facts(self) -> dict[str, Any]:
        """The sidecar's ``parallel.attention``: the setting and the decision of the latest forward's shape."""
        return {"setting": self.setting, **(self.last or {})}

    def _decide(self, shape, q, k, v, key_mask, text_mask, leading) -> dict[str, Any]:
        timer = self.timer or (cuda_event_timer() if q.device.type == "cuda" else None)
        if self.setting != "auto" or timer is None:
            path = self.setting if self.setting != "auto" else "joint"
            kernel = resolve_kernel(self.kernel, q.device, q.dtype, q.shape[-1], masked=path == "joint")
            return {"path": path, "kernel": kernel, "measured": False}
        started = time.perf_counter()
        rows = self.prompt_keys.rows(text_mask, leading)
        timings = {}
        for candidate in timed_candidates(q.device, q.dtype, q.shape[-1], self.kernel):
            call = lambda c=candidate: masked_attention(q, k, v, key_mask, c, rows)  # noqa: E731
            timings[candidate.name] = round(timer(candidate.name, call) * 1000, 4)
        best = min(timings, key=timings.__getitem__)
        path, kernel = best.split("/")
        decision = agree({"path": path, "kernel": kernel, "measured": True, "timings_ms": timings}, self.axes)
        decision["measure_s"] = round(time.perf_counter() - started, 4)
        log.info(
            "attention at %s, q %s, k %s (%s): %s/%s of %s; measuring took %.3fs",
            shape[0], list(q.shape), list(k.shape), q.dtype, decision["path"], decision["kernel"],
            ", ".join(f"{name} {ms:.3f} ms" for name, ms in decision["timings_ms"].items()), decision["measure_s"],
        )  # fmt: skip
        return decision
