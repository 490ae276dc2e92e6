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

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchgen.config import ParallelConfig
from batchgen.errors import InputError
from batchgen.generate.api import GeneratedVideo
from batchgen.generate.common import Visit as _Visit
from batchgen.generate.common import device_bytes as _device_bytes
from batchgen.generate.common import fastest_attention as _fastest_attention
from batchgen.generate.common import parallel_facts, uint8_frames
from batchgen.generate.common import param_bytes as _param_bytes
from batchgen.generate.common import pick_device as _pick_device
from batchgen.generate.common import require_finite as _require_finite
from batchgen.generate.loading import (  # noqa: F401  (build_random_components: re-exported for bench/gpu.py)
    MochiComponents,
    build_random_components,
    fingerprint_model_dir,
    load_components,
    resolve_dtype,
)
from batchgen.generate.vae import enable_causal_framewise_decoding
from batchgen.item import Item
from batchgen.models import MOCHI, uses_cfg
from batchgen.parallel.context import ProcessContext, SingleProcess
from batchgen.parallel.joint import gather_valid_text

log = logging.getLogger("batchgen.generate.pipeline")

# Genmo's sampler (and diffusers' MochiPipeline): linear-quadratic sigma schedule with this threshold.
THRESHOLD_NOISE = 0.025
VAE_SPATIAL = 8
VAE_TEMPORAL = 6
# T5 prompts per forward: bounds activation memory for big shards at no cost in throughput.
T5_BATCH = 8
# diffusers' AutoencoderKLMochi tiling defaults (pixels): 256 px tiles every 192 px, 64 px blended overlap.
DEFAULT_VAE_TILE = (256, 192)
DEFAULT_PARALLEL = ParallelConfig()  # frozen: safe as a shared default


@dataclass
class PromptEmbedding:
    embeds: torch.Tensor
    """[1, max_sequence_length, d_model], T5's dtype, on CPU between stages."""
    mask: torch.Tensor
    """[1, max_sequence_length] bool; all False for an empty prompt."""


@dataclass
class EncodedItem:
    cond: PromptEmbedding
    uncond: PromptEmbedding | None
    """None when the item does not use classifier-free guidance (guidance_scale <= 1)."""
    text_encode_s: float
    """This item's share of the shard's T5 time."""
    texts: tuple[str, str | None] = ("", None)
    """(prompt, negative prompt or None without CFG): what was encoded, checked before use."""


def linear_quadratic_sigmas(steps: int, threshold_noise: float = THRESHOLD_NOISE) -> list[float]:
    """Genmo's schedule (diffusers' linear_quadratic_schedule): ``steps // 2`` linear steps down to
    ``threshold_noise``, then quadratic to 0; returned as sigmas from 1 downwards (without the final 0).
    One step has no linear part (the formula would divide by zero there): a single Euler step from 1."""
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    if steps // 2 == 0:
        return [1.0]
    return [float(s) for s in linear_quadratic_schedule(steps, threshold_noise, steps // 2)]


class MochiGenerator:
    """Implements ``batchgen.generate.api.VideoGenerator`` for Mochi 1."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        context: ProcessContext | None = None,
        parallel: ParallelConfig = DEFAULT_PARALLEL,
        device: str | None = None,
        dtype: str = "auto",
        vae_tile: tuple[int, int] = DEFAULT_VAE_TILE,
        max_sequence_length: int = 256,
    ):
        device = _pick_device(device, context)
        # With offload (or until 'auto' has decided) the weights wait in host memory.
        on_host = parallel.offload != "none" and torch.device(device).type != "cpu"
        components = load_components(model_dir, dtype=resolve_dtype(dtype, device), device="cpu" if on_host else device)
        identity = {"path": str(model_dir), "fingerprint": fingerprint_model_dir(model_dir)}
        self._setup(components, context, parallel, device, identity, vae_tile, max_sequence_length)

    @classmethod
    def from_components(
        cls,
        components: MochiComponents,
        *,
        context: ProcessContext | None = None,
        parallel: ParallelConfig = DEFAULT_PARALLEL,
        device: str | None = None,
        model_identity: dict[str, Any] | None = None,
        vae_tile: tuple[int, int] = DEFAULT_VAE_TILE,
        max_sequence_length: int = 256,
    ) -> MochiGenerator:
        """A generator over components already in memory (e.g. a full-size random model for the GPU benchmark)."""
        self = cls.__new__(cls)
        identity = model_identity or {"path": f"<{components.layout}>", "fingerprint": ""}
        self._setup(
            components, context, parallel, _pick_device(device, context), identity, vae_tile, max_sequence_length
        )
        return self

    def _setup(self, components, context, parallel, device, identity, vae_tile, max_sequence_length) -> None:
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
        # The compute dtype is the projection weights'; a few tensors (pos_frequencies) stay fp32 on purpose, so
        # the first parameter's dtype is not the model's.
        self.transformer_dtype = components.transformer.proj_out.weight.dtype
        self.latent_channels = components.transformer.config.in_channels
        self.num_heads = components.transformer.config.num_attention_heads

        # With offload the DiT and VAE wait in host memory and visit the GPU only while they run; 'auto' leaves them
        # where they are until the first items are known (``_place_for``).
        if parallel.offload != "auto":
            placement = torch.device("cpu") if self.offload else self.device
            components.transformer.to(placement)
            self.vae.to(placement)
        # T5 waits in host memory between shards: it is needed once per shard, the DiT for every step.
        self.text_encoder.to("cpu")

        # Tiled + framewise decoding: bounded memory at any resolution and length, causal context carried
        # across frame groups (no lost frames, no temporal seams), tiles blended over their overlap.
        # (batchgen.generate.vae: diffusers' own framewise switch breaks the decoder's shapes.)
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

        self.topology = getattr(self.context, "topology", None)
        from batchgen.parallel.apply import parallelize_transformer

        # Also on one process: the joint processor runs the CFG batch as one attention call per block.
        self.transformer = parallelize_transformer(components.transformer, self.context)
        self._install_speedups(components.transformer)
        self._encoded: dict[str, EncodedItem] = {}

    def _install_speedups(self, transformer) -> None:
        """FP8 linears (when the gate passes), compiled regions, then the step cache around the blocks."""
        self.fp8_facts = None
        if self.parallel.fp8:
            from batchgen.generate.fp8 import enable_fp8

            self.fp8_facts = enable_fp8(transformer, self.device)
        self.compiled = None
        if self.parallel.compile:
            from batchgen.generate.compile import compile_blocks

            self.compiled = compile_blocks(transformer)
        self.cache = None
        if self.parallel.cache_threshold > 0:
            from batchgen.generate.cache import FirstBlockCache, group_axes

            self.cache = FirstBlockCache(transformer, self.parallel.cache_threshold, group_axes(self.context))

    # ------------------------------------------------------------------------------------------------------------
    # VideoGenerator

    def prepare(self, items: Sequence[Item]) -> None:
        """Encode every prompt of the shard now (T5 once), replacing the previous shard's embeddings."""
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
        _require_finite(latents, "latents after denoising")
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
            extra={"parallel": self.parallel_facts(), "dtype": str(self.transformer_dtype).replace("torch.", "")},
        )
        if self.compiled is not None:
            # The first step of a new shape compiles; 0 for every later item of that shape.
            video.timings["compile"] = round(self.last_compile_s, 4)
        if self.cache is not None:
            video.extra["cache"] = self.cache.facts()
        if self.fp8_facts is not None:
            video.extra["fp8"] = self.fp8_facts
        return video

    def _embeddings_for(self, item: Item) -> EncodedItem:
        encoded = self._encoded.get(item.id)
        if encoded is None or encoded.texts != _texts(item):
            # Not prepared (a single item, or an id reused with other text): encode it alone.
            encoded = self.encode_prompts([item])[item.id]
            self._encoded[item.id] = encoded
        return encoded

    def close(self) -> None:
        self._encoded = {}
        for name in ("transformer", "vae", "text_encoder", "components"):
            if hasattr(self, name):
                delattr(self, name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def parallel_facts(self) -> dict[str, Any]:
        return parallel_facts(self.context, self.parallel, self.offload)

    # ------------------------------------------------------------------------------------------------------------
    # Stages

    @torch.no_grad()
    def encode_prompts(self, items: Sequence[Item]) -> dict[str, EncodedItem]:
        """T5 embeddings for every item (conditional and, with CFG, unconditional), each distinct text once."""
        started = time.perf_counter()
        texts = sorted(
            {item.prompt for item in items} | {item.negative_prompt for item in items if uses_cfg(item.guidance_scale)}
        )
        nonempty = [t for t in texts if t != ""]
        embeddings: dict[str, PromptEmbedding] = {}
        if "" in texts:
            embeddings[""] = self._zeros_embedding()
        if nonempty:
            with self._on_device(self.text_encoder, always=True):
                for start in range(0, len(nonempty), T5_BATCH):
                    batch = nonempty[start : start + T5_BATCH]
                    embeds, masks = self._t5(batch)
                    for i, text in enumerate(batch):
                        embeddings[text] = PromptEmbedding(embeds[i : i + 1].cpu(), masks[i : i + 1].cpu())
        share = (time.perf_counter() - started) / max(1, len(items))
        log.debug("encoded %d distinct prompt(s) for %d item(s) in %.2fs", len(texts), len(items), share * len(items))
        return {
            item.id: EncodedItem(
                cond=embeddings[item.prompt],
                uncond=embeddings[item.negative_prompt] if uses_cfg(item.guidance_scale) else None,
                text_encode_s=share,
                texts=_texts(item),
            )
            for item in items
        }

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
            MOCHI.latent_frames(item.num_frames),
            item.height // VAE_SPATIAL,
            item.width // VAE_SPATIAL,
        )
        # A CPU generator seeded with the item's seed, as a user passes one to MochiPipeline: the same noise on
        # every rank and every kind of device.
        generator = torch.Generator("cpu").manual_seed(item.seed)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

        use_cfg = encoded.uncond is not None
        # The CFG batch in MochiPipeline's order: [unconditional, conditional].
        prompts = [encoded.uncond, encoded.cond] if use_cfg else [encoded.cond]
        # Once per item, on the host copies: valid text tokens first, cut to the longest prompt, so the blocks
        # need neither a nonzero nor a host sync to drop padding (batchgen.parallel.joint).
        embeds, mask = gather_valid_text(torch.cat([p.embeds for p in prompts]), torch.cat([p.mask for p in prompts]))
        embeds, mask = embeds.to(device, self.transformer_dtype), mask.to(device)

        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(sigmas=np.array(linear_quadratic_sigmas(item.num_inference_steps)), device=device)
        scheduler.set_begin_index(0)

        if self.cache is not None:
            self.cache.reset()
        with self._on_device(self.components.transformer), _fastest_attention(device):
            loop_started = time.perf_counter()
            first_step = self._first_step_timer((2 if use_cfg else 1, *shape[1:]))
            for t in scheduler.timesteps:
                model_input = torch.cat([latents] * 2) if use_cfg else latents
                timestep = t.expand(model_input.shape[0]).to(torch.float32)
                noise_pred = self.transformer(
                    hidden_states=model_input.to(self.transformer_dtype),
                    encoder_hidden_states=embeds,
                    timestep=timestep,
                    encoder_attention_mask=mask,
                    attention_kwargs=None,
                    return_dict=False,
                )[0].to(torch.float32)
                if use_cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + item.guidance_scale * (cond - uncond)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0].to(torch.float32)
                first_step.step_done()
            self.last_compile_s = first_step.seconds
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # The steps alone, without the offload transfers around them: what scales with the step count.
            self.last_denoise_loop_s = time.perf_counter() - loop_started
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """fp32 latents [1, 12, T, h, w] -> uint8 RGB frames [6T - 5, 8h, 8w, 3]."""
        config = self.vae.config
        latents = latents.to(self.device, torch.float32)
        channels = latents.shape[1]
        if config.latents_mean is not None and config.latents_std is not None:
            mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=latents.device).view(
                1, channels, 1, 1, 1
            )
            std = torch.tensor(config.latents_std, dtype=torch.float32, device=latents.device).view(
                1, channels, 1, 1, 1
            )
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        with self._on_device(self.vae):
            video = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        expected = 6 * latents.shape[2] - 5
        if video.shape[2] != expected:
            raise RuntimeError(
                f"VAE decoded {video.shape[2]} frames from {latents.shape[2]} latent frames, expected {expected}"
            )
        _require_finite(video, "VAE output")
        return uint8_frames(video)

    # ------------------------------------------------------------------------------------------------------------

    def _first_step_timer(self, shape: tuple):
        from batchgen.generate.compile import FirstStepTimer

        return FirstStepTimer(self.compiled, shape)

    def _place_for(self, items: Sequence[Item]) -> None:
        """``offload = 'auto'``: decide (again, only when a larger shape comes) whether the DiT and VAE stay on
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
        transformer = self.components.transformer
        held = sum(_device_bytes(m, self.device) for m in (transformer, self.vae, self.text_encoder))
        free = torch.cuda.mem_get_info(self.device)[0] + held
        decision = decide_offload("auto", needs, free)
        log.info("%s", decision.reason)
        self.offload, self.offload_reason = decision.offload, decision.reason
        self._placed_for_activation = needs.activation_bytes
        placement = torch.device("cpu") if self.offload else self.device
        transformer.to(placement)
        self.vae.to(placement)

    def _memory_needs(self, items: Sequence[Item]):
        from batchgen.generate.memory import MemoryNeeds
        from batchgen.parallel.topology import visual_tokens

        sp = getattr(self.topology, "sp", 1) if self.topology is not None else 1
        cfg = getattr(self.topology, "cfg", 1) if self.topology is not None else 1
        tokens = max(visual_tokens(i.num_frames, i.height, i.width) for i in items)
        batch = max(2 if uses_cfg(i.guidance_scale) else 1 for i in items)
        return MemoryNeeds(
            transformer_bytes=_param_bytes(self.components.transformer),
            vae_bytes=_param_bytes(self.vae),
            text_encoder_bytes=_param_bytes(self.text_encoder),
            tokens_per_rank=-(-tokens // sp),
            batch_per_rank=max(1, batch // cfg),
            width=self.components.transformer.config.num_attention_heads
            * self.components.transformer.config.attention_head_dim,
        )

    def _on_device(self, module, *, always: bool = False):
        """Move ``module`` to the GPU for the block and back to host memory afterwards when offloading
        (``always``: the T5 encoder, which leaves the GPU after every shard in both modes)."""
        return _Visit(module, self.device, enabled=always or self.offload)


def _texts(item: Item) -> tuple[str, str | None]:
    return (item.prompt, item.negative_prompt if uses_cfg(item.guidance_scale) else None)


def _check_shape(item: Item) -> None:
    if (item.num_frames - 1) % VAE_TEMPORAL or item.height % 16 or item.width % 16:
        raise InputError(
            f"item {item.id}: {item.num_frames} frames at {item.height}x{item.width} does not fit Mochi "
            "(frames 6k+1, height and width multiples of 16)"
        )
