"""TEST-ONLY stand-in for the slice of xfuser/yunchang that ``batchgen.parallel.xfuser_backend`` calls.

xfuser cannot import on CPU (CUDA, triton, flash-attn), so the CPU test installs these fake modules in
``sys.modules`` of its worker processes:

- ``yunchang.globals.PROCESS_GROUP`` (ULYSSES_PG / RING_PG) and ``yunchang.kernels.AttnType``;
- ``xfuser.core.long_ctx_attention.xFuserLongContextAttention`` with LongContextAttention's semantics as xDiT
  implements them: with ``joint_strategy="rear"`` the joint (text) query is appended to the local query BEFORE
  the all-to-all, the joint key/value keep all heads and are sliced to this ulysses rank's heads, Ulysses
  all-to-all (scatter heads, gather sequence) on [B, S, H, D], ring attention with the joint K/V joining once,
  then the inverse all-to-all, returning [B, S_local + L, H, D].

What a pass honestly verifies: the backend's plumbing -- the [B, S, H, D] layout it passes, joint tensors with
all heads and only the valid text tokens per sample, the rear strategy, where it reads the visual and text rows
back from the output, padded text rows left at zero, and that yunchang's global groups are set to ours.
What it cannot verify: xDiT's own kernels and ring code, its numerics in bf16 with flash-attn, and whether a
given xfuser/yunchang release pair accepts these arguments; that needs a GPU run with the real packages.
The Ulysses all-to-all and the LSE merge below reuse the native helpers, written independently of the native
processor's text handling (text queries here ride through the all-to-all, as in xDiT; the native processor
computes them on the side and all-gathers heads), so the comparison is not the native code against itself.
"""

from __future__ import annotations

import enum
import sys
import types

import torch
import torch.distributed as dist

from batchgen.parallel.attention import attention_with_lse, merge_partial
from batchgen.parallel.usp import Axis, RingExchange, ulysses_gather_heads, ulysses_scatter_heads


class _ProcessGroups:
    ULYSSES_PG = None
    RING_PG = None


PROCESS_GROUP = _ProcessGroups()


class AttnType(enum.Enum):
    FA = "fa"
    TORCH = "torch"


def _axis(group) -> Axis:
    return Axis(
        group=group,
        size=dist.get_world_size(group),
        rank=dist.get_rank(group),
        ranks=tuple(dist.get_process_group_ranks(group)),
    )


class xFuserLongContextAttention(torch.nn.Module):  # noqa: N801 -- the name xDiT uses
    def __init__(
        self,
        scatter_idx: int = 2,
        gather_idx: int = 1,
        ring_impl_type: str = "basic",
        use_pack_qkv: bool = False,
        use_kv_cache: bool = False,
        use_sync: bool = False,
        attn_type=None,
        attn_processor=None,
    ):
        super().__init__()
        if PROCESS_GROUP.ULYSSES_PG is None or PROCESS_GROUP.RING_PG is None:
            raise RuntimeError("yunchang process groups not set before constructing the attention layer")
        self.ulysses = _axis(PROCESS_GROUP.ULYSSES_PG)
        self.ring = _axis(PROCESS_GROUP.RING_PG)

    def forward(
        self,
        attn,
        query,
        key,
        value,
        *,
        joint_tensor_query=None,
        joint_tensor_key=None,
        joint_tensor_value=None,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        joint_strategy="none",
    ):
        joint = [joint_tensor_query, joint_tensor_key, joint_tensor_value]
        if any(t is None for t in joint) and not all(t is None for t in joint):
            raise ValueError("joint tensors must all be given or all be None")
        is_joint = joint_tensor_query is not None
        if is_joint:
            if joint_strategy != "rear":
                raise ValueError(f"shim implements joint_strategy='rear' only, got {joint_strategy!r}")
            for t in joint:
                if t.ndim != 4 or t.shape[0] != query.shape[0] or t.shape[2:] != query.shape[2:]:
                    raise ValueError(f"joint tensor {tuple(t.shape)} does not match query {tuple(query.shape)}")
            query = torch.cat([query, joint_tensor_query], dim=1)
            per_rank = joint_tensor_key.shape[-2] // self.ulysses.size
            heads = slice(self.ulysses.rank * per_rank, (self.ulysses.rank + 1) * per_rank)
            joint_key, joint_value = joint_tensor_key[:, :, heads], joint_tensor_value[:, :, heads]
        # [B, S, H, D] -> [B, u*S, H/u, D]; kernel layout [B, H, S, D]
        q, k, v = (ulysses_scatter_heads(t, self.ulysses).transpose(1, 2) for t in (query, key, value))
        out = lse = None
        kv = torch.stack([k, v]).contiguous()
        exchange = RingExchange(self.ring) if self.ring.size > 1 else None
        for step in range(self.ring.size):
            pending = exchange.start(kv) if exchange and step < self.ring.size - 1 else None
            keys, values = kv[0], kv[1]
            if is_joint and step == self.ring.size - 1:  # "rear": joint K/V join at the last step
                keys = torch.cat([keys, joint_key.transpose(1, 2)], dim=2)
                values = torch.cat([values, joint_value.transpose(1, 2)], dim=2)
            out, lse = merge_partial(out, lse, *attention_with_lse(q, keys, values, kernel="math"))
            if pending is not None:
                recv, requests = pending
                for request in requests:
                    request.wait()
                kv = recv
        return ulysses_gather_heads(out.to(query.dtype).transpose(1, 2), self.ulysses)


def install() -> None:
    """Register the fake packages (idempotent). Call in the process that will build the backend."""
    yunchang = types.ModuleType("yunchang")
    globals_module = types.ModuleType("yunchang.globals")
    globals_module.PROCESS_GROUP = PROCESS_GROUP
    kernels = types.ModuleType("yunchang.kernels")
    kernels.AttnType = AttnType
    xfuser = types.ModuleType("xfuser")
    core = types.ModuleType("xfuser.core")
    long_ctx = types.ModuleType("xfuser.core.long_ctx_attention")
    long_ctx.xFuserLongContextAttention = xFuserLongContextAttention
    sys.modules.update(
        {
            "yunchang": yunchang,
            "yunchang.globals": globals_module,
            "yunchang.kernels": kernels,
            "xfuser": xfuser,
            "xfuser.core": core,
            "xfuser.core.long_ctx_attention": long_ctx,
        }
    )
