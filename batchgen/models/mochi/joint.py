"""Mochi's joint attention for the whole CFG batch in one kernel call, on one process (the stock-equivalent path).

diffusers' ``MochiAttnProcessor2_0`` loops over the batch: per sample a ``nonzero`` on the text mask (a
device-to-host sync), a gather of the valid text tokens, a concat and an attention call; 48 blocks x 2 samples
make 96 syncs and 96 calls per CFG step. Here the valid text tokens are gathered once per item, before the
denoising loop (``gather_valid_text``: valid tokens first, the batch cut to its longest prompt), and every block
runs one call over [visual ; text] for the whole batch with a key-padding mask, so a shorter (or empty) prompt's
padding is never attended to. The output equals diffusers' (its compacted valid rows are our first rows, and its
zero rows our masked ones) to kernel rounding.

Path and kernel: ``batchgen.parallel.choice``. The masked call cannot use FlashAttention (cuDNN takes the mask
as a bias, else the memory-efficient kernel); per-prompt unmasked calls keep it eligible at a launch per prompt.
With ``[parallel] attention = "auto"`` the faster of the two, under the faster kernel, is measured on CUDA at the
first use of each shape; on CPU the joint call is used.
"""

from __future__ import annotations

import torch

from batchgen.models.mochi.attention import project_out, project_qkv
from batchgen.parallel.choice import AttentionChooser


def gather_valid_text(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Once per item: each sample's valid text tokens first (in order) and the batch cut to its longest prompt.

    ``embeds`` [B, L, D], ``mask`` [B, L] (bool or 0/1). Returns (embeds [B, L', D], mask [B, L'] bool) with
    L' = max(1, longest valid length): one masked slot stays when every prompt is empty, so shapes never reach 0.
    Exact for Mochi: padded text tokens are never attended to and the caption pooling is a masked mean and a
    masked attention, so their order and number change nothing. Run it on CPU tensors: it reads the lengths.
    """
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    longest = max(1, int(lengths.max()))
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
    gathered = torch.gather(embeds, 1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    return gathered, torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)


class MochiJointAttnProcessor:
    """Drop-in for diffusers' ``MochiAttnProcessor2_0`` (same signature and outputs). On the joint path one
    attention call for the whole batch per block, no host syncs; ``chooser`` (shared by every block) picks the
    path; without one, 'auto' on ``kernel``."""

    def __init__(self, *, kernel: str = "auto", chooser: AttentionChooser | None = None):
        self.chooser = chooser or AttentionChooser(kernel=kernel)

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        query, key, value, enc_query, enc_key, enc_value = project_qkv(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb
        )
        text_mask = attention_mask.bool()
        visual = query.shape[1]
        q, k, v = (
            torch.cat(pair, dim=1).transpose(1, 2) for pair in ((query, enc_query), (key, enc_key), (value, enc_value))
        )
        out, _ = self.chooser.attend(q, k, v, text_mask, leading=visual)
        out = out.transpose(1, 2)  # [B, S + L, H, D]
        text_out = out[:, visual:] * text_mask[:, :, None, None]
        return project_out(attn, out[:, :visual].flatten(2, 3), text_out.flatten(2, 3))
