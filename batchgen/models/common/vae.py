"""Exact framewise (and tiled) decoding for Mochi's causal VAE.

diffusers' ``AutoencoderKLMochi._enable_framewise_decoding()`` switches every causal conv to
``pad_mode="constant"`` after the convs were built without spatial padding, so the decoder's shapes no
longer line up (and with the default replicate mode no causal context is carried between frame groups,
which is how mochi-xdit's decode got seams and lost frames). Here each causal conv keeps the replicate
padding it was trained with and carries its last ``k - 1`` input frames to the next frame group, so a
framewise decode equals a one-shot decode: no seams, no lost frames (6T - 5 out), bounded memory.
The model code is untouched: the fix replaces the forward of the conv instances only.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _causal_forward(self, inputs: torch.Tensor, conv_cache: torch.Tensor | None = None):
    frames = inputs
    if self.time_pad:
        front = conv_cache if conv_cache is not None else inputs[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
        frames = torch.cat([front, inputs], dim=2)
        conv_cache = frames[:, :, -self.time_pad :].clone()
    else:
        conv_cache = None
    padded = F.pad(frames, (self.width_pad, self.width_pad, self.height_pad, self.height_pad, 0, 0), mode="replicate")
    return self.conv(padded), conv_cache


def enable_causal_framewise_decoding(vae, *, tiling: bool = True) -> None:
    """Make ``vae.decode`` run frame group by frame group with carried causal context (and spatial tiles if
    ``tiling``). Idempotent."""
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

    for module in vae.decoder.modules():
        if isinstance(module, CogVideoXCausalConv3d):
            if module.pad_mode != "replicate":
                raise ValueError(
                    "expected Mochi's replicate-padded causal convs; was _enable_framewise_decoding() called?"
                )
            module.forward = types.MethodType(_causal_forward, module)  # type: ignore[method-assign]  # this instance's forward, on purpose
    vae.use_framewise_decoding = True
    if tiling:
        vae.enable_tiling()
