"""A tiny randomly initialised Wan in exactly the diffusers layout of the Wan-AI releases.

``experts=1`` mirrors ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``; ``experts=2`` mirrors ``Wan-AI/Wan2.2-T2V-A14B-Diffusers``
(a high-noise ``transformer/`` and a low-noise ``transformer_2/``, switched at ``boundary_ratio`` 0.875 of the
training timesteps). Same classes, file names and config keys as the real weights, so the tiny model loads through
``batchgen.models.wan.loading`` and through diffusers' ``WanPipeline.from_pretrained``; only the sizes are small.

Its default shape (9 frames, 64x64 -> 3 x 4 x 4 = 48 visual tokens) and its 4 heads allow Ulysses 1, 2 and 4 and
ring degrees dividing 48. Deterministic given the seed: every tensor comes from one seeded generator and the
tokenizer is built offline from a fixed vocabulary (``batchgen.models.common.tiny``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from batchgen.models.common.tiny import TINY_TOML_NAME
from batchgen.models.wan.original import UMT5_FLAGS

log = logging.getLogger("batchgen.generate.wan_tiny")

# Wan 2.2 A14B's model_index.json and the official t2v_A14B config (wan/configs/wan_t2v_A14B.py: boundary 0.875).
BOUNDARY_RATIO = 0.875
TEXT_WIDTH = 32
# Real values kept where they cost nothing: patch (1, 2, 2), 16 latent channels, RMS q/k norm across heads, the
# cross-attention norm, 1024 RoPE positions per axis. Head dim 24 gives RoPE's three axes 8 dims each (Wan splits
# head_dim - 2 * 2 * (head_dim // 6) to time, 2 * (head_dim // 6) to each of height and width).
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": TEXT_WIDTH,
    "freq_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}
# The real VAE's structure (4x temporal, 8x spatial, z_dim 16, two residual blocks per level, Wan 2.1's latent
# statistics: the class defaults; the structure wan_original's official layout can hold) at an eighth of its width.
VAE_CONFIG: dict[str, Any] = {
    "base_dim": 12,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}
# google/umt5-xxl's encoder (Wan's text encoder) at tiny width; UMT5 keeps a relative-position bias per layer.
UMT5_CONFIG: dict[str, Any] = {
    "d_model": TEXT_WIDTH,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    **UMT5_FLAGS,
}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers' scheduler/scheduler_config.json; the A14B release samples with shift 12
# (sample_shift in the official wan/configs/wan_t2v_A14B.py).
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
A14B_FLOW_SHIFT = 12.0
TINY_TOML = """\
# Settings that fit the tiny random Wan written next to this file (batchgen tiny-model --family wan).
# 9 frames (T = 3 latent frames) at 64x64 (8x8 latent, 4x4 patches): 48 visual tokens, which divide by
# 1, 2, 4 and 8, and 4 heads: Ulysses 1, 2 or 4.
[model]
family = "wan"

[generation]
num_frames = 9
height = 64
width = 64
num_inference_steps = 4
guidance_scale = 5.0
fps = 16
"""


def write_tiny_wan(directory: str | Path, *, seed: int = 0, experts: int = 1) -> Path:
    """Write the tiny Wan into ``directory`` (created; must be empty or absent) and return its path."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from batchgen.core.errors import InputError
    from batchgen.models.common.tiny import fresh_directory, randomize_parameters, write_tokenizer
    from batchgen.models.common.weights import quiet_progress_bars

    if experts not in (1, 2):
        raise InputError(f"experts must be 1 (Wan 2.1) or 2 (Wan 2.2 A14B), got {experts!r}")
    root = fresh_directory(directory)
    quiet_progress_bars()

    vocab_size = write_tokenizer(root / "tokenizer", model_max_length=512)
    generator = torch.Generator().manual_seed(seed)

    transformers = ("transformer", "transformer_2")[:experts]
    for name in transformers:
        transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
        randomize_parameters(transformer, generator)
        transformer.save_pretrained(str(root / name), safe_serialization=True)

    vae = AutoencoderKLWan(**VAE_CONFIG)
    randomize_parameters(vae, generator)
    vae.save_pretrained(str(root / "vae"), safe_serialization=True)

    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **UMT5_CONFIG))
    randomize_parameters(text_encoder, generator)
    text_encoder.save_pretrained(str(root / "text_encoder"), safe_serialization=True)

    flow_shift = A14B_FLOW_SHIFT if experts == 2 else SCHEDULER_CONFIG["flow_shift"]
    UniPCMultistepScheduler(**dict(SCHEDULER_CONFIG, flow_shift=flow_shift)).save_pretrained(str(root / "scheduler"))

    (root / "model_index.json").write_text(json.dumps(_model_index(experts), indent=2) + "\n")
    (root / TINY_TOML_NAME).write_text(TINY_TOML)
    log.info("wrote tiny Wan (seed %d, %d expert(s)) to %s", seed, experts, root)
    return root


def _model_index(experts: int) -> dict[str, Any]:
    import diffusers

    index: dict[str, Any] = {
        "_class_name": "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if experts == 2:
        index["boundary_ratio"] = BOUNDARY_RATIO
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    return index
