"""The tiny model: exactly the diffusers layout of genmo/mochi-1-preview, deterministic, loadable by diffusers."""

from __future__ import annotations

import json

import pytest

from batchgen.cli import main
from batchgen.core.config import load_config
from batchgen.core.errors import EXIT_BAD_INPUT
from batchgen.models import MOCHI
from batchgen.models.common.tiny import TINY_TOML_NAME
from batchgen.models.common.weights import fingerprint_model_dir, read_safetensors_header
from batchgen.models.mochi.loading import infer_original_transformer_config, read_transformer_config
from batchgen.models.mochi.tiny import TRANSFORMER_CONFIG, write_tiny_model


def test_layout_matches_mochi_1_preview(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "MochiPipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)} == {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "MochiTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLMochi"],
    }
    for path in (
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert (tiny_model_dir / path).is_file(), path


def test_configs_are_consistent_with_the_real_architecture(tiny_model_dir):
    transformer = read_transformer_config(tiny_model_dir)
    vae = json.loads((tiny_model_dir / "vae/config.json").read_text())
    t5 = json.loads((tiny_model_dir / "text_encoder/config.json").read_text())
    scheduler = json.loads((tiny_model_dir / "scheduler/scheduler_config.json").read_text())
    assert (transformer["num_layers"], transformer["num_attention_heads"], transformer["attention_head_dim"]) == (
        2,
        4,
        16,
    )
    assert transformer["text_embed_dim"] == t5["d_model"]
    assert transformer["in_channels"] == vae["latent_channels"] == 12
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == 12
    # The real compression: 8x spatial, 6x temporal.
    assert vae["spatial_expansions"] == [2, 2, 2] and vae["temporal_expansions"] == [1, 2, 3]
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["invert_sigmas"] is True


def test_default_shape_allows_sequence_parallel_1_2_4(tiny_model_dir):
    generation = load_config(tiny_model_dir / TINY_TOML_NAME).generation
    assert (generation.num_frames, generation.height, generation.width) == (13, 64, 64)
    heads = read_transformer_config(tiny_model_dir)["num_attention_heads"]
    tokens = MOCHI.visual_tokens(generation.num_frames, generation.height, generation.width)
    assert tokens == 48
    for degree in (1, 2, 4):
        assert heads % degree == 0 and tokens % degree == 0


def test_tokenizer_is_t5_shaped(tiny_model_dir):
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(str(tiny_model_dir / "tokenizer"))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 256
    ids = tokenizer("a red cat walking").input_ids
    assert ids[-1] == 1 and len(ids) >= 5 and 2 not in ids
    assert 2 in tokenizer("a cat \u00e9\u00e9").input_ids  # characters outside the vocabulary -> <unk>
    padded = tokenizer(["a cat"], padding="max_length", max_length=256, return_tensors="pt")
    assert padded.input_ids.shape == (1, 256) and int(padded.attention_mask.sum()) == len(tokenizer("a cat").input_ids)


def test_stock_mochi_pipeline_loads_it(tiny_model_dir):
    import torch
    from diffusers import MochiPipeline

    pipe = MochiPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    assert pipe.transformer.config.num_attention_heads == 4
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.transformer.pos_frequencies.abs().min() > 0  # no zero-initialised RoPE


def test_deterministic_from_seed(tmp_path, tiny_model_dir):
    again = write_tiny_model(tmp_path / "again", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)
    assert fingerprint_model_dir(again) == fingerprint_model_dir(tiny_model_dir)
    assert fingerprint_model_dir(other) != fingerprint_model_dir(tiny_model_dir)


def test_original_layout_header_gives_the_same_config(tmp_path):
    root = write_tiny_model(tmp_path / "orig", seed=0, layout="original")
    assert not (root / "transformer").exists() and (root / "dit.safetensors").is_file()
    inferred = infer_original_transformer_config(read_safetensors_header(root / "dit.safetensors"))
    assert inferred == TRANSFORMER_CONFIG | {"out_channels": 12}
    assert read_transformer_config(root) == inferred


def test_cli_writes_model_and_refuses_non_empty_dir(tmp_path, capsys):
    target = tmp_path / "cli-model"
    assert main(["tiny-model", str(target), "--seed", "3"]) == 0
    assert str(target) in capsys.readouterr().out
    assert (target / TINY_TOML_NAME).is_file() and (target / "model_index.json").is_file()
    assert main(["tiny-model", str(target)]) == EXIT_BAD_INPUT


def test_write_rejects_unknown_layout(tmp_path):
    from batchgen.core.errors import InputError

    with pytest.raises(InputError, match="layout"):
        write_tiny_model(tmp_path / "x", layout="gguf")
