"""Loading Wan 2.1 / 2.2 text-to-video components from a model directory.

Diffusers layout (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, ``Wan-AI/Wan2.2-T2V-A14B-Diffusers``)::

    model_index.json  scheduler/  text_encoder/  tokenizer/  transformer/  [transformer_2/]  vae/

Wan 2.2 A14B has two experts: ``transformer/`` denoises the high-noise steps, ``transformer_2/`` the low-noise ones,
switched at ``boundary_ratio`` (model_index.json) of the training timesteps.

The official release layout (``config.json`` with ``model_type`` at the root, or ``high_noise_model/`` and
``low_noise_model/``) is detected here (the same test as ``wan_original.is_official_layout``) and loaded by
``batchgen.models.wan.original``: ``read_official_transformer_config(model_dir)`` and
``load_official_components(model_dir, *, dtype, device)`` (a dict of ``WanComponents``' fields).

``read_transformer_config`` and ``detect_wan_layout`` import nothing heavy (planning and topology checks use them).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgen.core.errors import InputError
from batchgen.models.common.weights import (
    check_safetensors_complete,
    device_map,
    quiet_progress_bars,
    read_json_object,
    refuse_config_without_weights,
    require_dir,
    resolve_dtype,
    transformers_dtype_kwarg,
    variant_for,
    weight_files,
)

log = logging.getLogger("batchgen.generate.wan_loading")

OFFICIAL_MODULE = "batchgen.models.wan.original"
EXPERTS = ("transformer", "transformer_2")
COMPONENTS = (
    ("tokenizer", "UMT5 tokenizer: tokenizer.json or spiece.model"),
    ("text_encoder", "UMT5 encoder weights"),
    ("vae", "AutoencoderKLWan weights"),
    ("scheduler", "scheduler_config.json"),
)


@dataclass
class WanComponents:
    transformer: Any
    """The only expert of Wan 2.1, or Wan 2.2's high-noise expert (timesteps >= the boundary)."""
    transformer_2: Any | None
    """Wan 2.2's low-noise expert, None for one-expert models."""
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    boundary_ratio: float | None = None
    layout: str = "diffusers"
    """'diffusers', 'official' (the official release layout, see wan_original) or 'memory' (built in process)."""

    @property
    def experts(self) -> list[Any]:
        return [t for t in (self.transformer, self.transformer_2) if t is not None]


# ----------------------------------------------------------------------------------------------------------------
# Cheap inspection (no torch)


def detect_wan_layout(model_dir: str | Path) -> str:
    """'diffusers' when transformer/ holds weights, 'official' for the official release layout; else InputError."""
    path = require_dir(model_dir)
    if weight_files(path / "transformer"):
        return "diffusers"
    if (path / "high_noise_model").is_dir() or "model_type" in read_json_object(path / "config.json"):
        return "official"
    refuse_config_without_weights(path)
    raise InputError(
        f"{path}: not a Wan model directory: expected transformer/diffusion_pytorch_model*.safetensors "
        "(diffusers layout, with model_index.json) or config.json with model_type (the official release layout)"
    )


def read_transformer_config(model_dir: str | Path) -> dict[str, Any]:
    """The (first) expert's WanTransformer3DModel config: num_attention_heads, attention_head_dim, patch_size, ..."""
    path = require_dir(model_dir)
    config_path = path / "transformer" / "config.json"
    if not config_path.is_file() and detect_wan_layout(path) == "official":
        return importlib.import_module(OFFICIAL_MODULE).read_official_transformer_config(path)
    config = read_json_object(config_path, required=True)
    if "num_attention_heads" not in config:
        raise InputError(f"{config_path}: not a WanTransformer3DModel config (no num_attention_heads)")
    return config


def read_boundary_ratio(model_dir: str | Path) -> float | None:
    """Wan 2.2's expert switch from model_index.json (None: one expert)."""
    index_path = Path(model_dir) / "model_index.json"
    ratio = read_json_object(index_path).get("boundary_ratio")
    if ratio is None:
        return None
    if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise InputError(f"{index_path}: boundary_ratio must be a number between 0 and 1, got {ratio!r}")
    return float(ratio)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_wan_components(model_dir: str | Path, *, dtype: Any = "auto", device: Any = "cpu") -> WanComponents:
    """Transformer(s), VAE, UMT5 encoder, tokenizer and scheduler from ``model_dir``.

    The transformers and VAE are placed on ``device``; the text encoder is loaded to CPU (it visits the GPU once
    per shard). InputError names the missing, truncated or unreadable file.
    """
    import torch

    quiet_progress_bars()
    path = require_dir(model_dir)
    layout = detect_wan_layout(path)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    if layout == "official":
        fields = importlib.import_module(OFFICIAL_MODULE).load_official_components(path, dtype=dtype, device=device)
        return WanComponents(**fields)
    boundary_ratio = read_boundary_ratio(path)
    experts = EXPERTS if boundary_ratio is not None else EXPERTS[:1]
    _check_files(path, experts)
    try:
        components = _load_diffusers(path, experts, boundary_ratio, dtype, device)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        raise InputError(f"{path}: cannot load the model: {e}") from e
    for module in (*components.experts, components.vae, components.text_encoder):
        module.eval().requires_grad_(False)
    log.info("loaded Wan (%d expert(s)) from %s in %s on %s", len(experts), path, dtype, device)
    return components


def _check_files(path: Path, experts: tuple[str, ...]) -> None:
    for name, what in COMPONENTS:
        if not (path / name).exists():
            raise InputError(f"{path / name}: missing ({what})")
    for name in (*experts, "text_encoder", "vae"):
        if not weight_files(path / name):
            raise InputError(f"{path / name}: no weight file (*.safetensors)")
        for file in (path / name).glob("*.safetensors"):
            check_safetensors_complete(file)


def _load_diffusers(path: Path, experts: tuple[str, ...], boundary_ratio, dtype, device) -> WanComponents:
    import diffusers
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    def from_folder(cls, name, dtype=dtype):
        folder = path / name
        # Straight into the final dtype and device, tensor by tensor; diffusers keeps the classes'
        # _keep_in_fp32_modules (Wan: RoPE, time embedder, modulation tables, norms) in fp32.
        kwargs = {"dtype": dtype, "variant": variant_for(folder, dtype), "low_cpu_mem_usage": True}
        return cls.from_pretrained(str(folder), **kwargs, **device_map(device)).to(device)

    scheduler_class = read_json_object(path / "scheduler" / "scheduler_config.json", required=True).get("_class_name")
    if not isinstance(scheduler_class, str) or not hasattr(diffusers, scheduler_class):
        raise InputError(f"{path / 'scheduler' / 'scheduler_config.json'}: unknown scheduler {scheduler_class!r}")
    transformers = [from_folder(WanTransformer3DModel, name) for name in experts]
    return WanComponents(
        transformer=transformers[0],
        transformer_2=transformers[1] if len(transformers) > 1 else None,
        # The VAE in fp32 whatever the transformer's dtype, as diffusers' Wan example loads it: it is small
        # (0.5 GB) and decodes once per video.
        vae=from_folder(AutoencoderKLWan, "vae", torch.float32),
        text_encoder=UMT5EncoderModel.from_pretrained(
            str(path / "text_encoder"),
            variant=variant_for(path / "text_encoder", dtype),
            **transformers_dtype_kwarg(dtype),
        ),
        tokenizer=AutoTokenizer.from_pretrained(str(path / "tokenizer")),
        scheduler=getattr(diffusers, scheduler_class).from_pretrained(str(path / "scheduler")),
        boundary_ratio=boundary_ratio,
        layout="diffusers",
    )
