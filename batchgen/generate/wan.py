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

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchgen.config import ParallelConfig
from batchgen.errors import ConfigError, InputError
from batchgen.generate.api import GeneratedVideo
from batchgen.generate.common import (
    Visit,
    device_bytes,
    fastest_attention,
    parallel_facts,
    param_bytes,
    pick_device,
    require_finite,
    uint8_frames,
)
from batchgen.generate.loading import fingerprint_model_dir, resolve_dtype
from batchgen.generate.wan_loading import WanComponents, load_wan_components
from batchgen.item import Item
from batchgen.models import WAN, uses_cfg
from batchgen.parallel.context import ProcessContext, SingleProcess

log = logging.getLogger("batchgen.generate.wan")

# UMT5 prompts per forward: bounds activation memory for big shards at no cost in throughput.
TEXT_BATCH = 8
DEFAULT_PARALLEL = ParallelConfig()  # frozen: safe as a shared default


@dataclass
class EncodedItem:
    cond: torch.Tensor
    """[1, max_sequence_length, text width], UMT5's dtype, on CPU between stages."""
    uncond: torch.Tensor | None
    """None when the item does not use classifier-free guidance."""
    text_encode_s: float
    """This item's share of the shard's UMT5 time."""
    texts: tuple[str, str | None]
    """(prompt, negative prompt or None without CFG): what was encoded, checked before use."""


class WanGenerator:
    """Implements ``batchgen.generate.api.VideoGenerator`` for Wan 2.1 and 2.2 (one or two experts)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        context: ProcessContext | None = None,
        parallel: ParallelConfig = DEFAULT_PARALLEL,
        device: str | None = None,
        dtype: str = "auto",
        max_sequence_length: int = WAN.text_length,
    ):
        device = pick_device(device, context)
        # With offload (or until 'auto' has decided) the weights wait in host memory.
        on_host = parallel.offload != "none" and torch.device(device).type != "cpu"
        components = load_wan_components(
            model_dir, dtype=resolve_dtype(dtype, device), device="cpu" if on_host else device
        )
        identity = {"path": str(model_dir), "fingerprint": fingerprint_model_dir(model_dir)}
        self._setup(components, context, parallel, device, identity, max_sequence_length)

    @classmethod
    def from_components(
        cls,
        components: WanComponents,
        *,
        context: ProcessContext | None = None,
        parallel: ParallelConfig = DEFAULT_PARALLEL,
        device: str | None = None,
        model_identity: dict[str, Any] | None = None,
        max_sequence_length: int = WAN.text_length,
    ) -> WanGenerator:
        """A generator over components already in memory (e.g. a full-size random model for a benchmark)."""
        self = cls.__new__(cls)
        identity = model_identity or {"path": f"<{components.layout}>", "fingerprint": ""}
        self._setup(components, context, parallel, pick_device(device, context), identity, max_sequence_length)
        return self

    def _setup(self, components: WanComponents, context, parallel, device, identity, max_sequence_length) -> None:
        if not 1 <= max_sequence_length <= WAN.text_length:
            raise ConfigError(f"max_sequence_length must be between 1 and {WAN.text_length}, got {max_sequence_length}")
        self.components = components
        self.context = context or SingleProcess()
        self.parallel = parallel
        self.device = torch.device(device)
        self.offload = parallel.offload != "none" and self.device.type != "cpu"
        self.offload_reason = ""
        self._placed_for_activation = -1
        """Activation bytes of the largest item the current 'auto' placement was decided for."""
        self.model_identity = identity
        self.max_sequence_length = max_sequence_length
        self.last_denoise_loop_s = 0.0
        self.last_compile_s = 0.0
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.vae = components.vae
        self.scheduler_config = components.scheduler.config
        self.scheduler_class = type(components.scheduler)
        experts = components.experts
        # The compute dtype is the projections'; Wan keeps RoPE, time embedding, modulation and norms in fp32.
        self.transformer_dtype = experts[0].proj_out.weight.dtype
        self.latent_channels = experts[0].config.in_channels
        # With two experts, the switch point in training timesteps (WanPipeline: boundary_ratio x 1000).
        self.boundary_timestep = (
            components.boundary_ratio * self.scheduler_config.num_train_timesteps
            if components.boundary_ratio is not None and components.transformer_2 is not None
            else None
        )

        # With offload the experts and VAE wait in host memory and visit the GPU only while they run; 'auto' leaves
        # them where they are until the first items are known (``_place_for``).
        if parallel.offload != "auto":
            self._place(torch.device("cpu") if self.offload else self.device)
        # UMT5 waits in host memory between shards: it is needed once per shard, the experts for every step.
        self.text_encoder.to("cpu")

        self.topology = getattr(self.context, "topology", None)
        from batchgen.parallel.apply import parallelize_transformer

        self.transformers = [parallelize_transformer(t, self.context, plan=WAN.parallel_plan) for t in experts]
        self._install_speedups(experts)
        self._encoded: dict[str, EncodedItem] = {}

    def _install_speedups(self, experts: list) -> None:
        """Per expert: FP8 linears (when the gate passes), compiled regions, then a first-block cache (each expert
        its own: the low-noise expert's first step computes every block)."""
        self.fp8_facts = None
        if self.parallel.fp8:
            from batchgen.generate.fp8 import enable_fp8

            self.fp8_facts = [enable_fp8(expert, self.device, context=self.context) for expert in experts]
        self.compiled = None
        if self.parallel.compile:
            from batchgen.generate.compile import compile_blocks

            self.compiled = [compile_blocks(expert) for expert in experts]
        self.caches = None
        if self.parallel.cache_threshold > 0:
            from batchgen.generate.cache import FirstBlockCache, group_axes

            axes = group_axes(self.context)
            self.caches = [
                FirstBlockCache(expert, self.parallel.cache_threshold, axes, plan=WAN.parallel_plan)
                for expert in experts
            ]

    # ------------------------------------------------------------------------------------------------------------
    # VideoGenerator

    def prepare(self, items: Sequence[Item]) -> None:
        """Encode every prompt of the shard now (UMT5 once), replacing the previous shard's embeddings."""
        self._encoded = {}
        if items:
            self._place_for(items)
            self._encoded = self.encode_prompts(items)

    def generate(self, item: Item) -> GeneratedVideo | None:
        encoded = self._embeddings_for(item)
        started = time.perf_counter()
        latents = self.denoise(item, encoded)
        denoise_s = time.perf_counter() - started
        if not self.context.is_writer:
            return None
        started = time.perf_counter()
        frames = self.decode(latents)
        decode_s = time.perf_counter() - started
        video = GeneratedVideo(
            frames=frames,
            timings={
                "text_encode": round(encoded.text_encode_s, 4),
                "denoise": round(denoise_s, 4),
                "denoise_loop": round(self.last_denoise_loop_s, 4),
                "decode": round(decode_s, 4),
            },
            extra={
                "parallel": parallel_facts(self.context, self.parallel, self.offload),
                "dtype": str(self.transformer_dtype).replace("torch.", ""),
            },
        )
        if self.compiled is not None:
            # The first step of each expert on a new shape compiles; 0 for every later item of that shape.
            video.timings["compile"] = round(self.last_compile_s, 4)
        # One entry per expert, as a list for two experts (the sidecar keeps Mochi's shape for one).
        for key, facts in (("cache", self.caches and [c.facts() for c in self.caches]), ("fp8", self.fp8_facts)):
            if facts:
                video.extra[key] = facts[0] if len(facts) == 1 else facts
        return video

    def close(self) -> None:
        self._encoded = {}
        for name in ("transformers", "vae", "text_encoder", "components"):
            if hasattr(self, name):
                delattr(self, name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _embeddings_for(self, item: Item) -> EncodedItem:
        encoded = self._encoded.get(item.id)
        if encoded is None or encoded.texts != _texts(item):
            # Not prepared (a single item, or an id reused with other text): encode it alone.
            encoded = self.encode_prompts([item])[item.id]
            self._encoded[item.id] = encoded
        return encoded

    # ------------------------------------------------------------------------------------------------------------
    # Stages

    @torch.no_grad()
    def encode_prompts(self, items: Sequence[Item]) -> dict[str, EncodedItem]:
        """UMT5 embeddings for every item (conditional and, with CFG, unconditional), each distinct text once."""
        started = time.perf_counter()
        texts = sorted({i.prompt for i in items} | {i.negative_prompt for i in items if uses_cfg(i.guidance_scale)})
        embeddings: dict[str, torch.Tensor] = {}
        with Visit(self.text_encoder, self.device, enabled=True):
            for start in range(0, len(texts), TEXT_BATCH):
                batch = texts[start : start + TEXT_BATCH]
                embeds = self._umt5(batch)
                embeddings.update((text, embeds[i : i + 1].cpu()) for i, text in enumerate(batch))
        share = (time.perf_counter() - started) / max(1, len(items))
        log.debug("encoded %d distinct text(s) for %d item(s) in %.2fs", len(texts), len(items), share * len(items))
        return {
            item.id: EncodedItem(
                cond=embeddings[item.prompt],
                uncond=embeddings[item.negative_prompt] if uses_cfg(item.guidance_scale) else None,
                text_encode_s=share,
                texts=_texts(item),
            )
            for item in items
        }

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
        from diffusers.utils.torch_utils import randn_tensor

        if encoded is None:
            encoded = self._embeddings_for(item)
        elif encoded.texts != _texts(item):
            raise ValueError(f"item {item.id}: embeddings were encoded for other text")
        _check_shape(item)
        self._place_for([item])
        device = self.device
        shape = (
            1,
            self.latent_channels,
            WAN.latent_frames(item.num_frames),
            item.height // WAN.vae_spatial,
            item.width // WAN.vae_spatial,
        )
        # A CPU generator seeded with the item's seed, as a user passes one to WanPipeline: the same noise on
        # every rank and every kind of device.
        generator = torch.Generator("cpu").manual_seed(item.seed)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        texts = [encoded.uncond, encoded.cond] if encoded.uncond is not None else [encoded.cond]
        embeds = torch.cat(texts).to(device, self.transformer_dtype)

        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(item.num_inference_steps, device=device)
        scheduler.set_begin_index(0)
        for cache in self.caches or ():
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
        from batchgen.generate.compile import FirstStepTimer

        use_cfg = embeds.shape[0] == 2
        first_step = FirstStepTimer(self.compiled and self.compiled[expert], (embeds.shape[0], *latents.shape[1:]))
        for t in timesteps:
            model_input = torch.cat([latents] * 2) if use_cfg else latents
            noise_pred = self.transformers[expert](
                hidden_states=model_input.to(self.transformer_dtype),
                timestep=t.expand(model_input.shape[0]),
                encoder_hidden_states=embeds,
                attention_kwargs=None,
                return_dict=False,
            )[0].to(torch.float32)
            if use_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + item.guidance_scale * (cond - uncond)
            # UniPC returns the sample in the prediction's dtype: fp32 here, whatever the model's dtype.
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0].to(torch.float32)
            first_step.step_done()
        self.last_compile_s += first_step.seconds
        return latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """fp32 latents [1, 16, T, h, w] -> uint8 RGB frames [4T - 3, 8h, 8w, 3]; NonFiniteError before the cast."""
        require_finite(latents, "latents after denoising")
        return uint8_frames(self.decode_video(latents))

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """fp32 latents [1, 16, T, h, w] -> the VAE's video [1, 3, 4T - 3, 8h, 8w] in [-1, 1], checked finite."""
        config = self.vae.config
        stats = dict(dtype=torch.float32, device=self.device)
        mean = torch.tensor(config.latents_mean, **stats).view(1, config.z_dim, 1, 1, 1)
        # WanPipeline's arithmetic: divide by the reciprocal of the std (bit-equal to its decode input).
        inverse_std = 1.0 / torch.tensor(config.latents_std, **stats).view(1, config.z_dim, 1, 1, 1)
        latents = latents.to(self.device, torch.float32) / inverse_std + mean
        with Visit(self.vae, self.device, enabled=self.offload):
            video = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        expected = WAN.frame_step * (latents.shape[2] - 1) + 1
        if video.shape[2] != expected:
            raise RuntimeError(
                f"VAE decoded {video.shape[2]} frames from {latents.shape[2]} latent frames, expected {expected}"
            )
        require_finite(video, "VAE output")
        return video

    # ------------------------------------------------------------------------------------------------------------
    # Placement

    def _place(self, placement: torch.device) -> None:
        for module in (*self.components.experts, self.vae):
            module.to(placement)

    def _place_for(self, items: Sequence[Item]) -> None:
        """``offload = 'auto'``: decide (again, only when a larger shape comes) whether the experts and VAE stay on
        the GPU, from the parameter bytes, the largest item and the device's free memory."""
        if self.parallel.offload != "auto":
            return
        from batchgen.generate.memory import decide_offload

        if self.device.type == "cpu":
            self.offload_reason = decide_offload("auto", None, None).reason
            return
        needs = self._memory_needs(items)
        if needs.activation_bytes <= self._placed_for_activation:
            return
        modules = (*self.components.experts, self.vae, self.text_encoder)
        free = torch.cuda.mem_get_info(self.device)[0] + sum(device_bytes(m, self.device) for m in modules)
        decision = decide_offload("auto", needs, free)
        log.info("%s", decision.reason)
        self.offload, self.offload_reason = decision.offload, decision.reason
        self._placed_for_activation = needs.activation_bytes
        self._place(torch.device("cpu") if self.offload else self.device)

    def _memory_needs(self, items: Sequence[Item]):
        from batchgen.generate.memory import MemoryNeeds

        sp = getattr(self.topology, "sp", 1) if self.topology is not None else 1
        cfg = getattr(self.topology, "cfg", 1) if self.topology is not None else 1
        tokens = max(WAN.visual_tokens(i.num_frames, i.height, i.width) for i in items)
        batch = max(2 if uses_cfg(i.guidance_scale) else 1 for i in items)
        config = self.components.transformer.config
        return MemoryNeeds(
            # Resident means both experts on the GPU; offloaded, each visits alone.
            transformer_bytes=sum(param_bytes(t) for t in self.components.experts),
            vae_bytes=param_bytes(self.vae),
            text_encoder_bytes=param_bytes(self.text_encoder),
            tokens_per_rank=-(-tokens // sp),
            batch_per_rank=max(1, batch // cfg),
            width=config.num_attention_heads * config.attention_head_dim,
        )


def _texts(item: Item) -> tuple[str, str | None]:
    return (item.prompt, item.negative_prompt if uses_cfg(item.guidance_scale) else None)


def _check_shape(item: Item) -> None:
    problems = [
        f"{what} {reason}"
        for what, reason in (
            ("num_frames", WAN.check_frames(item.num_frames)),
            ("height", WAN.check_side(item.height)),
            ("width", WAN.check_side(item.width)),
        )
        if reason
    ]
    if problems:
        raise InputError(f"item {item.id}: {'; '.join(problems)}")
