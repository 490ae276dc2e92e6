"""Unified Sequence Parallelism for Mochi's joint attention, natively on torch.distributed (gloo and NCCL).

Layout per sequence-parallel rank: a contiguous slice of the visual tokens (with its RoPE slice) and the full,
replicated text stream. One attention layer:

1. Visual q/k/v of the local slice, all heads; text q/k/v on every rank (replicated, cheap: <= 256 tokens).
2. Ulysses all-to-all over the ulysses group: scatter heads, gather sequence -> this rank now holds H/u heads of
   the ulysses group's u slices (its ring "chunk").
3. Ring attention over the ring group: K/V chunks travel around the ring (batch_isend_irecv, next transfer in
   flight while the current block computes); partial results merge exactly through their log-sum-exps.
   The valid text keys/values of each sample (Mochi drops padded text tokens rather than masking them) join once,
   on each rank's own step, so every query sees them exactly once.
4. Text queries attend to the text keys and to every visual chunk; partials merge in a fixed order (text, chunk 0,
   chunk 1, ...) so all ring ranks compute bit-identical text outputs and the replicated text stream stays
   replicated. An all-gather over the ulysses group restores all heads.
5. Reverse all-to-all for the visual output. Padded text positions get a zero attention output, as in diffusers.

Every collective counts the bytes this rank sends (``COMM_STATS``), for the benchmark's measured-vs-formula check.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from batchgen.parallel.attention import attention_with_lse, merge_partial


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
class TextTokens:
    """One sample's valid text q/k/v for this rank's heads, each [1, H_local, L_valid, D]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def ring_joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    texts: list[TextTokens],
    ring: Axis,
    *,
    kernel: str = "auto",
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Joint attention of this rank's visual chunk q, k, v [B, H_local, S, D] and each sample's text tokens, over
    the whole ring. Returns (visual out [B, H_local, S, D], per-sample text out [1, H_local, L_valid, D] or None)."""
    batch = q.shape[0]
    vis_out: list[torch.Tensor | None] = [None] * batch
    vis_lse: list[torch.Tensor | None] = [None] * batch
    text_parts: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = [[None] * ring.size for _ in range(batch)]
    exchange = RingExchange(ring) if ring.size > 1 else None
    kv = torch.stack([k, v]).contiguous()
    for step in range(ring.size):
        pending = None
        if exchange is not None and step < ring.size - 1:
            pending = exchange.start(kv)
        block = (ring.rank - step) % ring.size
        for b in range(batch):
            keys, values = kv[0, b : b + 1], kv[1, b : b + 1]
            text = texts[b]
            has_text = text.k.shape[2] > 0
            if step == 0 and has_text:
                # Only valid text tokens, exactly once per query: on the step where the rank holds its own chunk.
                keys_all, values_all = torch.cat([keys, text.k], dim=2), torch.cat([values, text.v], dim=2)
            else:
                keys_all, values_all = keys, values
            out, lse = attention_with_lse(q[b : b + 1], keys_all, values_all, kernel=kernel)
            vis_out[b], vis_lse[b] = merge_partial(vis_out[b], vis_lse[b], out, lse)
            if has_text:
                text_parts[b][block] = attention_with_lse(text.q, keys, values, kernel=kernel)
        if pending is not None:
            recv, requests = pending
            for request in requests:
                request.wait()
            kv = recv
    text_out: list[torch.Tensor | None] = []
    for b, text in enumerate(texts):
        if text.k.shape[2] == 0:
            text_out.append(None)
            continue
        acc, acc_lse = attention_with_lse(text.q, text.k, text.v, kernel=kernel)
        acc = acc.float()
        for part in text_parts[b]:
            acc, acc_lse = merge_partial(acc, acc_lse, *part)
        text_out.append(acc.to(q.dtype))
    return torch.cat([o.to(q.dtype) for o in vis_out], dim=0), text_out


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


def valid_text_indices(attention_mask: torch.Tensor, b: int) -> torch.Tensor:
    return torch.nonzero(attention_mask[b].flatten(), as_tuple=False).flatten()


class USPMochiAttnProcessor:
    """Drop-in for diffusers' ``MochiAttnProcessor2_0`` on a rank that holds a slice of the visual tokens.

    Same call signature; ``hidden_states`` and ``image_rotary_emb`` are this rank's slice, the text stream is
    the full replicated one. Returns (this slice's visual output, the full text output).
    """

    def __init__(self, ulysses: Axis, ring: Axis, *, kernel: str = "auto"):
        self.ulysses = ulysses
        self.ring = ring
        self.kernel = kernel

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

        batch, text_len = encoder_hidden_states.shape[:2]
        texts, indices = [], []
        for b in range(batch):
            idx = valid_text_indices(attention_mask, b)
            indices.append(idx)
            texts.append(
                TextTokens(*(t[b : b + 1, idx, head_slice].transpose(1, 2) for t in (enc_query, enc_key, enc_value)))
            )
        vis_out, text_outs = ring_joint_attention(q, k, v, texts, self.ring, kernel=self.kernel)

        vis_out = ulysses_gather_heads(vis_out.transpose(1, 2), self.ulysses)  # [B, S_local, H, D]
        text_full = enc_query.new_zeros(batch, text_len, local_heads, enc_query.shape[-1])
        for b, out in enumerate(text_outs):
            if out is not None:
                text_full[b, indices[b]] = out[0].transpose(0, 1)
        text_full = all_gather_cat(text_full, self.ulysses, dim=2, kind="text_gather")  # [B, L, H, D]
        return project_out(attn, vis_out.flatten(2, 3), text_full.flatten(2, 3))
