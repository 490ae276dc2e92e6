"""What every family's generator shares: ``StagedGenerator`` (the staged ``VideoGenerator`` protocol, placement,
offload and speed options) and its helpers: device choice, offload visits, the SDPA backend order, finiteness
checks before the uint8 cast, and parameter byte counts for the offload decision."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from batchgen.core.config import ParallelConfig
from batchgen.core.item import Item
from batchgen.core.quality import NonFiniteError, describe_non_finite
from batchgen.models import ModelSpec, uses_cfg
from batchgen.models.api import GeneratedVideo
from batchgen.worker.context import ProcessContext, SingleProcess

log = logging.getLogger("batchgen.generate")

DEFAULT_PARALLEL = ParallelConfig()  # frozen: safe as a shared default


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


def item_texts(item: Item) -> tuple[str, str | None]:
    """(prompt, negative prompt or None without CFG): the texts an item's embeddings are encoded from."""
    return (item.prompt, item.negative_prompt if uses_cfg(item.guidance_scale) else None)


@dataclass
class EncodedItem:
    cond: Any
    """The prompt's embedding, in the family's form, on CPU between stages."""
    uncond: Any | None
    """The negative prompt's; None when the item does not use classifier-free guidance."""
    text_encode_s: float
    """This item's share of the shard's text-encoder time."""
    texts: tuple[str, str | None]
    """``item_texts``: what was encoded, checked before use."""


class StagedGenerator:
    """``batchgen.models.api.VideoGenerator`` in stages: the text encoder once per shard (``prepare``), then per
    item the denoising loop on every rank of the group and the VAE decode on its writer rank only.

    A family subclasses it with its ``spec`` and ``load`` (weights -> components with ``experts``, ``vae``,
    ``text_encoder``, ``tokenizer``, ``scheduler``), ``_encode_texts``, ``denoise`` and ``decode_video``; what is
    left here is the same for Mochi and Wan: construction, placement and 'auto' offload, the speed options (one
    per expert), the sidecar's timings and facts.
    """

    spec: ClassVar[ModelSpec]

    def __init__(
        self,
        model_dir: str | Path,
        *,
        context: ProcessContext | None = None,
        parallel: ParallelConfig = DEFAULT_PARALLEL,
        device: str | None = None,
        dtype: str = "auto",
        max_sequence_length: int | None = None,
        **family_options: Any,
    ):
        from batchgen.models.common.weights import fingerprint_model_dir, resolve_dtype

        device = pick_device(device, context)
        # With offload (or until 'auto' has decided) the weights wait in host memory.
        on_host = parallel.offload != "none" and torch.device(device).type != "cpu"
        components = self.load(model_dir, dtype=resolve_dtype(dtype, device), device="cpu" if on_host else device)
        identity = {"path": str(model_dir), "fingerprint": fingerprint_model_dir(model_dir)}
        self._setup(components, context, parallel, device, identity, max_sequence_length, family_options)

    @classmethod
    def from_components(
        cls,
        components: Any,
        *,
        context: ProcessContext | None = None,
        parallel: ParallelConfig = DEFAULT_PARALLEL,
        device: str | None = None,
        model_identity: dict[str, Any] | None = None,
        max_sequence_length: int | None = None,
        **family_options: Any,
    ):
        """A generator over components already in memory (e.g. a full-size random model for a benchmark)."""
        self = cls.__new__(cls)
        identity = model_identity or {"path": f"<{components.layout}>", "fingerprint": ""}
        device = pick_device(device, context)
        self._setup(components, context, parallel, device, identity, max_sequence_length, family_options)
        return self

    @staticmethod
    def load(model_dir: str | Path, *, dtype: torch.dtype, device: str) -> Any:
        raise NotImplementedError

    def _setup(self, components, context, parallel, device, identity, max_sequence_length, family_options) -> None:
        self.components = components
        self.context = context or SingleProcess()
        self.parallel = parallel
        self.device = torch.device(device)
        self.offload = parallel.offload != "none" and self.device.type != "cpu"
        self.offload_reason = ""
        self._placed_for_activation = -1
        """Activation bytes of the largest item the current 'auto' placement was decided for."""
        self.model_identity = identity
        self.max_sequence_length = max_sequence_length or self.spec.text_length
        self.last_denoise_loop_s = 0.0
        self.last_compile_s = 0.0
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.vae = components.vae
        self.scheduler_config = components.scheduler.config
        experts = components.experts
        # The compute dtype is the projections'; a few tensors (RoPE, time embedding, norms) stay fp32 on purpose.
        self.transformer_dtype = experts[0].proj_out.weight.dtype
        self.latent_channels = experts[0].config.in_channels
        self.topology = getattr(self.context, "topology", None)
        self._encoded: dict[str, EncodedItem] = {}
        self._setup_family(components, **family_options)

        # With offload the experts and VAE wait in host memory and visit the GPU only while they run; 'auto' leaves
        # them where they are until the first items are known (``_place_for``).
        if parallel.offload != "auto":
            self._place(torch.device("cpu") if self.offload else self.device)
        # The text encoder waits in host memory between shards: it is needed once per shard, the experts every step.
        self.text_encoder.to("cpu")
        from batchgen.parallel.apply import parallelize_transformer

        # Also on one process: the processors run the CFG batch as one attention call per block.
        plan, attention = self.spec.parallel_plan, parallel.attention
        self.transformers = [parallelize_transformer(t, self.context, plan=plan, attention=attention) for t in experts]
        self._install_speedups(experts)

    def _setup_family(self, components: Any) -> None:
        """What the family sets up besides the shared state (before placement and parallelisation)."""

    def _install_speedups(self, experts: list) -> None:
        """Per expert: FP8 linears (when the gate passes on every rank), compiled regions, then a first-block cache
        (each expert its own: Wan's low-noise expert's first step computes every block)."""
        self.fp8_facts: list[dict] = []
        if self.parallel.fp8:
            from batchgen.models.common.fp8 import enable_fp8

            self.fp8_facts = [
                enable_fp8(expert, self.device, spec=self.spec, context=self.context) for expert in experts
            ]
        self.compiled: list = []
        if self.parallel.compile:
            from batchgen.models.common.compile import compile_blocks

            self.compiled = [compile_blocks(expert, spec=self.spec) for expert in experts]
        self.caches: list = []
        if self.parallel.cache_threshold > 0:
            from batchgen.models.common.cache import FirstBlockCache, group_axes

            axes = group_axes(self.context)
            plan = self.spec.parallel_plan
            self.caches = [FirstBlockCache(e, self.parallel.cache_threshold, axes, plan=plan) for e in experts]

    # ------------------------------------------------------------------------------------------------------------
    # VideoGenerator

    def prepare(self, items: Sequence[Item]) -> None:
        """Encode every prompt of the shard now (the text encoder once), replacing the previous shard's."""
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
            extra={"parallel": self.parallel_facts(), "dtype": str(self.transformer_dtype).replace("torch.", "")},
        )
        if self.compiled:
            # The first step of each expert on a new shape compiles; 0 for every later item of that shape.
            video.timings["compile"] = round(self.last_compile_s, 4)
        # One entry per expert: an object for one, a list for Wan 2.2's two.
        for key, facts in (("cache", [c.facts() for c in self.caches]), ("fp8", self.fp8_facts)):
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

    def parallel_facts(self) -> dict[str, Any]:
        from batchgen.parallel.apply import attention_facts

        facts = parallel_facts(self.context, self.parallel, self.offload)
        attention = attention_facts(self.transformers[0]) if getattr(self, "transformers", None) else None
        if attention is not None:
            facts["attention"] = attention
        return facts

    # ------------------------------------------------------------------------------------------------------------
    # Stages

    @torch.no_grad()
    def encode_prompts(self, items: Sequence[Item]) -> dict[str, EncodedItem]:
        """Embeddings for every item (conditional and, with CFG, unconditional), each distinct text once."""
        started = time.perf_counter()
        texts = sorted({i.prompt for i in items} | {i.negative_prompt for i in items if uses_cfg(i.guidance_scale)})
        embeddings = self._encode_texts(texts)
        share = (time.perf_counter() - started) / max(1, len(items))
        log.debug("encoded %d distinct text(s) for %d item(s) in %.2fs", len(texts), len(items), share * len(items))
        return {
            item.id: EncodedItem(
                cond=embeddings[item.prompt],
                uncond=embeddings[item.negative_prompt] if uses_cfg(item.guidance_scale) else None,
                text_encode_s=share,
                texts=item_texts(item),
            )
            for item in items
        }

    def _encode_texts(self, texts: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def _embeddings_for(self, item: Item) -> EncodedItem:
        encoded = self._encoded.get(item.id)
        if encoded is None or encoded.texts != item_texts(item):
            # Not prepared (a single item, or an id reused with other text): encode it alone.
            encoded = self.encode_prompts([item])[item.id]
            self._encoded[item.id] = encoded
        return encoded

    def denoise(self, item: Item, encoded: EncodedItem | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _start_denoising(self, item: Item, encoded: EncodedItem | None) -> tuple[EncodedItem, torch.Tensor]:
        """The item's embeddings (checked against its texts) and its initial fp32 noise, with the shape checked
        and the weights placed."""
        from diffusers.utils.torch_utils import randn_tensor

        from batchgen.core.errors import InputError

        if encoded is None:
            encoded = self._embeddings_for(item)
        elif encoded.texts != item_texts(item):
            raise ValueError(f"item {item.id}: embeddings were encoded for other text")
        problems = [
            f"{what} {reason}"
            for what, reason in (
                ("num_frames", self.spec.check_frames(item.num_frames)),
                ("height", self.spec.check_side(item.height)),
                ("width", self.spec.check_side(item.width)),
            )
            if reason
        ]
        if problems:
            raise InputError(f"item {item.id}: {'; '.join(problems)}")
        self._place_for([item])
        spatial = self.spec.vae_spatial
        shape = (
            1, self.latent_channels, self.spec.latent_frames(item.num_frames), item.height // spatial,
            item.width // spatial,
        )  # fmt: skip
        # A CPU generator seeded with the item's seed, as a user passes one to the diffusers pipeline: the same
        # noise on every rank and every kind of device.
        generator = torch.Generator("cpu").manual_seed(item.seed)
        return encoded, randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def _step(self, transformer, scheduler, t, latents, item: Item, use_cfg: bool, **text: Any) -> torch.Tensor:
        """One denoising step: the CFG batch [uncond, cond] through ``transformer`` in one call, guidance in fp32,
        then the scheduler's update (which returns the prediction's dtype: fp32 here, whatever the model's)."""
        model_input = torch.cat([latents] * 2) if use_cfg else latents
        noise_pred = transformer(
            hidden_states=model_input.to(self.transformer_dtype),
            timestep=t.expand(model_input.shape[0]),
            attention_kwargs=None,
            return_dict=False,
            **text,
        )[0].to(torch.float32)
        if use_cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + item.guidance_scale * (cond - uncond)
        return scheduler.step(noise_pred, t, latents, return_dict=False)[0].to(torch.float32)

    def _first_step_timer(self, expert: int, shape: tuple):
        from batchgen.models.common.compile import FirstStepTimer

        return FirstStepTimer(self.compiled[expert] if self.compiled else None, shape)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """fp32 latents -> uint8 RGB frames [F, H, W, 3]; NonFiniteError before the cast."""
        require_finite(latents, "latents after denoising")
        return uint8_frames(self.decode_video(latents))

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """fp32 latents -> the VAE's video [1, 3, F, H, W] in [-1, 1], checked finite and of the expected length."""
        raise NotImplementedError

    def _check_decoded_frames(self, video: torch.Tensor, latent_frames: int) -> None:
        expected = self.spec.frame_step * (latent_frames - 1) + 1
        if video.shape[2] != expected:
            raise RuntimeError(
                f"VAE decoded {video.shape[2]} frames from {latent_frames} latent frames, expected {expected}"
            )
        require_finite(video, "VAE output")

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
        from batchgen.models.common.memory import decide_offload

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
        from batchgen.models.common.memory import MemoryNeeds

        sp = getattr(self.topology, "sp", 1) if self.topology is not None else 1
        cfg = getattr(self.topology, "cfg", 1) if self.topology is not None else 1
        tokens = max(self.spec.visual_tokens(i.num_frames, i.height, i.width) for i in items)
        batch = max(2 if uses_cfg(i.guidance_scale) else 1 for i in items)
        experts = self.components.experts
        return MemoryNeeds(
            # Resident means every expert on the GPU; offloaded, each visits alone.
            transformer_bytes=sum(param_bytes(t) for t in experts),
            vae_bytes=param_bytes(self.vae),
            text_encoder_bytes=param_bytes(self.text_encoder),
            tokens_per_rank=-(-tokens // sp),
            batch_per_rank=max(1, batch // cfg),
            width=experts[0].config.num_attention_heads * experts[0].config.attention_head_dim,
        )
