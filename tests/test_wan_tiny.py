"""The tiny Wan: exactly the diffusers layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan2.2-T2V-A14B-Diffusers,
deterministic, loadable by batchgen's loader and by diffusers' WanPipeline."""

from __future__ import annotations

import json

import pytest
import tomllib
import torch

from batchgen.core.errors import InputError
from batchgen.models import WAN, detect_family
from batchgen.models.common.tiny import TINY_TOML_NAME
from batchgen.models.common.weights import fingerprint_model_dir
from batchgen.models.wan.loading import load_wan_components, read_boundary_ratio, read_transformer_config
from batchgen.models.wan.tiny import write_tiny_wan

FILES = (
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
COMPONENTS = {
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def _index(model_dir) -> dict:
    return json.loads((model_dir / "model_index.json").read_text())


def test_one_expert_layout_matches_wan_2_1(tiny_wan_dir):
    index = _index(tiny_wan_dir)
    assert index["_class_name"] == "WanPipeline" and "boundary_ratio" not in index
    assert {k: v for k, v in index.items() if not k.startswith("_")} == COMPONENTS
    for path in FILES:
        assert (tiny_wan_dir / path).is_file(), path
    assert not (tiny_wan_dir / "transformer_2").exists()
    assert detect_family(tiny_wan_dir) == "wan"


def test_two_expert_layout_matches_wan_2_2_a14b(tiny_wan2_dir):
    index = _index(tiny_wan2_dir)
    assert index["boundary_ratio"] == 0.875 and read_boundary_ratio(tiny_wan2_dir) == 0.875
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    for path in (*FILES, "transformer_2/config.json", "transformer_2/diffusion_pytorch_model.safetensors"):
        assert (tiny_wan2_dir / path).is_file(), path
    first, second = (
        tiny_wan2_dir / f"{t}/diffusion_pytorch_model.safetensors" for t in ("transformer", "transformer_2")
    )
    assert first.read_bytes() != second.read_bytes()  # two experts with their own weights
    scheduler = json.loads((tiny_wan2_dir / "scheduler/scheduler_config.json").read_text())
    assert scheduler["flow_shift"] == 12.0  # the A14B release's sample shift


def test_configs_are_consistent_with_the_real_architecture(tiny_wan_dir):
    transformer = read_transformer_config(tiny_wan_dir)
    vae = json.loads((tiny_wan_dir / "vae/config.json").read_text())
    umt5 = json.loads((tiny_wan_dir / "text_encoder/config.json").read_text())
    scheduler = json.loads((tiny_wan_dir / "scheduler/scheduler_config.json").read_text())
    assert transformer["_class_name"] == "WanTransformer3DModel" and vae["_class_name"] == "AutoencoderKLWan"
    assert umt5["architectures"] == ["UMT5EncoderModel"] and umt5["model_type"] == "umt5"
    assert transformer["text_dim"] == umt5["d_model"]
    assert transformer["in_channels"] == transformer["out_channels"] == vae["z_dim"] == 16
    assert tuple(transformer["patch_size"]) == WAN.patch
    # 4x temporal (two temporal downsamplings), 8x spatial (three levels below full resolution).
    assert vae["temperal_downsample"] == [False, True, True] and len(vae["dim_mult"]) == 4
    assert scheduler["use_flow_sigmas"] and scheduler["prediction_type"] == "flow_prediction"
    assert scheduler["flow_shift"] == 3.0


def test_tiny_toml_names_the_family_and_a_shape_every_degree_divides(tiny_wan_dir):
    settings = tomllib.loads((tiny_wan_dir / TINY_TOML_NAME).read_text())
    assert settings["model"] == {"family": "wan"}
    g = settings["generation"]
    assert WAN.check_frames(g["num_frames"]) is None
    assert WAN.check_side(g["height"]) is None and WAN.check_side(g["width"]) is None
    tokens = WAN.visual_tokens(g["num_frames"], g["height"], g["width"])
    assert tokens == 48 and all(tokens % n == 0 for n in (1, 2, 4, 8))
    heads = read_transformer_config(tiny_wan_dir)["num_attention_heads"]
    assert heads % 2 == 0 and heads % 4 == 0


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_wan_dir):
    again = write_tiny_wan(tmp_path / "again", seed=0)
    other = write_tiny_wan(tmp_path / "other", seed=1)
    assert fingerprint_model_dir(again) == fingerprint_model_dir(tiny_wan_dir)
    assert fingerprint_model_dir(other) != fingerprint_model_dir(tiny_wan_dir)


def test_loads_through_batchgen_and_diffusers(tiny_wan2_dir):
    from diffusers import WanPipeline

    ours = load_wan_components(tiny_wan2_dir, dtype="fp32", device="cpu")
    pipe = WanPipeline.from_pretrained(str(tiny_wan2_dir), dtype=torch.float32)
    assert pipe.config.boundary_ratio == ours.boundary_ratio == 0.875
    assert type(pipe.scheduler) is type(ours.scheduler) and pipe.scheduler.config == ours.scheduler.config
    assert type(pipe.tokenizer) is type(ours.tokenizer)
    for name in ("transformer", "transformer_2", "vae", "text_encoder"):
        theirs, mine = getattr(pipe, name).state_dict(), getattr(ours, name).state_dict()
        assert theirs.keys() == mine.keys(), name
        assert all(torch.equal(theirs[k], mine[k]) for k in theirs), name
    # The tiny tokenizer splits ordinary prompts into several ids and ends them with </s>, like UMT5's.
    ids = ours.tokenizer("a red cat walking in the snow").input_ids
    assert len(ids) > 5 and ids[-1] == ours.tokenizer.eos_token_id == 1


def test_random_weights_give_sane_activations(tiny_wan_dir):
    """The seeded fill (tiny.randomize_parameters) keeps Wan's activations O(1): finite text embeddings of unit
    scale, a noise prediction of the noise's scale, and a decoded video that is mostly not clipped."""
    components = load_wan_components(tiny_wan_dir, dtype="fp32", device="cpu")
    generator = torch.Generator().manual_seed(0)
    tokens = components.tokenizer(["a cat in the snow"], return_tensors="pt")
    text = components.text_encoder(**tokens).last_hidden_state
    assert 0.1 < text.std().item() < 10
    latents = torch.randn(1, 16, 3, 8, 8, generator=generator)
    prediction = components.transformer(
        hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False
    )[0]
    assert prediction.shape == latents.shape and 0.1 < prediction.std().item() < 10
    video = components.vae.decode(latents, return_dict=False)[0]
    assert video.shape == (1, 3, 9, 64, 64)
    clipped = (video.abs() >= 1).float().mean().item()
    assert clipped < 0.3 and video.std().item() > 0.05


def test_refuses_a_non_empty_directory_and_odd_expert_counts(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        write_tiny_wan(tmp_path / "full")
    with pytest.raises(InputError, match="experts must be 1"):
        write_tiny_wan(tmp_path / "three", experts=3)


def test_the_wan_spec_points_at_this_code(tmp_path, tiny_wan2_dir):
    from batchgen.models.wan.generator import WanGenerator

    assert WAN.generator_class() is WanGenerator
    assert WAN.num_heads(tiny_wan2_dir) == 4
    written = WAN.write_tiny_model(tmp_path / "via-spec", seed=0, experts=2)
    assert fingerprint_model_dir(written) == fingerprint_model_dir(tiny_wan2_dir)
