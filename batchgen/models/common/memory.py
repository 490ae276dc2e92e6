"""``offload = "auto"``: keep every component on the GPU when the estimated peak fits, offload otherwise.

The estimate is pure arithmetic over numbers the caller measures (parameter bytes, the device's free memory) and
the shard's largest item, so the decision is unit-tested with given numbers and needs no GPU.

Activation peak of one DiT forward, calibrated on the H200 figures in ``bench/results/gpu-nvidia-h200.json``:
163 frames (44,520 tokens) at batch 1 peaked at 23.22 GiB over 18.68 GiB of bf16 weights, and the whole pipeline
at CFG batch 2 with ``--offload model`` at 27.3 GiB: 35.4 and 33.8 bytes per (sample x token x model width).
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATION_BYTES_PER_TOKEN_WIDTH = 36
"""Peak activation bytes per sample, visual token and unit of model width during one DiT forward (bf16)."""
HEADROOM = 0.10
"""Share of the free memory kept back for the allocator's fragmentation, cuDNN workspaces and the VAE decode."""

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryNeeds:
    """What the resident mode must hold at once (bytes)."""

    transformer_bytes: int
    vae_bytes: int
    text_encoder_bytes: int
    tokens_per_rank: int
    """Largest item's visual tokens on one rank (after the sequence-parallel split)."""
    batch_per_rank: int
    """2 with CFG on one rank, 1 with cfg degree 2 or without CFG."""
    width: int
    """The DiT's visual width (3072 for Mochi)."""

    @property
    def activation_bytes(self) -> int:
        return self.batch_per_rank * self.tokens_per_rank * self.width * ACTIVATION_BYTES_PER_TOKEN_WIDTH

    @property
    def resident_peak_bytes(self) -> int:
        """DiT and VAE stay on the GPU; T5 visits it before denoising (its peak and the DiT's never overlap)."""
        return self.transformer_bytes + self.vae_bytes + max(self.text_encoder_bytes, self.activation_bytes)


@dataclass(frozen=True)
class OffloadDecision:
    offload: bool
    reason: str


def decide_offload(mode: str, needs: MemoryNeeds | None, free_bytes: int | None) -> OffloadDecision:
    """``mode`` 'none' / 'model' are taken as given; 'auto' offloads iff the resident peak plus headroom exceeds
    ``free_bytes``. ``needs`` or ``free_bytes`` None means a CPU device: nothing to offload to."""
    if mode == "model":
        return OffloadDecision(True, "offload = 'model' requested")
    if mode == "none":
        return OffloadDecision(False, "offload = 'none' requested")
    if mode != "auto":
        raise ValueError(f"offload mode must be 'auto', 'none' or 'model', got {mode!r}")
    if needs is None or free_bytes is None:
        return OffloadDecision(False, "auto: the device is the host (CPU), nothing to offload")
    budget = int(free_bytes * (1 - HEADROOM))
    peak = needs.resident_peak_bytes
    facts = (
        f"estimated resident peak {peak / GIB:.1f} GiB (DiT {needs.transformer_bytes / GIB:.1f} + VAE "
        f"{needs.vae_bytes / GIB:.1f} + max(T5 {needs.text_encoder_bytes / GIB:.1f}, activations "
        f"{needs.activation_bytes / GIB:.1f} for {needs.batch_per_rank} x {needs.tokens_per_rank} tokens)) vs "
        f"{budget / GIB:.1f} GiB usable of {free_bytes / GIB:.1f} GiB free"
    )
    if peak <= budget:
        return OffloadDecision(False, f"auto: everything stays on the GPU: {facts}")
    return OffloadDecision(True, f"auto: offloading (components visit the GPU stage by stage): {facts}")
