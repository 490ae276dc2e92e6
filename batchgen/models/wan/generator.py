"""Wan 2.1 / 2.2 text-to-video generation in stages: UMT5 once per shard, then denoise and decode per item.

The stages follow diffusers' ``WanPipeline.__call__`` step for step (same noise from the same seed, same scheduler
from the model's config, same guidance, same expert switch), so a single-process fp32 run gives the stock
pipeline's latents; what differs is the split:

- ``encode_prompts``: every distinct text of a shard through UMT5 at once (WanPipeline's ``prompt_clean``, 512
  tokens, each embedding cut to its prompt's length and zero-padded). The negative prompt is encoded even when
  empty, as WanPipeline does: Wan's cross-attention has no mask, so an empty text's padding rows still matter.
- ``denoise``: fp32 latents and sigmas; the CFG batch [uncond, cond] in one transformer call per step (WanPipeline
  makes two calls; one batched call is equal to rounding and is what CFG parallelism splits). Wan 2.2's two experts
  switch at ``boundary_ratio * num_train_timesteps`` with the same guidance for both (WanPipeline's default when
  ``guidance_scale_2`` is None); with offload each expert visits the GPU only for its own steps.
- ``decode``: ``AutoencoderKLWan`` (causal, frame by frame with its own cache) on the group's writer rank only.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from batchgen.core.errors import ConfigError
from batchgen.core.item import Item
from batchgen.models import WAN
from batchgen.models.common.staged import EncodedItem, StagedGenerator, Visit, fastest_attention
from batchgen.models.wan.loading import WanComponents, load_wan_components

# UMT5 prompts per forward: bounds activation memory for big shards at no cost in throughput.
TEXT_BATCH = 8


class WanGenerator(StagedGenerator):
    """Implements ``batchgen.models.api.VideoGenerator`` for Wan 2.1 and 2.2 (one or two experts)."""

    spec = WAN
    load = staticmethod(load_wan_components)

    def _setup_family(self, components: WanComponents) -> None:
        if not 1 <= self.max_sequence_length <= WAN.text_length:
            raise ConfigError(
                f"max_sequence_length must be between 1 and {WAN.text_length}, got {self.max_sequence_length}"
            )
        self.scheduler_class = type(components.scheduler)
        # With two experts, the switch point in training timesteps (WanPipeline: boundary_ratio x 1000).
        self.boundary_timestep = (
            components.boundary_ratio * self.scheduler_config.num_train_timesteps
            if components.boundary_ratio is not None and components.transformer_2 is not None
            else None
        )

    # ------------------------------------------------------------------------------------------------------------
    # Stages

    def _encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """UMT5 in batches: [1, max_sequence_length, text width] per text, on CPU."""
        embeddings: dict[str, torch.Tensor] = {}
        with Visit(self.text_encoder, self.device, enabled=True):
            for start in range(0, len(texts), TEXT_BATCH):
                batch = texts[start : start + TEXT_BATCH]
                embeds = self._umt5(batch)
                embeddings.update((text, embeds[i : i + 1].cpu()) for i, text in enumerate(batch))
        return embeddings

    def _umt5(self, texts: list[str]) -> torch.Tensor:
        """WanPipeline._get_t5_prompt_embeds for a batch: cleaned texts, embeddings zeroed past each text's tokens."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        inputs = self.tokenizer(
            [prompt_clean(t) for t in texts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        mask = inputs.attention_mask.to(device)
        embeds = self.text_encoder(inputs.input_ids.to(device), mask).last_hidden_state
        return embeds.masked_fill(~mask.bool().unsqueeze(-1), 0.0)

    @torch.no_grad()
    def denoise(self, item: Item, encoded: EncodedItem | None = None) -> torch.Tensor:
        """The final fp32 latents [1, 16, T, H/8, W/8] for ``item`` (collective across a parallel group)."""
        encoded, latents = self._start_denoising(item, encoded)
        device = self.device
        texts = [encoded.uncond, encoded.cond] if encoded.uncond is not None else [encoded.cond]
        embeds = torch.cat(texts).to(device, self.transformer_dtype)

        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(item.num_inference_steps, device=device)
        scheduler.set_begin_index(0)
        for cache in self.caches:
            cache.reset()
        self.last_compile_s = 0.0
        loop_started = time.perf_counter()
        with fastest_attention(device):
            for expert, timesteps in self._expert_stages(scheduler.timesteps):
                with Visit(self.components.experts[expert], device, enabled=self.offload):
                    latents = self._steps(expert, scheduler, timesteps, latents, embeds, item)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.last_denoise_loop_s = time.perf_counter() - loop_started
        return latents

    def _expert_stages(self, timesteps: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(expert index, its consecutive timesteps): the high-noise expert for t >= boundary, then the other."""
        if self.boundary_timestep is None:
            return [(0, timesteps)]
        high = int((timesteps >= self.boundary_timestep).sum())
        return [(expert, part) for expert, part in ((0, timesteps[:high]), (1, timesteps[high:])) if len(part)]

    def _steps(self, expert: int, scheduler, timesteps, latents, embeds, item: Item) -> torch.Tensor:
        use_cfg = embeds.shape[0] == 2
        first_step = self._first_step_timer(expert, (embeds.shape[0], *latents.shape[1:]))
        for t in timesteps:
            latents = self._step(
                self.transformers[expert], scheduler, t, latents, item, use_cfg, encoder_hidden_states=embeds
            )
            first_step.step_done()
        self.last_compile_s += first_step.seconds
        return latents

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """fp32 latents [1, 16, T, h, w] -> the VAE's video [1, 3, 4T - 3, 8h, 8w] in [-1, 1], checked finite."""
        config = self.vae.config
        fp32 = partial(torch.tensor, dtype=torch.float32, device=self.device)
        mean = fp32(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        # WanPipeline's arithmetic: divide by the reciprocal of the std (bit-equal to its decode input).
        inverse_std = 1.0 / fp32(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        latents = latents.to(self.device, torch.float32) / inverse_std + mean
        with Visit(self.vae, self.device, enabled=self.offload):
            video = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        self._check_decoded_frames(video, latents.shape[2])
        return video
