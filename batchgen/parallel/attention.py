"""Local attention that also returns the log-sum-exp of each query's scores, and the merge of partial results.

Ring attention computes a query block against one key/value block at a time; partial outputs combine exactly
through their log-sum-exps (``merge_partial``). Every kernel here takes and returns [B, H, S, D] tensors and an
fp32 lse of shape [B, H, S] in natural log, the scale being 1/sqrt(D).

Kernels, best first:
- ``flash_attn``: flash-attn's ``flash_attn_func(..., return_attn_probs=True)`` (CUDA, fp16/bf16), when installed.
- ``cudnn``, ``flash``, ``efficient``: PyTorch's fused SDPA ops on CUDA that expose the lse.
- ``cpu_flash``: PyTorch's fused CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``).
- ``math``: plain fp32 math, chunked over queries to bound memory; runs anywhere and is the reference.

A key-padding mask (``key_mask`` [B, Sk], True = attend) lets one call serve a batch whose samples have different
numbers of valid keys (the CFG pair's prompts). It reaches the kernels as an additive bias; ``flash_attn`` and
``flash`` take none, so masked calls skip them (PyTorch's own dispatcher does the same: ``can_use_flash_attention``
in aten/src/ATen/native/transformers/cuda/sdp_utils.cpp checks ``check_for_attn_mask``, while
``can_use_cudnn_attention`` only checks the mask's shape). cuDNN gets a finite -65504 instead of -inf, as PyTorch's
``convert_boolean_attn_mask_cudnn`` (aten/src/ATen/native/transformers/attention.cpp) does. Kernels disagree about
a row whose keys are all masked (0, NaN, or an unmasked result under cuDNN's finite bias), so such rows are set to
out 0 and lse -inf here: a block without valid keys then weighs nothing in ``merge_partial``.

The private aten ops change shape conventions between releases (lse padded to 32 rows, an extra trailing dim), and
a masked kernel that ignores its mask (pytorch/pytorch#177842, cuDNN) would be silently wrong, so each fused kernel
is probed once per (device, dtype, head dim, masked or not) against ``math`` on a small problem before first use;
one that raises or disagrees is dropped with a warning and the next one is used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

log = logging.getLogger("batchgen.parallel.attention")

# Queries per chunk in the math kernel: bounds the [chunk, keys] score matrix (fp32) per head.
MATH_CHUNK = 1024

# What cuDNN gets for a masked key (PyTorch's convert_boolean_attn_mask_cudnn: -inf misbehaves there).
CUDNN_MASKED = -65504.0

KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
    scale = 1.0 / math.sqrt(q.shape[-1])
    kf = k.float().transpose(-1, -2)
    vf = v.float()
    outs, lses = [], []
    for start in range(0, q.shape[2], MATH_CHUNK):
        scores = torch.matmul(q[:, :, start : start + MATH_CHUNK].float(), kf) * scale
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], -math.inf)
        lse = torch.logsumexp(scores, dim=-1)
        # A row with every key masked has lse -inf; subtracting 0 instead keeps its weights 0 rather than NaN.
        shift = torch.where(torch.isneginf(lse), 0.0, lse)
        outs.append(torch.matmul(torch.exp(scores - shift.unsqueeze(-1)), vf))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def _bias(key_mask: torch.Tensor | None, q: torch.Tensor, masked_value: float = -math.inf) -> torch.Tensor | None:
    """Additive [B, H, Sq, Sk] bias in q's dtype: a broadcast view of [B, 1, 1, Sk] (no [Sq, Sk] copy) whose rows
    start 16-element aligned, as PyTorch's SDPA prepares masks for the memory-efficient kernel (pad_bias)."""
    if key_mask is None:
        return None
    b, h, sq, _ = q.shape
    sk = key_mask.shape[-1]
    aligned = -(-sk // 16) * 16
    bias = torch.zeros(b, 1, 1, aligned, dtype=q.dtype, device=q.device)[..., :sk]
    return bias.masked_fill(~key_mask[:, None, None, :], masked_value).expand(b, h, sq, sk)


def _lse_to_bhs(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # Fused kernels return [B, H, S], [B, H, S, 1] or [B, H, round_up(S, 32)]; normalise to [B, H, S] fp32.
    b, h, s, _ = q.shape
    return lse.reshape(b, h, -1)[..., :s].float()


def _cpu_flash(q, k, v, key_mask=None):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=_bias(key_mask, q))
    return out, _lse_to_bhs(lse, q)


# flash and flash_attn take no mask: resolve_kernel never hands them a masked call.
def _flash(q, k, v, key_mask=None):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    return out, _lse_to_bhs(lse, q)


def _efficient(q, k, v, key_mask=None):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, _bias(key_mask, q), True)[:2]
    return out, _lse_to_bhs(lse, q)


def _cudnn(q, k, v, key_mask=None):
    bias = _bias(key_mask, q, CUDNN_MASKED)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True)[:2]
    return out, _lse_to_bhs(lse, q)


def _flash_attn(q, k, v, key_mask=None):
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
_UNMASKABLE = ("flash_attn", "flash")
_probe_cache: dict[tuple[str, str, torch.dtype, int, bool], bool] = {}


def _candidates(device: torch.device | str, masked: bool) -> tuple[str, ...]:
    kind = torch.device(device).type
    if kind == "cuda":
        names = tuple(k for k in _CUDA_ORDER if k != "flash_attn" or _flash_attn_installed())
    elif kind == "cpu":
        names = _CPU_ORDER
    else:
        names = ("math",)
    return tuple(k for k in names if not (masked and k in _UNMASKABLE))


def _probe_inputs(device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool):
    gen = torch.Generator().manual_seed(0)
    # Uneven lengths (not multiples of 32/64) catch padded-lse layouts; two samples with different valid key
    # counts catch a kernel that ignores or misplaces the mask.
    q, k, v = (torch.randn(2, 2, n, head_dim, generator=gen).to(device, dtype) for n in (37, 45, 45))
    key_mask = None
    if masked:
        key_mask = torch.ones(2, 45, dtype=torch.bool)
        key_mask[0, 40:] = False
        key_mask[1, 20:] = False
        key_mask = key_mask.to(device)
    return q, k, v, key_mask


def _probe(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool) -> bool:
    key = (name, str(device), dtype, head_dim, masked)
    if key in _probe_cache:
        return _probe_cache[key]
    ok = True
    if name != "math":
        q, k, v, key_mask = _probe_inputs(device, dtype, head_dim, masked)
        try:
            out, lse = _KERNELS[name](q, k, v, key_mask)
            ref_out, ref_lse = _math(q.float(), k.float(), v.float(), key_mask)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            ok = (
                out.shape == q.shape
                and lse.shape == q.shape[:3]
                and (out.float() - ref_out).abs().max().item() <= tol
                and (lse - ref_lse).abs().max().item() <= tol
            )
            if not ok:
                log.warning(
                    "attention kernel %s disagrees with the math kernel on %s %s%s; not using it",
                    name, device, dtype, " with a key mask" if masked else "",
                )  # fmt: skip
        except Exception as e:  # unsupported dtype, head dim, mask, GPU architecture or build
            log.debug("attention kernel %s unavailable on %s %s d=%d: %s", name, device, dtype, head_dim, e)
            ok = False
    _probe_cache[key] = ok
    return ok


def list_kernels(
    device: torch.device | str, dtype: torch.dtype = torch.float32, head_dim: int = 64, *, masked: bool = False
) -> list[str]:
    """Kernels that work on ``device`` for ``dtype`` and ``head_dim`` (with a key mask when ``masked``), best
    first (each probed against math)."""
    device = torch.device(device)
    return [name for name in _candidates(device, masked) if _probe(name, device, dtype, head_dim, masked)]


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool = False) -> str:
    """'auto' -> the best working kernel; a kernel that takes no mask gives way to the best one that does."""
    if kernel == "auto" or (masked and kernel in _UNMASKABLE):
        return list_kernels(device, dtype, head_dim, masked=masked)[0]
    if kernel not in _KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; known: {', '.join(_KERNELS)}")
    return kernel


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [B, H, Sq, D] over k, v [B, H, Sk, D]: (out [B, H, Sq, D] in q's dtype,
    lse [B, H, Sq] fp32). ``key_mask`` [B, Sk] bool: keys each sample may attend to (None: all). A sample with
    no valid key gets out 0 and lse -inf. ``kernel``: 'auto' (best working) or a name from ``list_kernels``."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q [B,H,Sq,D], k = v [B,H,Sk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if key_mask is not None and key_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_mask must be [B, Sk] = {(k.shape[0], k.shape[2])}, got {tuple(key_mask.shape)}")
    name = resolve_kernel(kernel, q.device, q.dtype, q.shape[-1], masked=key_mask is not None)
    out, lse = _KERNELS[name](q.contiguous(), k.contiguous(), v.contiguous(), key_mask)
    if key_mask is None:
        return out, lse
    # In place on the kernel's fresh outputs: a broadcast [B, 1, 1] condition, no copy of out, no host sync.
    empty = ~key_mask.any(dim=-1)[:, None, None]
    return out.masked_fill_(empty.unsqueeze(-1), 0.0), lse.masked_fill_(empty, -math.inf)


def merge_partial(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets. ``out`` accumulates in fp32; None starts the accumulation.

    With lse_i = log sum_{keys of i} exp(s), the merged lse is logaddexp(lse_1, lse_2) and each partial output
    weighs exp(lse_i - lse): exactly softmax over the union. A masked key adds exp(-inf) = 0 to its block's sum, so
    it shifts neither lse; a block with no valid key (lse -inf) weighs exp(-inf) = 0. Only when neither side has
    a key is the result undefined (-inf - -inf); its weights are taken as 0 so the row stays 0, not NaN.
    """
    if out is None or lse is None:
        return block_out.float(), block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    keep = torch.exp(lse - new_lse).nan_to_num(0.0).unsqueeze(-1)
    take = torch.exp(block_lse - new_lse).nan_to_num(0.0).unsqueeze(-1)
    return out * keep + block_out.float() * take, new_lse
