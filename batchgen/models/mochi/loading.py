"""Loading Mochi's components from a model directory, in the diffusers layout or Genmo's original layout.

Diffusers layout (``genmo/mochi-1-preview``)::

    model_index.json  scheduler/  text_encoder/  tokenizer/  transformer/  vae/     (optionally *.bf16.* variants)

Original layout (Genmo's release): ``dit.safetensors`` in the model directory holds the DiT in Genmo's key layout;
the other components still come from the diffusers subfolders (``text_encoder/``, ``tokenizer/``, ``vae/``;
``scheduler/`` optional). The DiT's config is read from ``transformer/config.json`` when present, otherwise
inferred from the tensor shapes in the checkpoint header.

Weights load once, directly in their final dtype: diffusers and transformers load tensor by tensor into an empty
model (``low_cpu_mem_usage``), and the original-layout DiT is streamed one tensor at a time from the memory-mapped
file, converted, cast and placed, so no fp32 copy of the 10 B model ever exists in host memory.

``read_transformer_config`` and ``fingerprint_model_dir`` import nothing heavy: topology checks and planning use
them before any weights load.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from batchgen.core.errors import InputError
from batchgen.models.common.weights import (
    BF16_VARIANT,
    check_safetensors_complete,
    device_map,
    quiet_progress_bars,
    read_safetensors_header,
    refuse_config_without_weights,
    require,
    require_dir,
    resolve_dtype,
    transformers_dtype_kwarg,
    variant_for,
    weight_files,
)

log = logging.getLogger("batchgen.generate.loading")

ORIGINAL_DIT = "dit.safetensors"
SUBFOLDERS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")

# genmo/mochi-1-preview's scheduler/scheduler_config.json (Mochi runs sigmas from 1 down, hence invert_sigmas);
# used when an original-layout directory has no scheduler/, and by the tiny model.
MOCHI_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": True,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# Tensors kept in fp32 whatever the model dtype: RoPE frequencies (fp32 positions x bf16 frequencies lose the
# fine phase of distant tokens). q/k norm gains stay in the model dtype because diffusers' RMSNorm returns fp32
# for fp32 gains, which the stock attention processor cannot mix with bf16 values.
FP32_TENSORS = ("pos_frequencies",)


@dataclass
class MochiComponents:
    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    layout: str = "diffusers"
    """'diffusers', 'original' or 'memory' (built in process, e.g. by the GPU benchmark)."""

    @property
    def experts(self) -> list[Any]:
        """The denoising transformers, as Wan 2.2's list of experts: Mochi has one."""
        return [self.transformer]


# ----------------------------------------------------------------------------------------------------------------
# Cheap inspection (no torch)


def detect_layout(model_dir: str | Path) -> str:
    """'diffusers' when transformer/ holds weights, 'original' when dit.safetensors exists; else InputError."""
    path = require_dir(model_dir)
    if weight_files(path / "transformer"):
        return "diffusers"
    if (path / ORIGINAL_DIT).is_file():
        return "original"
    refuse_config_without_weights(path)
    raise InputError(
        f"{path}: not a Mochi model directory: expected transformer/diffusion_pytorch_model*.safetensors "
        f"(diffusers layout, with model_index.json) or {ORIGINAL_DIT} (Genmo's original layout)"
    )


def _strip_prefix(name: str) -> str:
    # ComfyUI repackagings put the DiT under this prefix; diffusers' own converter strips it too.
    return name.replace("model.diffusion_model.", "", 1) if name.startswith("model.diffusion_model.") else name


def infer_original_transformer_config(header: dict[str, Any], source: str = ORIGINAL_DIT) -> dict[str, Any]:
    """MochiTransformer3DModel config from the shapes in an original-layout checkpoint header."""
    shapes = {_strip_prefix(k): v["shape"] for k, v in header.items()}
    try:
        _three, heads, half_head_dim = shapes["pos_frequencies"]
        inner, in_channels, patch, _patch = shapes["x_embedder.proj.weight"]
        pooled_projection_dim, text_embed_dim = shapes["t5_yproj.weight"]
        _inner, time_embed_dim = shapes["t_embedder.mlp.0.weight"]
        out_features, _inner = shapes["final_layer.linear.weight"]
    except (KeyError, ValueError) as e:
        raise InputError(
            f"{source}: not a Mochi DiT checkpoint in Genmo's layout (missing or odd tensor {e})"
        ) from None
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise InputError(f"{source}: transformer blocks are missing or not numbered 0..N-1")
    return {
        "patch_size": patch,
        "num_attention_heads": heads,
        "attention_head_dim": 2 * half_head_dim,
        "num_layers": len(blocks),
        "pooled_projection_dim": pooled_projection_dim,
        "in_channels": in_channels,
        "out_channels": out_features // (patch * patch),
        "qk_norm": "rms_norm",
        "text_embed_dim": text_embed_dim,
        "time_embed_dim": time_embed_dim,
        "activation_fn": "swiglu",
        "max_sequence_length": 256,
    }


def read_transformer_config(model_dir: str | Path) -> dict[str, Any]:
    """The DiT's config (num_attention_heads, patch_size, ...) from JSON or the checkpoint header; no torch."""
    path = require_dir(model_dir)
    config_path = path / "transformer" / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{config_path}: not valid JSON: {e}") from None
        if not isinstance(config, dict) or "num_attention_heads" not in config:
            raise InputError(f"{config_path}: not a MochiTransformer3DModel config (no num_attention_heads)")
        return config
    if (path / ORIGINAL_DIT).is_file():
        return infer_original_transformer_config(read_safetensors_header(path / ORIGINAL_DIT), str(path / ORIGINAL_DIT))
    raise InputError(f"{path}: missing transformer/config.json (diffusers layout) and {ORIGINAL_DIT} (original layout)")


# ----------------------------------------------------------------------------------------------------------------
# Genmo's original key layout <-> diffusers (generalises diffusers' convert_mochi_transformer_checkpoint_to_diffusers,
# which hard-codes 48 blocks, to any block count; tests check the two agree at 48)


@dataclass(frozen=True)
class _Source:
    key: str
    """Original-layout tensor name."""
    part: str = "all"
    """'all'; 'q'/'k'/'v' (a third of a fused qkv along dim 0); 'swap_halves' (the two halves of dim 0 swapped:
    diffusers orders the SwiGLU projection as [gate; proj] where Genmo has [proj; gate], and the final adaLN as
    [scale; shift] where Genmo has [shift; scale])."""


def original_key_plan(num_layers: int) -> dict[str, _Source]:
    """diffusers parameter name -> where it comes from in the original checkpoint."""
    plan: dict[str, _Source] = {
        "patch_embed.proj.weight": _Source("x_embedder.proj.weight"),
        "patch_embed.proj.bias": _Source("x_embedder.proj.bias"),
        "time_embed.timestep_embedder.linear_1.weight": _Source("t_embedder.mlp.0.weight"),
        "time_embed.timestep_embedder.linear_1.bias": _Source("t_embedder.mlp.0.bias"),
        "time_embed.timestep_embedder.linear_2.weight": _Source("t_embedder.mlp.2.weight"),
        "time_embed.timestep_embedder.linear_2.bias": _Source("t_embedder.mlp.2.bias"),
        "time_embed.pooler.to_kv.weight": _Source("t5_y_embedder.to_kv.weight"),
        "time_embed.pooler.to_kv.bias": _Source("t5_y_embedder.to_kv.bias"),
        "time_embed.pooler.to_q.weight": _Source("t5_y_embedder.to_q.weight"),
        "time_embed.pooler.to_q.bias": _Source("t5_y_embedder.to_q.bias"),
        "time_embed.pooler.to_out.weight": _Source("t5_y_embedder.to_out.weight"),
        "time_embed.pooler.to_out.bias": _Source("t5_y_embedder.to_out.bias"),
        "time_embed.caption_proj.weight": _Source("t5_yproj.weight"),
        "time_embed.caption_proj.bias": _Source("t5_yproj.bias"),
    }
    for i in range(num_layers):
        new, old = f"transformer_blocks.{i}.", f"blocks.{i}."
        last = i == num_layers - 1
        plan[new + "norm1.linear.weight"] = _Source(old + "mod_x.weight")
        plan[new + "norm1.linear.bias"] = _Source(old + "mod_x.bias")
        # The last block only consumes the text stream (context_pre_only): its text modulation is an adaLN.
        context_norm = "norm1_context.linear_1" if last else "norm1_context.linear"
        plan[new + context_norm + ".weight"] = _Source(old + "mod_y.weight")
        plan[new + context_norm + ".bias"] = _Source(old + "mod_y.bias")
        for part in ("q", "k", "v"):
            plan[new + f"attn1.to_{part}.weight"] = _Source(old + "attn.qkv_x.weight", part)
            plan[new + f"attn1.add_{part}_proj.weight"] = _Source(old + "attn.qkv_y.weight", part)
        plan[new + "attn1.norm_q.weight"] = _Source(old + "attn.q_norm_x.weight")
        plan[new + "attn1.norm_k.weight"] = _Source(old + "attn.k_norm_x.weight")
        plan[new + "attn1.norm_added_q.weight"] = _Source(old + "attn.q_norm_y.weight")
        plan[new + "attn1.norm_added_k.weight"] = _Source(old + "attn.k_norm_y.weight")
        plan[new + "attn1.to_out.0.weight"] = _Source(old + "attn.proj_x.weight")
        plan[new + "attn1.to_out.0.bias"] = _Source(old + "attn.proj_x.bias")
        plan[new + "ff.net.0.proj.weight"] = _Source(old + "mlp_x.w1.weight", "swap_halves")
        plan[new + "ff.net.2.weight"] = _Source(old + "mlp_x.w2.weight")
        if not last:
            plan[new + "attn1.to_add_out.weight"] = _Source(old + "attn.proj_y.weight")
            plan[new + "attn1.to_add_out.bias"] = _Source(old + "attn.proj_y.bias")
            plan[new + "ff_context.net.0.proj.weight"] = _Source(old + "mlp_y.w1.weight", "swap_halves")
            plan[new + "ff_context.net.2.weight"] = _Source(old + "mlp_y.w2.weight")
    plan["norm_out.linear.weight"] = _Source("final_layer.mod.weight", "swap_halves")
    plan["norm_out.linear.bias"] = _Source("final_layer.mod.bias", "swap_halves")
    plan["proj_out.weight"] = _Source("final_layer.linear.weight")
    plan["proj_out.bias"] = _Source("final_layer.linear.bias")
    plan["pos_frequencies"] = _Source("pos_frequencies")
    return plan


class _RowSource(Protocol):
    """A tensor, or a safetensors slice that reads only the rows asked for."""

    def __getitem__(self, rows: slice, /) -> Any: ...


def _take(source: _RowSource, rows: int, part: str):
    """Materialise one converted tensor from row ranges of its source (only the rows needed are read)."""
    import torch

    if part == "all":
        return source[0:rows]
    if part in ("q", "k", "v"):
        third = rows // 3
        start = "qkv".index(part) * third
        return source[start : start + third]
    if part == "swap_halves":
        half = rows // 2
        return torch.cat([source[half:rows], source[0:half]], dim=0)
    raise ValueError(part)


def convert_original_state_dict(state_dict: dict[str, Any], num_layers: int | None = None) -> dict[str, Any]:
    """Original-layout tensors -> diffusers names (in memory; for checks and small models)."""
    state_dict = {_strip_prefix(k): v for k, v in state_dict.items()}
    if num_layers is None:
        num_layers = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    plan = original_key_plan(num_layers)
    _check_keys(set(state_dict), plan, "state dict")
    converted = {}
    for name, src in plan.items():
        tensor = state_dict[src.key]
        converted[name] = _take(tensor, tensor.shape[0], src.part).clone()
    return converted


def diffusers_to_original_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The inverse: a MochiTransformer3DModel state dict in Genmo's original key layout (dit.safetensors)."""
    import torch

    num_layers = len({k.split(".")[1] for k in state_dict if k.startswith("transformer_blocks.")})
    plan = original_key_plan(num_layers)
    missing = sorted(set(plan) - set(state_dict))
    if missing:
        raise ValueError(f"not a MochiTransformer3DModel state dict: missing {missing[:5]}")
    fused: dict[str, dict[str, Any]] = {}
    original: dict[str, Any] = {}
    for name, src in plan.items():
        tensor = state_dict[name]
        if src.part in ("q", "k", "v"):
            fused.setdefault(src.key, {})[src.part] = tensor
        elif src.part == "swap_halves":
            half = tensor.shape[0] // 2
            original[src.key] = torch.cat([tensor[half:], tensor[:half]], dim=0).contiguous()
        else:
            original[src.key] = tensor.contiguous()
    for key, parts in fused.items():
        original[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0).contiguous()
    return original


def _check_keys(available: set[str], plan: dict[str, _Source], source: str) -> None:
    needed = {src.key for src in plan.values()}
    missing = sorted(needed - available)
    if missing:
        raise InputError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(available - needed)
    if unexpected:
        raise InputError(f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")


def _stream_original_dit(path: Path, num_layers: int, dtype, device) -> Iterator[tuple[str, Any]]:
    """Yield (diffusers name, tensor in its final dtype on ``device``) one tensor at a time."""
    import torch
    from safetensors import safe_open

    plan = original_key_plan(num_layers)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = {_strip_prefix(k): k for k in f.keys()}
        _check_keys(set(names), plan, str(path))
        for name, src in plan.items():
            sliced = f.get_slice(names[src.key])
            tensor = _take(sliced, sliced.get_shape()[0], src.part)
            target = torch.float32 if name in FP32_TENSORS else dtype
            yield name, tensor.to(device=device, dtype=target)
            del tensor


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_components(model_dir: str | Path, *, dtype: Any = "auto", device: Any = "cpu") -> MochiComponents:
    """Load transformer, VAE, T5 encoder, tokenizer and scheduler from ``model_dir`` (either layout).

    The transformer and VAE are placed on ``device``; the T5 encoder is loaded to CPU (it visits the GPU once per
    shard, see MochiGenerator.encode_prompts). InputError names the missing or unreadable file.
    """
    import torch

    quiet_progress_bars()
    path = require_dir(model_dir)
    layout = detect_layout(path)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    _check_files(path)
    try:
        components = _load(path, layout, dtype, device)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        raise InputError(f"{path}: cannot load the model: {e}") from e
    for module in (components.transformer, components.vae, components.text_encoder):
        module.eval().requires_grad_(False)
    log.info("loaded Mochi (%s layout) from %s in %s on %s", layout, path, dtype, device)
    return components


def _check_files(path: Path) -> None:
    """InputError naming the first missing folder, missing weights or truncated safetensors file."""
    for name, what in (
        ("tokenizer", "T5 tokenizer: tokenizer.json or spiece.model"),
        ("text_encoder", "T5 encoder weights"),
        ("vae", "AutoencoderKLMochi weights"),
    ):
        require(path / name, what)
    if not weight_files(path / "text_encoder"):
        raise InputError(f"{path / 'text_encoder'}: no weight file (model*.safetensors)")
    if not weight_files(path / "vae"):
        hint = " (decoder.safetensors from the original release is not converted: take vae/ from genmo/mochi-1-preview)"
        raise InputError(
            f"{path / 'vae'}: no weight file (diffusion_pytorch_model*.safetensors){hint if (path / 'decoder.safetensors').exists() else ''}"
        )
    for folder in (path / "transformer", path / "text_encoder", path / "vae", path):
        for file in folder.glob("*.safetensors") if folder.is_dir() else ():
            check_safetensors_complete(file)


def _load(path: Path, layout: str, dtype, device) -> MochiComponents:
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiTransformer3DModel
    from transformers import T5EncoderModel, T5TokenizerFast  # type: ignore[attr-defined]  # a run-time alias in transformers 5

    if layout == "diffusers":
        folder = path / "transformer"
        transformer = MochiTransformer3DModel.from_pretrained(
            str(folder), torch_dtype=dtype, variant=variant_for(folder, dtype), low_cpu_mem_usage=True,
            **device_map(device),
        )  # fmt: skip
        _restore_fp32(transformer, folder)
    else:
        transformer = load_original_transformer(path, dtype=dtype, device=device)
    transformer.to(device)
    vae = AutoencoderKLMochi.from_pretrained(
        str(path / "vae"), torch_dtype=dtype, variant=variant_for(path / "vae", dtype), low_cpu_mem_usage=True,
        **device_map(device),
    ).to(device)  # fmt: skip
    text_encoder = T5EncoderModel.from_pretrained(
        str(path / "text_encoder"), variant=variant_for(path / "text_encoder", dtype), **transformers_dtype_kwarg(dtype)
    )
    tokenizer = T5TokenizerFast.from_pretrained(str(path / "tokenizer"))
    if (path / "scheduler").is_dir():
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(path / "scheduler"))
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(**MOCHI_SCHEDULER_CONFIG)
    return MochiComponents(transformer, vae, text_encoder, tokenizer, scheduler, layout=layout)


def load_original_transformer(model_dir: str | Path, *, dtype, device):
    """MochiTransformer3DModel from ``dit.safetensors`` (Genmo's layout), streamed tensor by tensor."""
    import torch
    from diffusers import MochiTransformer3DModel

    path = require_dir(model_dir)
    checkpoint = path / ORIGINAL_DIT
    require(checkpoint, "the DiT in Genmo's original layout")
    config = read_transformer_config(path)
    if (path / "transformer" / "config.json").is_file():
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = MochiTransformer3DModel(**config)
    state = dict(_stream_original_dit(checkpoint, config["num_layers"], dtype, device))
    transformer.load_state_dict(state, strict=True, assign=True)
    return transformer


def _restore_fp32(transformer, folder: Path) -> None:
    """Put FP32_TENSORS back in fp32 from the fp32 weight files when the model was loaded in a lower precision."""
    import torch
    from safetensors import safe_open

    for name in FP32_TENSORS:
        param = getattr(transformer, name, None)
        if param is None or param.dtype == torch.float32:
            continue
        for file in weight_files(folder):
            if not file.name.endswith(".safetensors") or f".{BF16_VARIANT}." in file.name:
                continue
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if name in f.keys():
                    value = f.get_tensor(name)
                    if value.dtype == torch.float32:
                        setattr(transformer, name, torch.nn.Parameter(value.to(param.device), requires_grad=False))
                    break


# T5 v1.1 (the family of google/t5-v1_1-xxl, Mochi's text encoder): what every T5 built here shares, real or tiny.
T5_V1_1_FLAGS: dict[str, Any] = {
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "tie_word_embeddings": False,
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
