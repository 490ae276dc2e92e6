"""Loading Wan 2.1 / 2.2 text-to-video from the official release layout (the Wan-AI/Wan2.x-T2V-* repositories).

The official layout, as the official code reads it (Wan-Video/Wan2.1 wan/configs/wan_t2v_14B.py and wan_t2v_1_3B.py,
wan/text2video.py; Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py, wan/text2video.py)::

    config.json                                  WanModel's config (diffusers ConfigMixin, _class_name "WanModel")
    diffusion_pytorch_model.safetensors          the DiT in Wan's own key names (1.3B: one file), or
    diffusion_pytorch_model-0000i-of-0000n.safetensors + diffusion_pytorch_model.safetensors.index.json (14B)
    models_t5_umt5-xxl-enc-bf16.pth              the UMT5-XXL encoder in Wan's T5 key names (wan/modules/t5.py)
    Wan2.1_VAE.pth                               the VAE in Wan's key names (wan/modules/vae.py)
    google/umt5-xxl/                             the tokenizer (AutoTokenizer.from_pretrained, wan/modules/tokenizers.py)

Wan 2.2 T2V-A14B keeps the T5, VAE (still Wan2.1_VAE.pth) and tokenizer at the root and puts each expert's
config.json and shards in ``high_noise_model/`` and ``low_noise_model/`` (``WanModel.from_pretrained(checkpoint_dir,
subfolder=...)``). The expert switch is not in any file: it is ``boundary = 0.875`` of the training timesteps in
wan_t2v_A14B.py (the high-noise expert runs while t >= 875), the value diffusers' Wan2.2-T2V-A14B-Diffusers
``model_index.json`` also carries as ``boundary_ratio``.

Conversion: the DiT and VAE names are translated by diffusers' own single-file converters
(``convert_wan_transformer_to_diffusers``, ``convert_wan_vae_to_diffusers``): both only rename, so they are applied
to the key names alone and the tensors are then streamed one at a time, cast and placed, into an empty model (no
fp32 copy of a 14B DiT in host memory). diffusers has no converter for Wan's T5 (its conversion script downloads
google/umt5-xxl instead), so ``umt5_key_plan`` maps Wan's T5 names to transformers' ``UMT5EncoderModel``.

Sampling: the official T2V sampler is UniPC on flow-matching sigmas (``--sample_solver unipc``) with shift 5.0 for
Wan 2.1 T2V at both 480p and 720p (generate.py's default; 3.0 is only for 480p image-to-video) and
``sample_shift = 12.0`` for Wan 2.2 A14B; it becomes diffusers' ``UniPCMultistepScheduler`` with
``use_flow_sigmas`` and that ``flow_shift``.

``is_official_layout`` and ``read_official_transformer_config`` import nothing heavy (planning and topology use
them before any weights load).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from batchgen.core.errors import InputError
from batchgen.models.common.weights import (
    check_safetensors_complete,
    quiet_progress_bars,
    read_json_object,
    read_safetensors_header,
    require,
    require_dir,
    resolve_dtype,
)

log = logging.getLogger("batchgen.generate.wan_original")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model"
WEIGHTS_INDEX_NAME = f"{WEIGHTS_NAME}.safetensors.index.json"
T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
VAE_CHECKPOINT = "Wan2.1_VAE.pth"
# In WanPipeline's order: ``transformer`` runs the steps t >= boundary (high noise), ``transformer_2`` the rest.
EXPERT_FOLDERS = ("high_noise_model", "low_noise_model")
A14B_BOUNDARY_RATIO = 0.875
FLOW_SHIFT = {1: 5.0, 2: 12.0}
"""UniPC flow shift by number of experts (Wan 2.1 generate.py's T2V default; wan_t2v_A14B.py's sample_shift)."""
ROPE_MAX_SEQ_LEN = 1024
"""RoPE positions per axis: ``rope_params(1024, ...)`` in Wan's WanModel, diffusers' default."""
T5_MAX_DISTANCE = 128
"""T5RelativeEmbedding's max_dist in wan/modules/t5.py (transformers' relative_attention_max_distance)."""
UMT5_FLAGS: dict[str, Any] = {
    "relative_attention_max_distance": T5_MAX_DISTANCE,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
"""What every UMT5 encoder of Wan shares (wan/modules/t5.py's umt5_xxl), real or tiny: UMT5Config values."""
VAE_STRUCTURE = {
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}
"""The VAE structure ``_video_vae`` in wan/modules/vae.py fixes (diffusers' converter assumes it too)."""


# ----------------------------------------------------------------------------------------------------------------
# Cheap inspection (no torch)


def is_official_layout(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` looks like an official Wan release: a root config.json naming a ``model_type``
    (WanModel's config) or the A14B expert folders."""
    path = Path(model_dir)
    if not path.is_dir():
        return False
    if (path / EXPERT_FOLDERS[0]).is_dir():
        return True
    config = path / CONFIG_NAME
    return config.is_file() and "model_type" in read_json_object(config)


def expert_folders(model_dir: str | Path) -> list[Path]:
    """The folders holding each expert's config.json and shards: the root (Wan 2.1) or high- then low-noise."""
    path = require_dir(model_dir)
    if not (path / EXPERT_FOLDERS[0]).is_dir():
        return [path]
    folders = [path / folder for folder in EXPERT_FOLDERS]
    for folder in folders:
        if not folder.is_dir():
            raise InputError(
                f"{folder}: missing (Wan 2.2 A14B keeps each expert in high_noise_model/ and low_noise_model/)"
            )
    return folders


def read_official_transformer_config(model_dir: str | Path) -> dict[str, Any]:
    """The (first) expert's config in WanTransformer3DModel's keys, from config.json and the shards' headers."""
    return _expert_config(expert_folders(model_dir)[0])


def _expert_config(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG_NAME
    config = read_json_object(config_path, required=True)
    if config.get("model_type") != "t2v":
        raise InputError(
            f"{config_path}: model_type {config.get('model_type')!r} is not supported; batchgen generates "
            "text-to-video (model_type 't2v': Wan2.1-T2V-1.3B, Wan2.1-T2V-14B, Wan2.2-T2V-A14B)"
        )
    shapes = {name: entry["shape"] for shard in weight_shards(folder) for name, entry in _header(shard).items()}
    try:
        dim, heads = int(config["dim"]), int(config["num_heads"])
        patch = shapes["patch_embedding.weight"][2:]
        text_dim = shapes["text_embedding.0.weight"][1]
        if shapes["patch_embedding.weight"][0] != dim or dim % heads:
            raise ValueError(f"dim {dim} does not match patch_embedding {shapes['patch_embedding.weight']} or heads")
        return {
            "patch_size": list(patch),
            "num_attention_heads": heads,
            "attention_head_dim": dim // heads,
            "in_channels": int(config["in_dim"]),
            "out_channels": int(config["out_dim"]),
            "text_dim": int(text_dim),
            "freq_dim": int(config["freq_dim"]),
            "ffn_dim": int(config["ffn_dim"]),
            "num_layers": int(config["num_layers"]),
            # WanModel leaves these out of config.json (ignore_for_config); their tensors tell.
            "cross_attn_norm": "blocks.0.norm3.weight" in shapes,
            "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
            "eps": float(config.get("eps", 1e-6)),
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": ROPE_MAX_SEQ_LEN,
        }
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{config_path}: not a Wan T2V transformer config matching its weights ({e})") from None


def weight_shards(folder: Path) -> list[Path]:
    """The DiT's safetensors files in ``folder``: those the index names (each must exist), else the single file."""
    index_path = folder / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: no weight_map")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise InputError(f"{shard}: missing (named in {index_path.name})")
        return shards
    single = folder / f"{WEIGHTS_NAME}.safetensors"
    if not single.is_file():
        raise InputError(f"{folder}: no {single.name} and no {WEIGHTS_INDEX_NAME} (the Wan DiT weights)")
    return [single]


def _header(shard: Path) -> dict[str, Any]:
    header = read_safetensors_header(shard)
    if any(not isinstance(entry, dict) or "shape" not in entry for entry in header.values()):
        raise InputError(f"{shard}: not a safetensors file (a tensor entry has no shape)")
    return header


# ----------------------------------------------------------------------------------------------------------------
# Key names


def transformer_name_map(original_names: list[str]) -> dict[str, str]:
    """diffusers name -> Wan name for the DiT, by diffusers' converter applied to the names alone (it only renames
    for text-to-video checkpoints)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers({name: name for name in original_names})


def vae_name_map(original_names: list[str]) -> dict[str, str]:
    """diffusers name -> Wan name for the VAE (diffusers' converter, renaming only)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers({name: name for name in original_names})


def umt5_key_plan(num_layers: int) -> dict[str, str]:
    """transformers UMT5EncoderModel name -> Wan's T5Encoder name (wan/modules/t5.py, umt5_xxl: shared_pos=False,
    so every block has its own relative-position embedding, as UMT5 has per layer). Wan's feed-forward is
    ``fc1(x) * gate(x)`` with ``gate = Linear + tanh-GELU``; UMT5's gated-gelu is ``gelu_new(wi_0(x)) * wi_1(x)``."""
    plan = {"shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
    for i in range(num_layers):
        hf, wan = f"encoder.block.{i}.layer.", f"blocks.{i}."
        for part in "qkvo":
            plan[f"{hf}0.SelfAttention.{part}.weight"] = f"{wan}attn.{part}.weight"
        plan[f"{hf}0.SelfAttention.relative_attention_bias.weight"] = f"{wan}pos_embedding.embedding.weight"
        plan[f"{hf}0.layer_norm.weight"] = f"{wan}norm1.weight"
        plan[f"{hf}1.DenseReluDense.wi_0.weight"] = f"{wan}ffn.gate.0.weight"
        plan[f"{hf}1.DenseReluDense.wi_1.weight"] = f"{wan}ffn.fc1.weight"
        plan[f"{hf}1.DenseReluDense.wo.weight"] = f"{wan}ffn.fc2.weight"
        plan[f"{hf}1.layer_norm.weight"] = f"{wan}norm2.weight"
    return plan


def umt5_config(shapes: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """UMT5Config values from the shapes of Wan's T5 checkpoint (umt5_xxl: 256384 x 4096, 64 heads, 24 layers)."""
    try:
        vocab_size, d_model = shapes["token_embedding.weight"]
        num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        d_ff = shapes["blocks.0.ffn.fc1.weight"][0]
        d_kv = shapes["blocks.0.attn.q.weight"][0] // num_heads
    except (KeyError, ValueError) as e:
        raise InputError(f"{source}: not Wan's UMT5 encoder checkpoint (missing or odd tensor {e})") from None
    layers = {int(m.group(1)) for name in shapes if (m := re.match(r"blocks\.(\d+)\.", name))}
    return {
        "vocab_size": int(vocab_size),
        "d_model": int(d_model),
        "d_kv": int(d_kv),
        "d_ff": int(d_ff),
        "num_layers": len(layers),
        "num_heads": int(num_heads),
        "relative_attention_num_buckets": int(num_buckets),
        **UMT5_FLAGS,
    }


def vae_config(shapes: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """AutoencoderKLWan config from Wan2.1_VAE.pth's shapes. The official VAE (``_video_vae`` in wan/modules/vae.py)
    fixes dim_mult [1, 2, 4, 4], two residual blocks per level, no attention scales and temporal downsampling
    [False, True, True] (diffusers' defaults, which its converter's block indices assume). Width and z_dim (96 and 16
    in the release) are read from the shapes so that narrower test models load too."""
    try:
        base_dim = shapes["encoder.conv1.weight"][0]
        z_dim = shapes["decoder.conv1.weight"][1]
    except (KeyError, IndexError) as e:
        raise InputError(f"{source}: not Wan's VAE checkpoint (missing or odd tensor {e})") from None
    return {"base_dim": int(base_dim), "z_dim": int(z_dim), **VAE_STRUCTURE}


def _check_unknown(expected: set[str], mapped: Mapping[str, str], source: Path) -> None:
    """InputError naming ``source`` and the original names of tensors the model has no place for."""
    unknown = sorted(original for name, original in mapped.items() if name not in expected)
    if unknown:
        raise InputError(f"{source}: unknown tensor(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")


def _check_names(expected: set[str], mapped: Mapping[str, str], source: Path) -> None:
    _check_unknown(expected, mapped, source)
    missing = sorted(expected - set(mapped))
    if missing:
        raise InputError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_official_components(model_dir: str | Path, *, dtype: Any = "auto", device: Any = "cpu") -> dict[str, Any]:
    """Transformer(s), VAE, UMT5 encoder, tokenizer and scheduler from the official layout.

    Returns the keys of ``batchgen.models.wan.loading.WanComponents``: transformer (Wan 2.2's high-noise expert),
    transformer_2 (low-noise expert, None for Wan 2.1), vae (fp32, on ``device``), text_encoder (``dtype``, on CPU:
    it visits the accelerator once per shard), tokenizer, scheduler, boundary_ratio (None or 0.875) and
    layout="official". InputError names the missing, truncated or unexpected file.
    """
    import torch

    quiet_progress_bars()
    path = require_dir(model_dir)
    folders = expert_folders(path)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    for name, what in (
        (T5_CHECKPOINT, "Wan's UMT5 encoder"),
        (VAE_CHECKPOINT, "Wan's VAE"),
        (T5_TOKENIZER, "tokenizer"),
    ):
        require(path / name, f"{what}, part of the official Wan release layout")
    experts = [load_official_transformer(folder, dtype=dtype, device=device) for folder in folders]
    components = {
        "transformer": experts[0],
        "transformer_2": experts[1] if len(experts) > 1 else None,
        "vae": load_official_vae(path / VAE_CHECKPOINT, device=device),
        "text_encoder": load_official_text_encoder(path / T5_CHECKPOINT, dtype=dtype),
        "tokenizer": _load_tokenizer(path / T5_TOKENIZER),
        "scheduler": official_scheduler(len(experts)),
        "boundary_ratio": A14B_BOUNDARY_RATIO if len(experts) > 1 else None,
        "layout": "official",
    }
    log.info("loaded Wan (official layout, %d expert(s)) from %s in %s on %s", len(experts), path, dtype, device)
    return components


def load_official_transformer(folder: Path, *, dtype, device):
    """WanTransformer3DModel from one expert folder, streamed tensor by tensor into an empty model."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    config = _expert_config(folder)
    shards = weight_shards(folder)
    for shard in shards:
        check_safetensors_complete(shard)
    # Parameters on the meta device; RoPE's non-persistent buffers are computed for real.
    with init_empty_weights():
        transformer = WanTransformer3DModel(**config)
    expected = set(transformer.state_dict())
    # As from_pretrained(torch_dtype=...) does: these modules stay fp32 whatever the model's dtype.
    keep_fp32 = transformer._keep_in_fp32_modules or []
    state = {}
    for shard in shards:
        for name, tensor in _stream_shard(shard, expected):
            target = torch.float32 if any(m in name.split(".") for m in keep_fp32) else dtype
            state[name] = tensor.to(device=device, dtype=target)
    _check_names(expected, {name: name for name in state}, folder)
    transformer.load_state_dict(state, strict=True, assign=True)
    return transformer.to(device).eval().requires_grad_(False)


def _stream_shard(shard: Path, expected: set[str]) -> Iterator[tuple[str, Any]]:
    """(diffusers name, tensor as stored) for each tensor of one shard, read one at a time from the memory map."""
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt", device="cpu") as f:
        names = transformer_name_map(list(f.keys()))
        _check_unknown(expected, names, shard)
        for name, original in names.items():
            yield name, f.get_tensor(original)


def _torch_load(path: Path) -> dict[str, Any]:
    import torch

    try:
        # Memory-mapped: tensors are read as they are converted, not all at once.
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise InputError(f"{path}: cannot read the checkpoint (truncated or not a torch.save file): {e}") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_official_text_encoder(path: Path, *, dtype):
    """transformers' UMT5EncoderModel from Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (kept on CPU)."""
    from accelerate import init_empty_weights
    from transformers import UMT5Config, UMT5EncoderModel

    state = _torch_load(path)
    config = umt5_config({name: tuple(t.shape) for name, t in state.items()}, path)
    plan = umt5_key_plan(config["num_layers"])
    _check_names(set(plan.values()), {v: v for v in state}, path)
    with init_empty_weights():
        encoder = UMT5EncoderModel(UMT5Config(**config))
    converted = {name: state[original].to(dtype) for name, original in plan.items()}
    # The encoder's embedding is the shared one (tied); both names receive the same tensor.
    converted["encoder.embed_tokens.weight"] = converted["shared.weight"]
    encoder.load_state_dict(converted, strict=True, assign=True)
    encoder.tie_weights()
    return encoder.eval().requires_grad_(False)


def load_official_vae(path: Path, *, device):
    """AutoencoderKLWan from ``Wan2.1_VAE.pth``, in fp32 (as the official WanVAE and diffusers' Wan examples run it:
    0.5 GB, decoded once per video)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    state = _torch_load(path)
    with init_empty_weights():
        vae = AutoencoderKLWan(**vae_config({name: tuple(t.shape) for name, t in state.items()}, path))
    names = vae_name_map(list(state))
    _check_names(set(vae.state_dict()), names, path)
    converted = {name: state[original].to(device=device, dtype=torch.float32) for name, original in names.items()}
    vae.load_state_dict(converted, strict=True, assign=True)
    return vae.to(device).eval().requires_grad_(False)


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: cannot load the tokenizer: {e}") from None


def official_scheduler(experts: int):
    """UniPC on flow sigmas (Wan's FlowUniPCMultistepScheduler as diffusers ships it) with the official shift."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=FLOW_SHIFT[experts],
        solver_order=2,
    )


# ----------------------------------------------------------------------------------------------------------------
# Writing the official layout (the inverse conversion; tests and tiny models use it)

# diffusers -> Wan renames for the DiT, the reverse of convert_wan_transformer_to_diffusers' table; norm2 and norm3
# swap because Wan applies norm1, norm3 (cross-attention), norm2 (feed-forward) in that order.
_TRANSFORMER_RENAMES = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm_swap."),
    (".norm3.", ".norm2."),
    (".norm_swap.", ".norm3."),
    (".scale_shift_table", ".modulation"),
)
_TOP_LEVEL_TRANSFORMER = {
    "scale_shift_table": "head.modulation",
    "proj_out.weight": "head.head.weight",
    "proj_out.bias": "head.head.bias",
}
# Wan's ResidualBlock.residual Sequential: RMS_norm (0), SiLU, CausalConv3d (2), RMS_norm (3), SiLU, Dropout, conv (6).
_RESNET_PARTS = (
    ("norm1.", "residual.0."),
    ("conv1.", "residual.2."),
    ("norm2.", "residual.3."),
    ("conv2.", "residual.6."),
    ("conv_shortcut.", "shortcut."),
)
_DECODER_SLOTS_PER_LEVEL = 4
"""Wan's decoder.upsamples lists 3 residual blocks (num_res_blocks + 1) and 1 resample per level."""


def _official_transformer_name(name: str) -> str:
    if name in _TOP_LEVEL_TRANSFORMER:
        return _TOP_LEVEL_TRANSFORMER[name]
    for new, old in _TRANSFORMER_RENAMES:
        name = name.replace(new, old)
    return name


def _resnet_part(rest: str) -> str:
    for new, old in _RESNET_PARTS:
        if rest.startswith(new):
            return old + rest[len(new) :]
    return rest


def _official_vae_name(name: str) -> str:
    patterns = (
        (
            r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
            lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_resnet_part(m[3])}",
        ),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.(.+)", lambda m: f"encoder.downsamples.{m[1]}.{_resnet_part(m[2])}"),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"decoder.upsamples.{_DECODER_SLOTS_PER_LEVEL * int(m[1]) + int(m[2])}.{_resnet_part(m[3])}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)",
            lambda m: f"decoder.upsamples.{_DECODER_SLOTS_PER_LEVEL * int(m[1]) + 3}.{m[2]}",
        ),
        (r"(encoder|decoder)\.conv_in\.(.+)", lambda m: f"{m[1]}.conv1.{m[2]}"),
        (r"(encoder|decoder)\.norm_out\.(.+)", lambda m: f"{m[1]}.head.0.{m[2]}"),
        (r"(encoder|decoder)\.conv_out\.(.+)", lambda m: f"{m[1]}.head.2.{m[2]}"),
        (r"quant_conv\.(.+)", lambda m: f"conv1.{m[1]}"),
        (r"post_quant_conv\.(.+)", lambda m: f"conv2.{m[1]}"),
    )
    for pattern, rename in patterns:
        if m := re.fullmatch(pattern, name):
            return rename(m)
    return name


def _inverse(state_dict: Mapping[str, Any], rename, name_map) -> dict[str, Any]:
    """``state_dict`` under ``rename``'s names, checked against the forward ``name_map`` (diffusers -> original):
    a rename the loader would not undo exactly is a bug here, not a file to write."""
    original = {rename(name): tensor.detach().clone().contiguous() for name, tensor in state_dict.items()}
    back = name_map(list(original))
    if {name: rename(name) for name in state_dict} != back:
        wrong = sorted(set(back.items()) ^ {(n, rename(n)) for n in state_dict})[:5]
        raise ValueError(f"the inverse conversion does not round-trip: {wrong}")
    return original


def official_transformer_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A WanTransformer3DModel state dict under Wan's own names (WanModel in wan/modules/model.py)."""
    return _inverse(state_dict, _official_transformer_name, transformer_name_map)


def official_vae_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """An AutoencoderKLWan state dict under Wan's own names (WanVAE_ in wan/modules/vae.py)."""
    return _inverse(state_dict, _official_vae_name, vae_name_map)


def official_t5_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A UMT5EncoderModel state dict under Wan's T5Encoder names (wan/modules/t5.py)."""
    layers = {int(m.group(1)) for name in state_dict if (m := re.match(r"encoder\.block\.(\d+)\.", name))}
    plan = umt5_key_plan(len(layers))
    return {wan: state_dict[hf].detach().clone().contiguous() for hf, wan in plan.items()}


def write_official_layout(
    directory: str | Path, components: Mapping[str, Any], *, max_shard_size: int | str = "5GB"
) -> Path:
    """Write in-memory diffusers Wan components (keys as ``load_official_components`` returns them) in the official
    release layout; ``directory`` must be empty or absent. Tensors keep their dtype (the real T5 file is bf16)."""
    import torch

    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root}: directory is not empty; the official layout needs a fresh directory")
    vae = components["vae"]
    structure = json.loads(json.dumps({key: vae.config[key] for key in VAE_STRUCTURE}))  # tuples as lists
    if structure != VAE_STRUCTURE:
        raise ValueError(
            f"{VAE_CHECKPOINT} holds the release's VAE structure {VAE_STRUCTURE}; this VAE has {structure}"
        )
    root.mkdir(parents=True, exist_ok=True)
    experts = [m for m in (components["transformer"], components.get("transformer_2")) if m is not None]
    folders = [root] if len(experts) == 1 else [root / folder for folder in EXPERT_FOLDERS]
    for transformer, folder in zip(experts, folders, strict=True):
        write_official_transformer(transformer, folder, max_shard_size=max_shard_size)
    torch.save(official_t5_state_dict(components["text_encoder"].state_dict()), root / T5_CHECKPOINT)
    torch.save(official_vae_state_dict(vae.state_dict()), root / VAE_CHECKPOINT)
    components["tokenizer"].save_pretrained(str(root / T5_TOKENIZER))
    return root


def official_config(transformer_config: Mapping[str, Any]) -> dict[str, Any]:
    """WanModel's config.json for a WanTransformer3DModel config (the keys WanModel registers; patch size, text
    width, norms and window are left out as WanModel's ignore_for_config does)."""
    import diffusers

    return {
        "_class_name": "WanModel",
        "_diffusers_version": diffusers.__version__,
        "model_type": "t2v",
        "text_len": 512,
        "in_dim": transformer_config["in_channels"],
        "dim": transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"],
        "ffn_dim": transformer_config["ffn_dim"],
        "freq_dim": transformer_config["freq_dim"],
        "out_dim": transformer_config["out_channels"],
        "num_heads": transformer_config["num_attention_heads"],
        "num_layers": transformer_config["num_layers"],
        "eps": transformer_config["eps"],
    }


def write_official_transformer(transformer, folder: Path, *, max_shard_size: int | str = "5GB") -> None:
    """One expert's config.json and safetensors shards (with an index when sharded) in Wan's names."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(official_config(transformer.config), indent=2) + "\n")
    state = official_transformer_state_dict(transformer.state_dict())
    split = split_torch_state_dict_into_shards(
        state, filename_pattern=WEIGHTS_NAME + "{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
