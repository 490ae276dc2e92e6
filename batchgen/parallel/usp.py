"""Unified Sequence Parallelism (Ulysses x Ring) for joint attention, natively on torch.distributed (gloo and NCCL).

Layout per sequence-parallel rank: a contiguous slice of the visual tokens (with its RoPE slice) and the full,
replicated text stream. One attention layer:

1. Visual q/k/v of the local slice, all heads; text q/k/v on every rank (replicated, cheap: <= 256 tokens).
2. Ulysses all-to-all over the ulysses group: scatter heads, gather sequence -> this rank now holds H/u heads of
   the ulysses group's u slices (its ring "chunk").
3. Ring attention over the ring group: K/V chunks travel around the ring (batch_isend_irecv, next transfer in
   flight while the current block computes); partial results merge exactly through their log-sum-exps.
   The text keys/values join once, on each rank's own step, under a key-padding mask (each prompt's valid tokens:
   Mochi drops padded text tokens, which a mask reproduces exactly), so every query sees them exactly once. The
   whole CFG batch shares every kernel call.
4. Text queries attend to the text keys and to every visual chunk; partials merge in a fixed order (text, chunk 0,
   chunk 1, ...) so all ring ranks compute bit-identical text outputs and the replicated text stream stays
   replicated. An all-gather over the ulysses group restores all heads.
5. Reverse all-to-all for the visual output. Padded text positions get a zero attention output, as in diffusers.

``ring_attention`` is the same ring without text, for self-attention that has none (Wan's; see
``batchgen.models.wan.parallel``). Mochi's attention processor built on these is
``batchgen.models.mochi.attention``.

Any visual length runs on any degree: ``batchgen.parallel.apply`` pads the sequence to a multiple of
ulysses x ring and drops the padding after the blocks; here padded keys are cut from their ring chunk
(``SequenceLayout``), so they never enter a softmax, and padded queries compute rows nobody keeps.

Every collective counts the bytes this rank sends (``COMM_STATS``), for the benchmark's measured-vs-formula check.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from batchgen.parallel.attention import attention_with_lse, merge_partial
from batchgen.parallel.choice import AttentionChooser


class CommStats:
    """Bytes this rank sent per collective kind (all-to-all: the parts for other ranks; all-gather: own part x
    (group - 1); ring: the K/V blocks sent)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += int(nbytes)

    def reset(self) -> None:
        self.bytes.clear()

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


COMM_STATS = CommStats()


@dataclass
class Axis:
    """One process group axis as this rank sees it. Collectives are skipped when the axis has size 1."""

    group: dist.ProcessGroup | None
    size: int
    rank: int
    ranks: tuple[int, ...]
    """Global ranks of the group, in group-rank order."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all_first_dim(x: torch.Tensor, axis: Axis, kind: str) -> torch.Tensor:
    """x [axis.size, ...]: part i goes to group rank i; returns [axis.size, ...] with part j from rank j."""
    if axis.size == 1:
        return x
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=axis.group)
    COMM_STATS.add(kind, _nbytes(x) * (axis.size - 1) // axis.size)
    return out


def all_gather_cat(x: torch.Tensor, axis: Axis, dim: int, kind: str) -> torch.Tensor:
    if axis.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(axis.size)]
    dist.all_gather(parts, x, group=axis.group)
    COMM_STATS.add(kind, _nbytes(x) * (axis.size - 1))
    return torch.cat(parts, dim=dim)


def ulysses_scatter_heads(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """[..., S_local, H, D] (leading dims any) -> [..., u * S_local, H / u, D], sequence in ulysses-rank order."""
    u = axis.size
    if u == 1:
        return x
    *lead, s, h, d = x.shape
    parts = x.reshape(*lead, s, u, h // u, d).movedim(-3, 0)  # [u, ..., S, H/u, D]
    got = all_to_all_first_dim(parts, axis, "ulysses")  # part j: rank j's tokens, my heads
    return got.movedim(0, -4).reshape(*lead, u * s, h // u, d)


def ulysses_gather_heads(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Inverse of ``ulysses_scatter_heads``: [..., u * S_local, H / u, D] -> [..., S_local, H, D]."""
    u = axis.size
    if u == 1:
        return x
    *lead, s_total, hl, d = x.shape
    parts = x.reshape(*lead, u, s_total // u, hl, d).movedim(-4, 0)  # [u, ..., S, H/u, D]: part i -> rank i
    got = all_to_all_first_dim(parts, axis, "ulysses")  # part j: my tokens, rank j's heads
    return got.movedim(0, -3).reshape(*lead, s_total // u, u * hl, d)


class RingExchange:
    """Passes a tensor one step around the ring: send to the next rank, receive from the previous one."""

    def __init__(self, axis: Axis):
        self.axis = axis
        self.next = axis.ranks[(axis.rank + 1) % axis.size]
        self.prev = axis.ranks[(axis.rank - 1) % axis.size]

    def start(self, send: torch.Tensor) -> tuple[torch.Tensor, list]:
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, group=self.axis.group),
            dist.P2POp(dist.irecv, recv, self.prev, group=self.axis.group),
        ]
        requests = dist.batch_isend_irecv(ops)
        COMM_STATS.add("ring", _nbytes(send))
        return recv, requests


@dataclass
class JointText:
    """The CFG batch's text q/k/v for this rank's heads, each [B, H_local, L, D], and which of the L tokens are
    valid per sample (``mask`` [B, L] bool). L is the batch's common length; a sample's padding is masked."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor


@dataclass
class SequenceLayout:
    """The visual sequence of the current forward: ``tokens`` real ones, padded with tokens attention ignores to
    ``padded``, a multiple of ulysses x ring. Set by ``batchgen.parallel.apply`` before the first block runs."""

    tokens: int = 0
    padded: int = 0

    def valid_keys(self, block: int, block_size: int) -> int:
        """Real tokens in ring chunk ``block`` (chunks are contiguous, ``block_size`` tokens each, in order)."""
        if not self.padded:
            return block_size
        return max(0, min(block_size, self.tokens - block * block_size))


def _ring_blocks(k: torch.Tensor, v: torch.Tensor, ring: Axis, layout: SequenceLayout):
    """Yield (block, keys, values) for every ring chunk, this rank's own first, keys cut to the chunk's real
    tokens. The next chunk is already in flight while the caller computes on the current one."""
    chunk = k.shape[2]
    exchange = RingExchange(ring) if ring.size > 1 else None
    kv = torch.stack([k, v]).contiguous()
    for step in range(ring.size):
        pending = exchange.start(kv) if exchange is not None and step < ring.size - 1 else None
        block = (ring.rank - step) % ring.size
        valid = layout.valid_keys(block, chunk)
        yield block, kv[0, :, :, :valid], kv[1, :, :, :valid]
        if pending is not None:
            recv, requests = pending
            for request in requests:
                request.wait()
            kv = recv


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring: Axis,
    *,
    layout: SequenceLayout | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Self-attention of this rank's chunk q over the whole ring's k, v (each [B, H_local, C, D]), no text: one
    kernel call per ring chunk that holds real tokens, merged through the log-sum-exps. Returns [B, H_local, C, D]."""
    out = lse = None
    for _, keys, values in _ring_blocks(k, v, ring, layout or SequenceLayout()):
        if keys.shape[2]:  # a chunk of padding alone holds no key
            out, lse = merge_partial(out, lse, *attention_with_lse(q, keys, values, kernel=kernel))
    if out is None:
        raise ValueError("ring attention: no chunk of the ring holds a real key")
    return out.to(q.dtype)


def ring_joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text: JointText,
    ring: Axis,
    *,
    layout: SequenceLayout | None = None,
    kernel: str = "auto",
    chooser: AttentionChooser | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention of this rank's visual chunk q, k, v [B, H_local, C, D] and the batch's text tokens, over the
    whole ring, one kernel call per ring step for the whole batch. Returns (visual out [B, H_local, C, D], text out
    [B, H_local, L, D]; rows of padded text tokens are 0). The two calls under the text mask take ``chooser``'s
    path (joint or per prompt; without a chooser 'auto' on ``kernel``).

    Padded visual tokens sit at the end of the sequence; a chunk's keys are cut to its real tokens (a chunk of
    padding alone is skipped), so no padded key enters any softmax and fast kernels need no mask for the
    visual keys. Text keys join once, on the step where the rank holds its own chunk, under the key mask."""
    chooser = chooser or AttentionChooser(kernel=kernel)
    layout = layout or SequenceLayout()
    # The same on every rank (a rank's real key count is not: the last chunks may hold padding).
    site = ("ring", layout.tokens, layout.padded)

    def own_step(keys: torch.Tensor, values: torch.Tensor):
        # The batch's text joins once per query, under the key mask (each prompt's own valid tokens).
        joint_k, joint_v = torch.cat([keys, text.k], dim=2), torch.cat([values, text.v], dim=2)
        return chooser.attend(q, joint_k, joint_v, text.mask, leading=keys.shape[2], site=site)

    own = None
    if not chooser.decided(q, text.mask, site):
        # The first forward of a shape measures and agrees (a collective) before any ring transfer is in flight.
        own_valid = layout.valid_keys(ring.rank, k.shape[2])
        own = own_step(k[:, :, :own_valid], v[:, :, :own_valid])
    text_parts: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * ring.size
    chunks = _ring_blocks(k, v, ring, layout)
    block, keys, values = next(chunks)  # this rank's own chunk comes first
    vis_out, vis_lse = merge_partial(None, None, *(own if own is not None else own_step(keys, values)))
    if keys.shape[2]:
        text_parts[block] = attention_with_lse(text.q, keys, values, kernel=kernel)
    for block, keys, values in chunks:
        if keys.shape[2]:
            vis_out, vis_lse = merge_partial(vis_out, vis_lse, *attention_with_lse(q, keys, values, kernel=kernel))
            text_parts[block] = attention_with_lse(text.q, keys, values, kernel=kernel)
    # Fixed merge order (text, chunk 0, chunk 1, ...): every ring rank computes bit-identical text outputs.
    text_out, text_lse = chooser.attend(text.q, text.k, text.v, text.mask, leading=0, site=("text",), record=False)
    text_out = text_out.float()
    for part in text_parts:
        if part is not None:
            text_out, text_lse = merge_partial(text_out, text_lse, *part)
    text_out = text_out * text.mask[:, None, :, None]
    return vis_out.to(q.dtype), text_out.to(q.dtype)
