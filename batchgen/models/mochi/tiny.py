"""A tiny randomly initialised Mochi in exactly the diffusers layout of ``genmo/mochi-1-preview``.

Same classes, same file names, same config keys as the real weights, so it loads through the same code path
(``batchgen.models.mochi.loading``); only the sizes are small. Its default shape (13 frames, 64x64 -> 3 x 4 x 4 = 48
visual tokens) and its 4 heads allow sequence-parallel degrees 1, 2 and 4. Deterministic given the seed: every
tensor comes from one seeded generator, and the tokenizer is built offline from a fixed vocabulary.
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path

from batchgen.models.mochi.loading import T5_V1_1_FLAGS

log = logging.getLogger("batchgen.generate.tiny")

TINY_TOML_NAME = "batchgen-tiny.toml"

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


def tokenizer_vocab() -> list[tuple[str, float]]:
    """A small SentencePiece-style unigram vocabulary: T5's special tokens first (pad 0, eos 1, unk 2), then
    word-initial and inner pieces for letters and digits, then some whole words, so ordinary prompts tokenize
    into several tokens and unknown characters into <unk>."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_lowercase + string.digits + ".,!?'-":
        pieces.append((ch, -5.0))
        pieces.append(("\u2581" + ch, -5.5))
    for word in (
        "a the of and in on with at to is cat dog bird fish car tree sky sea city night day sun moon red blue "
        "green white black close up slow motion video camera walking running flying water fire snow forest"
    ).split():
        pieces.append(("\u2581" + word, -3.0))
    return pieces


def fresh_directory(directory: str | Path) -> Path:
    """``directory``, created if missing; InputError if it holds anything (a tiny model never overwrites)."""
    from batchgen.core.errors import InputError

    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root}: directory is not empty; the tiny model needs a fresh directory")
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_tokenizer(path: Path, *, model_max_length: int = 256) -> int:
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=tokenizer_vocab(), extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(path))
    return len(tokenizer)


def write_tiny_model(directory: str | Path, *, seed: int = 0, layout: str = "diffusers") -> Path:
    """Write the tiny model into ``directory`` (created; must be empty or absent) and return its path.

    ``layout="original"`` writes the DiT as ``dit.safetensors`` in Genmo's key layout (same weights) instead of
    ``transformer/``, to exercise the original-layout loader; the other components stay in their subfolders.
    """
    import torch
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from batchgen.core.errors import InputError
    from batchgen.models.mochi.loading import (
        MOCHI_SCHEDULER_CONFIG,
        ORIGINAL_DIT,
        diffusers_to_original_state_dict,
        quiet_progress_bars,
    )

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

    model_index = {
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
    if layout == "diffusers":
        (root / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    (root / TINY_TOML_NAME).write_text(TINY_TOML)
    log.info("wrote tiny Mochi (seed %d, %s layout) to %s", seed, layout, root)
    return root


def randomize_parameters(module, generator) -> None:
    """Fill every parameter from ``generator`` (on the parameters' device): fan-in scaled normals for matrices
    and convolutions (activations stay O(1) through many layers), gains near 1 for norms, small biases, and
    RoPE frequencies that visibly rotate neighbouring positions. Explicit values instead of each class's default
    init: deterministic across library versions, and nothing zero-initialised (pos_frequencies, adaLN) that
    would hide a bug in RoPE or modulation handling."""
    import torch

    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32, device=param.device)
            if name == "pos_frequencies":
                values = values.abs() * 0.25
            elif param.ndim > 1:
                values = values / param[0].numel() ** 0.5
            elif ("norm" in name and name.endswith("weight")) or name.endswith(".gamma"):
                # .gamma: the gains of the Wan VAE's RMS norms
                values = 1.0 + 0.1 * values
            else:
                values = values * 0.02
            param.copy_(values)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
