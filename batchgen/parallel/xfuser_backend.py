"""``--sp-backend xfuser``: xDiT's ``xFuserLongContextAttention`` on batchgen's process groups, for Mochi's joint
attention (``batchgen.models.mochi.attention``) and Wan's self-attention (``batchgen.models.wan.parallel``).

This is how mochi-xdit runs Mochi: each rank's visual slice is the query/key/value, the replicated valid text
tokens are the joint tensors appended at the rear (``joint_strategy="rear"``), and xDiT does the Ulysses
all-to-all and the ring attention (flash-attn kernels, CUDA only). Tensors are [B, S, H, D]; the output holds
[visual slice ; text] rows for all heads. Mochi drops padded text tokens per sample, so samples go one by one.

xDiT's attention takes no mask, so this backend can neither batch prompts of different lengths into one call (one
call and one ``nonzero`` per sample and block, as diffusers) nor pad the visual sequence: ulysses x ring must
divide every item's visual token count, and ``batchgen.core.topology.check_shapes`` says so before the
weights load. The native backend has neither limit.

xfuser needs CUDA and flash-attn, imports ``triton`` unconditionally, and with PyPI's yunchang 0.6.4 fails with
``cannot import name 'update_npu_out' from 'yunchang.ring.utils'``; the native backend has none of these needs.
"""

from __future__ import annotations

import logging

import torch

from batchgen.core.errors import InputError
from batchgen.parallel.usp import Axis

log = logging.getLogger("batchgen.parallel.xfuser_backend")

INSTALL_HINT = (
    "the xfuser backend needs CUDA, flash-attn and an xfuser/yunchang pair that import together: install torch "
    "first, then `pip install flash-attn --no-build-isolation`, then xfuser together with a yunchang whose "
    "yunchang.ring.utils provides update_npu_out (PyPI's yunchang 0.6.4 does not; install yunchang from its "
    "repository, feifeibear/long-context-attention, or an xfuser release that predates the import); or use "
    "--sp-backend native, which needs none of this"
)


def load_xfuser():
    """xDiT's attention class and yunchang's process-group registry, or an InputError saying what to install."""
    try:
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
        from yunchang.globals import PROCESS_GROUP
    except Exception as e:  # ImportError, or triton/CUDA errors raised while xfuser imports
        reason = f"{type(e).__name__}: {e}"
        if "update_npu_out" in str(e):
            reason += " (the known xfuser / PyPI yunchang 0.6.4 mismatch)"
        raise InputError(f"--sp-backend xfuser: cannot import xfuser ({reason}); {INSTALL_HINT}") from e
    return xFuserLongContextAttention, PROCESS_GROUP


def _attn_type():
    try:
        from yunchang.kernels import AttnType
    except ImportError:  # older yunchang: the constructor picks flash-attn itself
        return None
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return AttnType.TORCH
    return AttnType.FA


def setup_xfuser_groups(ulysses: Axis, ring: Axis) -> None:
    """Point yunchang's global groups at ours (xDiT's attention reads them in its constructor)."""
    _, process_group = load_xfuser()
    process_group.ULYSSES_PG = ulysses.group
    process_group.RING_PG = ring.group


def valid_text_indices(attention_mask: torch.Tensor, b: int) -> torch.Tensor:
    return torch.nonzero(attention_mask[b].flatten(), as_tuple=False).flatten()


def long_context_attention():
    """A new ``xFuserLongContextAttention`` on yunchang's groups (``setup_xfuser_groups`` first)."""
    attention_class, _ = load_xfuser()
    attn_type = _attn_type()
    return attention_class(attn_type=attn_type) if attn_type is not None else attention_class()
