"""A tiny randomly initialised Mochi in exactly the diffusers layout of ``genmo/mochi-1-preview``.

Same classes, same file names, same config keys as the real weights, so it loads through the same code path
(``batchgen.models.mochi.loading``); only the sizes are small. Its default shape (13 frames, 64x64 -> 3 x 4 x 4 = 48
visual tokens) and its 4 heads allow sequence-parallel degrees 1, 2 and 4. Deterministic given the seed: every
tensor comes from one seeded generator, and the tokenizer is built offline from a fixed vocabulary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from batchgen.models.common.tiny import (
    TINY_TOML_NAME,
    fresh_directory,
    randomize_parameters,
    tokenizer_vocab,
    write_tokenizer,
)
from batchgen.models.common.weights import resolve_dtype
from batchgen.models.mochi.loading import FP32_TENSORS, MOCHI_SCHEDULER_CONFIG, T5_V1_1_FLAGS, MochiComponents

log = logging.getLogger("batchgen.generate.tiny")


# Real mochi-1-preview values kept where they do not cost size: 12 latent channels, patch 2, 8x spatial and
# 6x temporal VAE compression, 256 T5 tokens. The T5 width is also the DiT's text width (text_embed_dim).
TEXT_WIDTH = 32
TRANSFORMER_CONFIG = {
    "patch_size": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_layers": 2,
    "pooled_projection_dim": 32,
    "in_channels": 12,
    "out_channels": None,
    "qk_norm": "rms_norm",
    "text_embed_dim": TEXT_WIDTH,
    "time_embed_dim": 32,
    "activation_fn": "swiglu",
    "max_sequence_length": 256,
}
# 32 channels is the floor: the Mochi VAE's group norms use 32 groups and its attention heads are 32 wide.
# No resnets at full and half resolution (layers_per_block[0:2] = 0): those convolutions cost 90% of the decode
# time; the causal convolutions at 1/4 and 1/8 resolution still exercise framewise decoding's temporal cache.
VAE_CONFIG = {
    "in_channels": 15,
    "out_channels": 3,
    "encoder_block_out_channels": (32, 32, 32, 32),
    "decoder_block_out_channels": (32, 32, 32, 32),
    "latent_channels": 12,
    "layers_per_block": (0, 0, 1, 1, 1),
    "act_fn": "silu",
    "temporal_expansions": (1, 2, 3),
    "spatial_expansions": (2, 2, 2),
    "add_attention_block": (False, True, True, True, True),
    "scaling_factor": 1.0,
}
T5_CONFIG = {
    "d_model": TEXT_WIDTH,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    **T5_V1_1_FLAGS,  # T5 v1.1, as T5-XXL
}
TINY_TOML = """\
# Generation defaults that fit the tiny random Mochi written next to this file (batchgen tiny-model).
# 13 frames (T = 3 latent frames) at 64x64 (8x8 latent, 4x4 patches): 48 visual tokens, which divide by
# 1, 2, 4 and 8, and 4 heads: Ulysses 1, 2 or 4, ring 1, 2 or 4.
[generation]
num_frames = 13
height = 64
width = 64
num_inference_steps = 4
guidance_scale = 4.5
fps = 30
"""


def write_tiny_model(directory: str | Path, *, seed: int = 0, layout: str = "diffusers") -> Path:
    """Write the tiny model into ``directory`` (created; must be empty or absent) and return its path.

    ``layout="original"`` writes the DiT as ``dit.safetensors`` in Genmo's key layout (same weights) instead of
    ``transformer/``, to exercise the original-layout loader; the other components stay in their subfolders.
    """
    import torch
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from batchgen.core.errors import InputError
    from batchgen.models.common.weights import quiet_progress_bars
    from batchgen.models.mochi.loading import ORIGINAL_DIT, diffusers_to_original_state_dict

    if layout not in ("diffusers", "original"):
        raise InputError(f"layout must be 'diffusers' or 'original', got {layout!r}")
    root = fresh_directory(directory)
    quiet_progress_bars()

    vocab_size = write_tokenizer(root / "tokenizer")

    generator = torch.Generator().manual_seed(seed)

    transformer = MochiTransformer3DModel(**TRANSFORMER_CONFIG)
    randomize_parameters(transformer, generator)
    if layout == "diffusers":
        transformer.save_pretrained(str(root / "transformer"), safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file(diffusers_to_original_state_dict(transformer.state_dict()), str(root / ORIGINAL_DIT))

    vae = AutoencoderKLMochi(**VAE_CONFIG)
    randomize_parameters(vae, generator)
    vae.save_pretrained(str(root / "vae"), safe_serialization=True)

    t5_config = T5Config(vocab_size=vocab_size, **T5_CONFIG)
    text_encoder = T5EncoderModel(t5_config)
    randomize_parameters(text_encoder, generator)
    text_encoder.save_pretrained(str(root / "text_encoder"), safe_serialization=True)

    scheduler = FlowMatchEulerDiscreteScheduler(**MOCHI_SCHEDULER_CONFIG)
    scheduler.save_pretrained(str(root / "scheduler"))

    if layout == "diffusers":
        (root / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")
    (root / TINY_TOML_NAME).write_text(TINY_TOML)
    log.info("wrote tiny Mochi (seed %d, %s layout) to %s", seed, layout, root)
    return root


def _model_index() -> dict:
    return {
        "_class_name": "MochiPipeline",
        "_diffusers_version": _diffusers_version(),
        # Genmo's own sampler encodes an empty negative prompt as zeros; batchgen always does, so the stock
        # MochiPipeline loaded from this folder behaves the same.
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "MochiTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLMochi"],
    }


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# Real sizes (genmo/mochi-1-preview; T5 = google/t5-v1_1-xxl's encoder) for benchmarks with random weights.
T5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    **T5_V1_1_FLAGS,
}


def build_random_components(
    *, full_size: bool = True, dtype: Any = "auto", device: Any = None, seed: int = 0
) -> MochiComponents:
    """Mochi with random weights built in memory: the real architecture sizes (``full_size``: 10 B DiT, full VAE,
    T5-XXL encoder) or the tiny model's. Modules are created on the meta device and materialised once, straight
    in ``dtype`` on ``device`` (default: CUDA when available, where random fill is fast). The tokenizer is the
    tiny model's offline one (its ids are valid for T5-XXL's vocabulary; prompts are padded to 256 anyway)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiTransformer3DModel
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # type: ignore[attr-defined]  # a run-time alias in transformers 5

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, device)
    if full_size:
        transformer_config, vae_config, t5_config = {}, {}, dict(T5_XXL_CONFIG)
    else:
        transformer_config, vae_config = dict(TRANSFORMER_CONFIG), dict(VAE_CONFIG)
        t5_config = dict(T5_CONFIG, vocab_size=len(tokenizer_vocab()))
    generator = torch.Generator(device).manual_seed(seed)

    def materialise(build):
        with torch.device("meta"):
            module = build()
        module.to_empty(device=device)
        randomize_parameters(module, generator)
        for name, param in module.named_parameters():
            if name not in FP32_TENSORS:
                param.data = param.data.to(dtype)
        return module.eval().requires_grad_(False)

    transformer = materialise(lambda: MochiTransformer3DModel(**transformer_config))
    vae = materialise(lambda: AutoencoderKLMochi(**vae_config))
    text_encoder = materialise(lambda: T5EncoderModel(T5Config(**t5_config)))
    with tempfile.TemporaryDirectory(prefix="batchgen-tokenizer-") as scratch:
        write_tokenizer(Path(scratch))
        tokenizer = T5TokenizerFast.from_pretrained(scratch)
    scheduler = FlowMatchEulerDiscreteScheduler(**MOCHI_SCHEDULER_CONFIG)
    return MochiComponents(transformer, vae, text_encoder, tokenizer, scheduler, layout="memory")
