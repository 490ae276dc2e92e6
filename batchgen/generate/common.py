"""Helpers every family's generator shares: device choice, offload visits, the SDPA backend order, finiteness
checks before the uint8 cast, and parameter byte counts for the offload decision."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from batchgen.config import ParallelConfig
from batchgen.parallel.context import ProcessContext
from batchgen.quality import NonFiniteError, describe_non_finite


def fastest_attention(device: torch.device):
    """On CUDA, let SDPA try cuDNN's fused attention first: PyTorch's default order puts FlashAttention-2 first,
    and on an H200 cuDNN ran Mochi's 163-frame forward in 3.80 s against flash's 5.01 s
    (bench/results/gpu-nvidia-h200.json). Masked calls that cuDNN refuses fall through to the next backend."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        order.insert(0, SDPBackend.CUDNN_ATTENTION)
    return sdpa_kernel(order, set_priority=True)


class Visit:
    """Move a module to ``device`` for a block and back to host memory afterwards (when ``enabled``)."""

    def __init__(self, module, device: torch.device, enabled: bool):
        self.module, self.device, self.enabled = module, device, enabled and device.type != "cpu"

    def __enter__(self):
        if self.enabled:
            self.module.to(self.device)
        return self.module

    def __exit__(self, *exc):
        if self.enabled:
            self.module.to("cpu")
            torch.cuda.empty_cache()
        return False


def require_finite(tensor: torch.Tensor, what: str) -> None:
    """NonFiniteError before the uint8 cast, which would turn NaN into black pixels."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        total, nan = tensor.numel(), int(torch.isnan(tensor).sum())
        raise NonFiniteError(describe_non_finite(what, total, nan, total - nan - int(finite.sum())))


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def device_bytes(module, device: torch.device) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type == device.type)


def pick_device(device: str | None, context: ProcessContext | None) -> str:
    if device:
        return str(device)
    context_device = getattr(context, "device", None)
    if context_device is not None:
        return str(context_device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def uint8_frames(video: torch.Tensor) -> np.ndarray:
    """The VAE's [1, 3, F, H, W] in [-1, 1] -> uint8 RGB frames [F, H, W, 3], as diffusers' video processor (which
    then truncates; rounding is the unbiased choice)."""
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def parallel_facts(context: ProcessContext, parallel: ParallelConfig, offloaded: bool) -> dict[str, Any]:
    """The sidecar's ``parallel`` facts: world size, offload, compile and the topology's degrees."""
    facts: dict[str, Any] = {
        "world_size": context.world_size,
        "offload": parallel.offload,
        "offloaded": offloaded,
        "compile": parallel.compile,
    }
    topology = getattr(context, "topology", None)
    if topology is not None:
        for name in ("dp", "cfg", "ulysses", "ring"):
            facts[name] = getattr(topology, name, None)
        facts["sp_backend"] = parallel.sp_backend
    return facts
