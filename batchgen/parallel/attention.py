"""Local attention that also returns the log-sum-exp of each query's scores, and the merge of partial results.

Ring attention computes a query block against one key/value block at a time; partial outputs combine exactly
through their log-sum-exps (``merge_partial``). Every kernel here takes and returns [B, H, S, D] tensors and an
fp32 lse of shape [B, H, S] in natural log, the scale being 1/sqrt(D).

Kernels, best first:
- ``flash_attn``: flash-attn's ``flash_attn_func(..., return_attn_probs=True)`` (CUDA, fp16/bf16), when installed.
- ``cudnn``, ``flash``, ``efficient``: PyTorch's fused SDPA ops on CUDA that expose the lse.
- ``cpu_flash``: PyTorch's fused CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``).
- ``math``: plain fp32 math, chunked over queries to bound memory; runs anywhere and is the reference.

The private aten ops change shape conventions between releases (lse padded to 32 rows, an extra trailing dim), so
each fused kernel is probed once per (device, dtype, head dim) against ``math`` on a small problem before first
use; one that raises or disagrees is dropped with a warning and the next one is used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

log = logging.getLogger("batchgen.parallel.attention")

# Queries per chunk in the math kernel: bounds the [chunk, keys] score matrix (fp32) per head.
MATH_CHUNK = 1024

KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = 1.0 / math.sqrt(q.shape[-1])
    kf = k.float().transpose(-1, -2)
    vf = v.float()
    outs, lses = [], []
    for start in range(0, q.shape[2], MATH_CHUNK):
        scores = torch.matmul(q[:, :, start : start + MATH_CHUNK].float(), kf) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vf))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def _lse_to_bhs(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # Fused kernels return [B, H, S], [B, H, S, 1] or [B, H, round_up(S, 32)]; normalise to [B, H, S] fp32.
    b, h, s, _ = q.shape
    return lse.reshape(b, h, -1)[..., :s].float()


def _cpu_flash(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out, _lse_to_bhs(lse, q)


def _flash(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    return out, _lse_to_bhs(lse, q)


def _efficient(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    return out, _lse_to_bhs(lse, q)


def _cudnn(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    return out, _lse_to_bhs(lse, q)


def _flash_attn(q, k, v):
    from flash_attn import flash_attn_func  # optional dependency: only reached when importable

    out, lse, _ = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0, causal=False, return_attn_probs=True
    )
    return out.transpose(1, 2), _lse_to_bhs(lse, q)


def _flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # a broken CUDA extension raises more than ImportError
        return False
    return True


_KERNELS: dict[str, KernelFn] = {
    "flash_attn": _flash_attn,
    "cudnn": _cudnn,
    "flash": _flash,
    "efficient": _efficient,
    "cpu_flash": _cpu_flash,
    "math": _math,
}
_CUDA_ORDER = ("flash_attn", "cudnn", "flash", "efficient", "math")
_CPU_ORDER = ("cpu_flash", "math")
_probe_cache: dict[tuple[str, str, torch.dtype, int], bool] = {}


def _candidates(device: torch.device | str) -> tuple[str, ...]:
    kind = torch.device(device).type
    if kind == "cuda":
        return tuple(k for k in _CUDA_ORDER if k != "flash_attn" or _flash_attn_installed())
    if kind == "cpu":
        return _CPU_ORDER
    return ("math",)


def _probe(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    key = (name, str(device), dtype, head_dim)
    if key in _probe_cache:
        return _probe_cache[key]
    ok = True
    if name != "math":
        gen = torch.Generator().manual_seed(0)
        # Uneven lengths (not multiples of 32/64) catch padded-lse layouts.
        q, k, v = (torch.randn(1, 2, n, head_dim, generator=gen).to(device, dtype) for n in (37, 45, 45))
        try:
            out, lse = _KERNELS[name](q, k, v)
            ref_out, ref_lse = _math(q.float(), k.float(), v.float())
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            ok = (
                out.shape == q.shape
                and lse.shape == q.shape[:3]
                and (out.float() - ref_out).abs().max().item() <= tol
                and (lse - ref_lse).abs().max().item() <= tol
            )
            if not ok:
                log.warning(
                    "attention kernel %s disagrees with the math kernel on %s %s; not using it", name, device, dtype
                )
        except Exception as e:  # unsupported dtype, head dim, GPU architecture or build
            log.debug("attention kernel %s unavailable on %s %s d=%d: %s", name, device, dtype, head_dim, e)
            ok = False
    _probe_cache[key] = ok
    return ok


def list_kernels(device: torch.device | str, dtype: torch.dtype = torch.float32, head_dim: int = 64) -> list[str]:
    """Kernels that work on ``device`` for ``dtype`` and ``head_dim``, best first (each probed against math)."""
    device = torch.device(device)
    return [name for name in _candidates(device) if _probe(name, device, dtype, head_dim)]


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    if kernel == "auto":
        return list_kernels(device, dtype, head_dim)[0]
    if kernel not in _KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; known: {', '.join(_KERNELS)}")
    return kernel


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [B, H, Sq, D] over k, v [B, H, Sk, D]: (out [B, H, Sq, D] in q's dtype,
    lse [B, H, Sq] fp32). ``kernel``: 'auto' (best working) or a name from ``list_kernels``."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q [B,H,Sq,D], k = v [B,H,Sk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    name = resolve_kernel(kernel, q.device, q.dtype, q.shape[-1])
    return _KERNELS[name](q.contiguous(), k.contiguous(), v.contiguous())


def merge_partial(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets. ``out`` accumulates in fp32; None starts the accumulation."""
    if out is None:
        return block_out.float(), block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    merged = out * torch.exp(lse - new_lse).unsqueeze(-1) + block_out.float() * torch.exp(
        block_lse - new_lse
    ).unsqueeze(-1)
    return merged, new_lse
