"""One object per model family: its shape rules, defaults, where its code lives and how to parallelise it.

Validation, planning, topology, rendering and the worker all take a family's facts from its ``ModelSpec`` (as
torchtitan's ``ModelSpec`` carries a model's facts and its ``parallelize_*`` function). Nothing here imports torch:
the control plane reads specs before any weights load. Facts that vary within a family (heads, width, layers of
Wan 1.3B vs 14B) come from the model's own config through ``read_transformer_config``; the spec holds only what
the whole family shares, plus ``default_heads`` for commands that cannot read the weights (``render``).

Sources: shared/reference/mochi.md (Mochi 1); Wan 2.1/2.2 from diffusers 0.42 (``WanPipeline``,
``WanTransformer3DModel``, ``AutoencoderKLWan``: 4x temporal, 8x spatial, patch (1, 2, 2), UMT5 with 512 tokens)
and the official Wan configs (wan/configs/*.py in Wan-Video/Wan2.1 and Wan2.2: 480x832, 81 frames, 16 fps).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgen.core.errors import ConfigError, InputError, ModelMismatchError

MAX_SIDE = 2048


def uses_cfg(guidance_scale: float) -> bool:
    """Classifier-free guidance runs the unconditional pass only above 1 (diffusers' ``do_classifier_free_guidance``
    for both MochiPipeline and WanPipeline)."""
    return guidance_scale > 1.0


@dataclass(frozen=True)
class ParallelPlan:
    """Where ``batchgen.parallel.apply`` splits and gathers a family's transformer, as data (diffusers' ``_cp_plan``
    idea): module paths are attribute names on the diffusers model."""

    blocks: str
    """The ModuleList of transformer blocks; a pre-hook on its first block splits the visual tokens."""
    attention: str
    """The attribute of each block whose processor becomes the sequence-parallel one (self / joint attention)."""
    rope: str
    """The rotary embedding module whose output rows are split like the tokens."""
    rope_token_dim: int
    """The token dimension of each RoPE output tensor (Mochi [N, H, D/2]: 0; Wan [1, N, 1, D]: 1)."""
    output: str
    """The projection after the blocks whose output is all-gathered over the sequence-parallel group."""
    processors: str
    """``module:function`` building the attention processors: f(transformer, context, state, kernel) -> list."""


@dataclass(frozen=True)
class ModelSpec:
    family: str
    """Name in configs, manifests, run ids and CLI flags."""
    title: str
    frame_step: int
    """VAE temporal compression: videos have ``frame_step * k + 1`` frames."""
    vae_spatial: int
    patch: tuple[int, int, int]
    """DiT patch (frames, height, width) in latent cells."""
    text_length: int
    """The text encoder's token limit (the default and maximum ``max_sequence_length``)."""
    max_frames: int
    default_heads: int
    """Attention heads of the family's flagship size, for commands that cannot read the weights' config."""
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    """GenerationConfig values that differ by family (shape, steps, guidance, fps, token limit)."""
    generator: str = ""
    """``module:Class`` implementing ``batchgen.models.api.VideoGenerator`` (imported only by workers)."""
    config_reader: str = ""
    """``module:function(model_dir) -> dict``: the transformer's config without torch."""
    tiny_writer: str = ""
    """``module:function(directory, seed=0, **options) -> Path``: a tiny random model in the real layout."""
    pipeline_classes: tuple[str, ...] = ()
    """diffusers pipeline class names in ``model_index.json`` that mean this family."""
    parallel_plan: ParallelPlan | None = None

    # -- shape rules ------------------------------------------------------------------------------------------

    def check_frames(self, num_frames: int) -> str | None:
        """Why ``num_frames`` is invalid for this family, or None."""
        if num_frames < 1 or (num_frames - 1) % self.frame_step:
            examples = ", ".join(str(self.frame_step * k + 1) for k in (1, 2, 3, 5, 8, 10, 20))
            return f"must be {self.frame_step}k+1 for {self.title} ({examples}, ...), got {num_frames}"
        if num_frames > self.max_frames:
            return f"must be at most {self.max_frames} for {self.title}, got {num_frames}"
        return None

    @property
    def size_multiple(self) -> int:
        """Height and width must divide into whole patches of latent cells."""
        return self.vae_spatial * max(self.patch[1], self.patch[2])

    def check_side(self, value: int) -> str | None:
        multiple = self.size_multiple
        if value < multiple or value % multiple:
            return f"must be a positive multiple of {multiple} for {self.title}, got {value}"
        if value > MAX_SIDE:
            return f"must be at most {MAX_SIDE}, got {value}"
        return None

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames T for ``num_frames`` decoded frames (decoding gives back ``frame_step * (T - 1) + 1``)."""
        return (num_frames - 1) // self.frame_step + 1

    def visual_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Visual tokens of one transformer forward: patches of the latent video."""
        pt, ph, pw = self.patch
        cell_h, cell_w = self.vae_spatial * ph, self.vae_spatial * pw
        return -(-self.latent_frames(num_frames) // pt) * (height // cell_h) * (width // cell_w)

    # -- code -------------------------------------------------------------------------------------------------

    def read_transformer_config(self, model_dir: str | Path) -> dict[str, Any]:
        return _resolve(self.config_reader)(model_dir)

    def num_heads(self, model_dir: str | Path) -> int:
        return int(self.read_transformer_config(model_dir)["num_attention_heads"])

    def generator_class(self) -> Any:
        return _resolve(self.generator)

    def write_tiny_model(self, directory: str | Path, **options: Any) -> Path:
        return _resolve(self.tiny_writer)(directory, **options)


def _resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


MOCHI = ModelSpec(
    family="mochi",
    title="Mochi 1",
    frame_step=6,
    vae_spatial=8,
    patch=(1, 2, 2),
    text_length=256,
    max_frames=511,
    default_heads=24,
    generation_defaults={
        "num_frames": 163,
        "height": 480,
        "width": 848,
        "num_inference_steps": 64,
        "guidance_scale": 4.5,
        "fps": 30,
        "max_sequence_length": 256,
    },
    generator="batchgen.models.mochi.generator:MochiGenerator",
    config_reader="batchgen.models.mochi.loading:read_transformer_config",
    tiny_writer="batchgen.models.mochi.tiny:write_tiny_model",
    pipeline_classes=("MochiPipeline",),
    parallel_plan=ParallelPlan(
        blocks="transformer_blocks",
        attention="attn1",
        rope="rope",
        rope_token_dim=0,
        output="proj_out",
        processors="batchgen.parallel.apply:mochi_processors",
    ),
)

WAN = ModelSpec(
    family="wan",
    title="Wan 2.1/2.2",
    frame_step=4,
    vae_spatial=8,
    patch=(1, 2, 2),
    text_length=512,
    # WanRotaryPosEmbed holds rope_max_seq_len = 1024 positions per axis; 4 x 1023 + 1 frames use them all.
    max_frames=4093,
    default_heads=40,
    generation_defaults={
        "num_frames": 81,
        "height": 480,
        "width": 832,
        "num_inference_steps": 50,
        "guidance_scale": 5.0,
        "fps": 16,
        "max_sequence_length": 512,
    },
    generator="batchgen.models.wan.generator:WanGenerator",
    config_reader="batchgen.models.wan.loading:read_transformer_config",
    tiny_writer="batchgen.models.wan.tiny:write_tiny_wan",
    pipeline_classes=("WanPipeline",),
    parallel_plan=ParallelPlan(
        blocks="blocks",
        attention="attn1",
        rope="rope",
        rope_token_dim=1,
        output="proj_out",
        processors="batchgen.models.wan.parallel:wan_processors",
    ),
)

FAMILIES: dict[str, ModelSpec] = {spec.family: spec for spec in (MOCHI, WAN)}


def spec_for(family: str) -> ModelSpec:
    """The spec of ``family``; ConfigError listing the known families otherwise."""
    try:
        return FAMILIES[family]
    except (KeyError, TypeError):
        raise ConfigError(f"model family must be one of {', '.join(sorted(FAMILIES))}, got {family!r}") from None


def detect_family(model_dir: str | Path) -> str:
    """The family of the weights in ``model_dir`` from its files alone (no torch): ``model_index.json``'s pipeline
    class, else the transformer config's class, else the official single-file layouts (Genmo's ``dit.safetensors``;
    Wan's root ``config.json`` with ``model_type``, or its ``high_noise_model/`` and ``low_noise_model/``)."""
    from batchgen.models.common.weights import read_json_object

    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"model directory {path} does not exist or is not a directory")
    index = read_json_object(path / "model_index.json")
    for spec in FAMILIES.values():
        if index.get("_class_name") in spec.pipeline_classes:
            return spec.family
    transformer_class = read_json_object(path / "transformer" / "config.json").get("_class_name", "")
    if transformer_class.startswith("Mochi"):
        return "mochi"
    if transformer_class.startswith("Wan"):
        return "wan"
    if (path / "dit.safetensors").is_file():
        return "mochi"
    if "model_type" in read_json_object(path / "config.json") or (path / "high_noise_model").is_dir():
        return "wan"
    raise InputError(
        f"{path}: cannot tell the model family: no model_index.json naming "
        f"{' or '.join(c for s in FAMILIES.values() for c in s.pipeline_classes)}, no transformer/config.json, "
        "no dit.safetensors (Mochi's original layout) and no Wan config.json"
    )


def check_weights(model_dir: str | Path, *, family: str, weights: str = "", fingerprint: str | None = None) -> None:
    """Refuse (ModelMismatchError, exit 4) weights in ``model_dir`` of another family than ``family`` or, when
    ``weights`` is known, with another fingerprint: before any weights load, naming both sides."""
    found = detect_family(model_dir)
    if found != family:
        raise ModelMismatchError(
            f"{model_dir} holds a {spec_for(found).title} model (family {found!r}), but the run uses family "
            f"{family!r}; one run never mixes two models (use weights of that family, or plan another run)"
        )
    if not weights:
        return
    if fingerprint is None:
        from batchgen.models.common.weights import fingerprint_model_dir

        fingerprint = fingerprint_model_dir(model_dir)
    if fingerprint != weights:
        raise ModelMismatchError(
            f"{model_dir} has weights fingerprint {fingerprint}, but the run was planned with weights {weights}; "
            "one run never mixes two models (use those weights, or plan another run)"
        )
