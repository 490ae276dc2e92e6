"""``ModelSpec``: one object per model family with its shape rules, defaults, its code and how to parallelise it.
Each family package defines its spec (``batchgen.models.mochi.MOCHI``, ``batchgen.models.wan.WAN``) with
callables that import the family's code only when called; ``batchgen.models`` lists the families.

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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    processors: Callable[..., list]
    """Builds the attention processors: f(transformer, context, state, kernel) -> one per block (the family's
    ``parallel.py``, imported when called)."""


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
    generator: Callable[[], type]
    """The class implementing ``batchgen.models.api.VideoGenerator`` (imported when called: only workers do)."""
    config_reader: Callable[[str | Path], dict[str, Any]]
    """f(model_dir) -> dict: the transformer's config without torch."""
    tiny_writer: Callable[..., Path]
    """f(directory, seed=0, **options) -> Path: a tiny random model in the real layout."""
    block_code: Callable[[], Any]
    """The family's block module for ``--compile`` and ``--fp8`` (``models/<family>/blocks.py``, imported when
    called): ``compiled_forward`` (a block's forward with its elementwise regions compiled, attention eager),
    ``gate_inputs(block, device)``, ``stock_processor()`` and ``visual_output(block_output)`` for the FP8 gate."""
    parallel_plan: ParallelPlan
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    """GenerationConfig values that differ by family (shape, steps, guidance, fps, token limit)."""
    pipeline_classes: tuple[str, ...] = ()
    """diffusers pipeline class names in ``model_index.json`` that mean this family."""
    transformer_prefix: str = ""
    """The start of the diffusers transformer class name in ``transformer/config.json`` ("Mochi", "Wan")."""
    official_layout: Callable[[Path], bool] = lambda path: False
    """Whether a directory holds the family's original release layout (no diffusers files), from its files alone."""
    official_layout_hint: str = ""
    """That layout's telltale file, for the message when no family is recognised."""

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
        return self.config_reader(model_dir)

    def num_heads(self, model_dir: str | Path) -> int:
        return int(self.read_transformer_config(model_dir)["num_attention_heads"])

    def generator_class(self) -> Any:
        return self.generator()

    def write_tiny_model(self, directory: str | Path, **options: Any) -> Path:
        return self.tiny_writer(directory, **options)
