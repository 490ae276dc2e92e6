"""Mochi generation in stages: T5 once per shard, then denoise and decode per item.

The stages follow diffusers' ``MochiPipeline.__call__`` step for step (same noise from the same seed, same sigma
schedule, same CFG batch layout, same scheduler), so a single-process fp32 run gives the same latents as the stock
pipeline; what differs is the split:

- ``encode_prompts``: every prompt of a shard through T5 at once (each distinct text once); the encoder visits the
  GPU for that and leaves it before denoising starts. An empty prompt is encoded as zeros, as Genmo does.
- ``denoise``: fp32 latents, sigmas and guidance; the transformer runs in the model dtype (bf16 on GPU). Under
  sequence/CFG parallelism the transformer was wrapped once by ``batchgen.parallel.apply.parallelize_transformer``
  with the same call signature, so this code is the same for every topology.
- ``decode``: the VAE with tiling and framewise decoding (causal context carried between frame groups: no seams,
  exactly 6T - 5 frames), on the group's writer rank only.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from batchgen.core.item import Item
from batchgen.models import MOCHI
from batchgen.models.common.staged import EncodedItem, StagedGenerator, Visit, fastest_attention
from batchgen.models.common.vae import enable_causal_framewise_decoding
from batchgen.models.mochi.joint import gather_valid_text
from batchgen.models.mochi.loading import MochiComponents, load_components

# Genmo's sampler (and diffusers' MochiPipeline): linear-quadratic sigma schedule with this threshold.
THRESHOLD_NOISE = 0.025
# T5 prompts per forward: bounds activation memory for big shards at no cost in throughput.
T5_BATCH = 8
# diffusers' AutoencoderKLMochi tiling defaults (pixels): 256 px tiles every 192 px, 64 px blended overlap.
DEFAULT_VAE_TILE = (256, 192)


@dataclass
class PromptEmbedding:
    embeds: torch.Tensor
    """[1, max_sequence_length, d_model], T5's dtype, on CPU between stages."""
    mask: torch.Tensor
    """[1, max_sequence_length] bool; all False for an empty prompt."""


def linear_quadratic_sigmas(steps: int, threshold_noise: float = THRESHOLD_NOISE) -> list[float]:
    """Genmo's schedule (diffusers' linear_quadratic_schedule): ``steps // 2`` linear steps down to
    ``threshold_noise``, then quadratic to 0; returned as sigmas from 1 downwards (without the final 0).
    One step has no linear part (the formula would divide by zero there): a single Euler step from 1."""
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    if steps // 2 == 0:
        return [1.0]
    return [float(s) for s in linear_quadratic_schedule(steps, threshold_noise, steps // 2)]


class MochiGenerator(StagedGenerator):
    """Implements ``batchgen.models.api.VideoGenerator`` for Mochi 1.

    Family options: ``vae_tile`` (tile, stride) in pixels, or None for untiled decoding.
    """

    spec = MOCHI
    load = staticmethod(load_components)

    def _setup_family(self, components: MochiComponents, vae_tile: tuple[int, int] | None = DEFAULT_VAE_TILE) -> None:
        self.num_heads = components.transformer.config.num_attention_heads
        # Tiled + framewise decoding: bounded memory at any resolution and length, causal context carried
        # across frame groups (no lost frames, no temporal seams), tiles blended over their overlap.
        # (batchgen.models.common.vae: diffusers' own framewise switch breaks the decoder's shapes.)
        enable_causal_framewise_decoding(self.vae, tiling=False)
        if vae_tile:
            tile, stride = vae_tile
            self.vae.enable_tiling(
                tile_sample_min_height=tile,
                tile_sample_min_width=tile,
                tile_sample_stride_height=stride,
                tile_sample_stride_width=stride,
            )
        # diffusers computes RoPE under an fp32 autocast that CPU autocast rejects (it then runs in fp32 anyway).
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")

    # ------------------------------------------------------------------------------------------------------------
    # Stages

    def _encode_texts(self, texts: list[str]) -> dict[str, PromptEmbedding]:
        """T5 in batches for the non-empty texts; an empty one is zeros, as Genmo encodes it."""
        nonempty = [t for t in texts if t != ""]
        embeddings: dict[str, PromptEmbedding] = {}
        if "" in texts:
            embeddings[""] = self._zeros_embedding()
        if nonempty:
            with Visit(self.text_encoder, self.device, enabled=True):
                for start in range(0, len(nonempty), T5_BATCH):
                    batch = nonempty[start : start + T5_BATCH]
                    embeds, masks = self._t5(batch)
                    for i, text in enumerate(batch):
                        embeddings[text] = PromptEmbedding(embeds[i : i + 1].cpu(), masks[i : i + 1].cpu())
        return embeddings

    def _t5(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = inputs.input_ids.to(self.text_encoder.device)
        mask = inputs.attention_mask.bool().to(self.text_encoder.device)
        embeds = self.text_encoder(ids, attention_mask=mask)[0]
        return embeds, mask

    def _zeros_embedding(self) -> PromptEmbedding:
        # Genmo zeroes an empty prompt's tokens and mask (diffusers: force_zeros_for_empty_prompt). With an empty
        # mask no text token reaches attention or the caption pooling, so the embedding values never matter:
        # zeros, without running T5.
        width = self.text_encoder.config.d_model
        dtype = next(self.text_encoder.parameters()).dtype
        return PromptEmbedding(
            torch.zeros(1, self.max_sequence_length, width, dtype=dtype),
            torch.zeros(1, self.max_sequence_length, dtype=torch.bool),
        )

    @torch.no_grad()
    def denoise(self, item: Item, encoded: EncodedItem | None = None) -> torch.Tensor:
        """The final fp32 latents [1, 12, T, H/8, W/8] for ``item`` (collective across a parallel group)."""
        encoded, latents = self._start_denoising(item, encoded)
        device = self.device
        use_cfg = encoded.uncond is not None
        # The CFG batch in MochiPipeline's order: [unconditional, conditional].
        prompts = [encoded.uncond, encoded.cond] if use_cfg else [encoded.cond]
        # Once per item, on the host copies: valid text tokens first, cut to the longest prompt, so the blocks
        # need neither a nonzero nor a host sync to drop padding (batchgen.models.mochi.joint).
        embeds, mask = gather_valid_text(torch.cat([p.embeds for p in prompts]), torch.cat([p.mask for p in prompts]))
        embeds, mask = embeds.to(device, self.transformer_dtype), mask.to(device)

        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(sigmas=np.array(linear_quadratic_sigmas(item.num_inference_steps)), device=device)
        scheduler.set_begin_index(0)

        for cache in self.caches:
            cache.reset()
        (transformer,) = self.transformers
        with Visit(self.components.transformer, device, enabled=self.offload), fastest_attention(device):
            loop_started = time.perf_counter()
            first_step = self._first_step_timer(0, (2 if use_cfg else 1, *latents.shape[1:]))
            for t in scheduler.timesteps:
                # Mochi's timesteps are fp32 already (MochiPipeline casts them to the latents' dtype).
                latents = self._step(
                    transformer, scheduler, t, latents, item, use_cfg, encoder_hidden_states=embeds,
                    encoder_attention_mask=mask,
                )  # fmt: skip
                first_step.step_done()
            self.last_compile_s = first_step.seconds
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # The steps alone, without the offload transfers around them: what scales with the step count.
            self.last_denoise_loop_s = time.perf_counter() - loop_started
        return latents

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """fp32 latents [1, 12, T, h, w] -> the VAE's video [1, 3, 6T - 5, 8h, 8w] in [-1, 1], checked finite."""
        config = self.vae.config
        latents = latents.to(self.device, torch.float32)
        channels = latents.shape[1]
        if config.latents_mean is not None and config.latents_std is not None:
            fp32 = partial(torch.tensor, dtype=torch.float32, device=latents.device)
            mean = fp32(config.latents_mean).view(1, channels, 1, 1, 1)
            std = fp32(config.latents_std).view(1, channels, 1, 1, 1)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        with Visit(self.vae, self.device, enabled=self.offload):
            video = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        self._check_decoded_frames(video, latents.shape[2])
        return video
