"""MochiGenerator against diffusers' own MochiPipeline on the tiny model (fp32, CPU), loading in both layouts,
and the `batchgen generate` command."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from batchgen.cli import main
from batchgen.core.config import ParallelConfig
from batchgen.core.errors import EXIT_BAD_INPUT, InputError
from batchgen.core.item import Item
from batchgen.core.video import probe_mp4
from batchgen.models.common.weights import fingerprint_model_dir
from batchgen.models.mochi.generator import MochiGenerator, linear_quadratic_sigmas
from batchgen.models.mochi.loading import (
    convert_original_state_dict,
    diffusers_to_original_state_dict,
    load_components,
    read_transformer_config,
)
from batchgen.models.mochi.tiny import write_tiny_model
from batchgen.worker.context import SingleProcess
from tests._stock import stock_output, stock_pipeline

TOLERANCE = 1e-4


def make_item(tiny_config, **overrides) -> Item:
    g = tiny_config.generation
    values = dict(
        id="item-0",
        prompt="a red cat walking in the snow",
        negative_prompt="",
        seed=1234,
        num_frames=g.num_frames,
        height=g.height,
        width=g.width,
        num_inference_steps=g.num_inference_steps,
        guidance_scale=g.guidance_scale,
        row=0,
    )
    values.update(overrides)
    return Item(**values)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    gen = MochiGenerator(tiny_model_dir, device="cpu")
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def reference_pipeline(tiny_model_dir):
    from diffusers import MochiPipeline

    return stock_pipeline(MochiPipeline, tiny_model_dir)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # CFG with an empty negative prompt (zeros, as force_zeros_for_empty_prompt)
        {"negative_prompt": "blurry dark water", "guidance_scale": 6.0, "seed": 7},
        {"guidance_scale": 1.0, "seed": 99},  # no CFG: a batch of one
        {"num_inference_steps": 3, "num_frames": 19, "seed": -3},
        {"height": 48, "width": 80, "prompt": "fish"},
    ],
    ids=["cfg-empty-negative", "cfg-negative", "no-cfg", "3-steps-19-frames", "48x80"],
)
def test_latents_match_diffusers_mochi_pipeline(generator, reference_pipeline, tiny_config, overrides):
    item = make_item(tiny_config, **overrides)
    latents = generator.denoise(item, generator.encode_prompts([item])[item.id])
    expected = stock_output(reference_pipeline, item, "latent")
    assert latents.dtype == torch.float32 and latents.shape == expected.shape
    assert (latents - expected).abs().max().item() <= TOLERANCE
    assert latents.std().item() > 0.1  # a real result, not a degenerate one


def test_decoded_video_matches_diffusers_and_has_6t_minus_5_frames(generator, reference_pipeline, tiny_config):
    item = make_item(tiny_config, seed=5)
    generator.prepare([item])
    video = generator.generate(item)
    assert video.frames.dtype == np.uint8 and video.frames.shape == (13, 64, 64, 3)
    # diffusers decodes in one shot and returns floats in [0, 1]; ours is framewise (carried causal context),
    # so the two agree to rounding.
    expected = reference_pipeline(
        prompt=item.prompt,
        num_frames=13,
        height=64,
        width=64,
        num_inference_steps=item.num_inference_steps,
        guidance_scale=item.guidance_scale,
        generator=torch.Generator().manual_seed(item.seed),
        output_type="np",
    ).frames[0]
    assert np.abs(video.frames.astype(np.float64) - expected * 255).max() <= 1.0
    assert set(video.timings) == {"text_encode", "denoise", "denoise_loop", "decode"} and all(
        v >= 0 for v in video.timings.values()
    )


@pytest.mark.parametrize("num_frames", [7, 19])
def test_frame_count_is_6t_minus_5(generator, tiny_config, num_frames):
    item = make_item(tiny_config, num_frames=num_frames, num_inference_steps=1)
    latents = generator.denoise(item)
    assert latents.shape[2] == (num_frames - 1) // 6 + 1
    frames = generator.decode(latents)
    assert frames.shape == (num_frames, 64, 64, 3)


def test_tiled_decode_keeps_every_frame(tiny_model_dir, tiny_config):
    # 32 px tiles every 24 px: a 64 px frame is decoded as 3x3 blended tiles.
    tiled = MochiGenerator(tiny_model_dir, device="cpu", vae_tile=(32, 24))
    item = make_item(tiny_config, num_frames=19, num_inference_steps=1)
    frames = tiled.decode(tiled.denoise(item))
    assert frames.shape == (19, 64, 64, 3) and frames.std() > 1


def test_prompts_are_encoded_once_per_distinct_text(generator, tiny_config):
    rows = []
    hook = generator.text_encoder.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    try:
        items = [
            make_item(tiny_config, id="a", prompt="cat"),
            make_item(tiny_config, id="b", prompt="cat", negative_prompt="dog"),
            make_item(tiny_config, id="c", prompt="dog", guidance_scale=1.0, negative_prompt="never used"),
        ]
        encoded = generator.encode_prompts(items)
    finally:
        hook.remove()
    assert sum(rows) == 2  # "cat" and "dog"; the empty negative prompt is zeros without T5
    assert encoded["c"].uncond is None
    assert not encoded["a"].uncond.mask.any() and not encoded["a"].uncond.embeds.any()
    assert torch.equal(encoded["a"].cond.embeds, encoded["b"].cond.embeds)
    assert torch.equal(encoded["b"].uncond.embeds, encoded["c"].cond.embeds)


def test_offload_model_gives_the_same_latents(tiny_model_dir, generator, tiny_config):
    item = make_item(tiny_config, negative_prompt="rain", seed=11)
    offloaded = MochiGenerator(tiny_model_dir, device="cpu", parallel=ParallelConfig(offload="model"))
    assert torch.equal(offloaded.denoise(item), generator.denoise(item))
    assert next(offloaded.components.transformer.parameters()).device.type == "cpu"


def test_non_writer_rank_does_not_decode(tiny_model_dir, tiny_config):
    class Follower(SingleProcess):
        is_writer = False

    follower = MochiGenerator(tiny_model_dir, device="cpu", context=Follower())
    decoded = []
    follower.vae.register_forward_pre_hook(lambda *a: decoded.append(1))
    hook = follower.vae.decoder.register_forward_pre_hook(lambda *a: decoded.append(1))
    item = make_item(tiny_config, num_inference_steps=1)
    assert follower.generate(item) is None
    assert decoded == []
    hook.remove()


def test_sigma_schedule_is_linear_quadratic():
    sigmas = linear_quadratic_sigmas(64)
    assert len(sigmas) == 64 and sigmas[0] == 1.0
    assert sigmas[32] == pytest.approx(1 - 0.025, abs=1e-12)  # the linear half ends at threshold_noise
    assert all(a > b for a, b in zip(sigmas[:-1], sigmas[1:], strict=True))
    assert len(set(np.float32(sigmas[:32]))) == 32  # distinct in fp32 (bf16 would collapse them)


# --- loading ------------------------------------------------------------------------------------------------------


def test_original_layout_loads_the_same_transformer(tmp_path, tiny_model_dir, generator, tiny_config):
    original = write_tiny_model(tmp_path / "original", seed=0, layout="original")
    components = load_components(original, dtype="fp32", device="cpu")
    assert components.layout == "original"
    expected = generator.components.transformer.state_dict()
    loaded = components.transformer.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    item = make_item(tiny_config, seed=3)
    from_original = MochiGenerator.from_components(components, device="cpu")
    assert (from_original.denoise(item) - generator.denoise(item)).abs().max().item() <= TOLERANCE


def test_original_layout_in_bf16_keeps_rope_frequencies_fp32(tmp_path):
    original = write_tiny_model(tmp_path / "original-bf16", seed=0, layout="original")
    transformer = load_components(original, dtype="bf16", device="cpu").transformer
    assert transformer.pos_frequencies.dtype == torch.float32
    assert transformer.transformer_blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_key_conversion_equals_diffusers_converter_at_48_blocks():
    from diffusers import MochiTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_mochi_transformer_checkpoint_to_diffusers

    # diffusers' converter hard-codes the real model's 48 blocks; a narrow 48-block model checks ours against it.
    model = MochiTransformer3DModel(
        num_layers=48,
        num_attention_heads=2,
        attention_head_dim=4,
        pooled_projection_dim=8,
        text_embed_dim=8,
        time_embed_dim=8,
    )
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}
    original = diffusers_to_original_state_dict(state)
    assert "blocks.47.attn.qkv_x.weight" in original and "blocks.47.attn.proj_y.weight" not in original
    theirs = convert_mochi_transformer_checkpoint_to_diffusers(dict(original))
    ours = convert_original_state_dict(original)
    assert ours.keys() == theirs.keys() == state.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], state[k]) for k in state)


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: [shutil.rmtree(d), d.mkdir()], "not a Mochi model directory"),
        (lambda d: shutil.rmtree(d / "text_encoder"), "text_encoder"),
        (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").unlink(), "vae"),
        (lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors").unlink(), "transformer"),
        (
            lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage"),
            "not a safetensors file",
        ),
    ],
    ids=["missing-dir", "empty-dir", "no-text-encoder", "no-vae-weights", "no-transformer-weights", "corrupt-weights"],
)
def test_bad_model_dir_is_input_error_naming_the_file(tmp_path, tiny_model_dir, damage, message):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    damage(model)
    with pytest.raises(InputError, match=message):
        load_components(model, dtype="fp32", device="cpu")


def test_corrupt_original_checkpoint_is_input_error(tmp_path):
    model = write_tiny_model(tmp_path / "orig", layout="original")
    (model / "dit.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00notjson!")
    with pytest.raises(InputError, match="dit.safetensors"):
        read_transformer_config(model)


def test_fingerprint_is_cheap_but_sees_weight_changes(tmp_path, tiny_model_dir):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    before = fingerprint_model_dir(model)
    assert before == fingerprint_model_dir(tiny_model_dir)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # flip one byte in the last tensor
    weights.write_bytes(bytes(data))
    assert fingerprint_model_dir(model) != before


# --- the command --------------------------------------------------------------------------------------------------


def test_generate_command_writes_mp4_and_latents(tmp_path, tiny_model_dir, generator, tiny_config, capsys):
    out, latents_file = tmp_path / "video.mp4", tmp_path / "latents.safetensors"
    code = main(
        [
            "generate",
            "--model-dir",
            str(tiny_model_dir),
            "--prompt",
            "a dog running",
            "--out",
            str(out),
            "--seed",
            "42",
            "--steps",
            "2",
            "--num-frames",
            "19",
            "--save-latents",
            str(latents_file),
        ]
    )
    assert code == 0
    info = probe_mp4(out.read_bytes())
    assert (info.frames, info.width, info.height, info.fps) == (19, 64, 64, 30)
    assert "19 frames" in capsys.readouterr().out

    from safetensors import safe_open

    with safe_open(str(latents_file), framework="pt") as f:
        saved = f.get_tensor("latents")
        recorded = json.loads(f.metadata()["item"])
    item = make_item(tiny_config, prompt="a dog running", seed=42, num_frames=19, num_inference_steps=2)
    assert recorded == dataclasses.replace(item, id="generate").to_dict()
    assert (saved - generator.denoise(item)).abs().max().item() <= TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.safetensors", "video.mp4"]  # no leftovers


@pytest.mark.parametrize(
    "argv",
    [
        ["--model-dir", "{missing}", "--prompt", "x", "--out", "{tmp}/a.mp4"],
        ["--model-dir", "{model}", "--prompt", "x", "--out", "{tmp}/no/such/dir/a.mp4"],
        ["--model-dir", "{model}", "--prompt", "  ", "--out", "{tmp}/a.mp4"],
        ["--model-dir", "{model}", "--prompt", "x", "--out", "{tmp}/a.mp4", "--num-frames", "12"],
        ["--model-dir", "{model}", "--prompt", "x", "--out", "{tmp}/a.mp4", "--height", "100"],
    ],
    ids=["missing-model", "missing-out-dir", "empty-prompt", "bad-frames", "bad-height"],
)
def test_generate_command_bad_input_exits_2(tmp_path, tiny_model_dir, argv):
    values = {"missing": str(tmp_path / "nope"), "model": str(tiny_model_dir), "tmp": str(tmp_path)}
    assert main(["generate", *[a.format(**values) for a in argv]]) == EXIT_BAD_INPUT
    assert not list(tmp_path.glob("*.mp4"))


def test_bf16_components_generate_with_fp32_kept_tensors():
    """The GPU path in miniature: bf16 weights with pos_frequencies kept fp32 (as loading does) must not leak an
    fp32 compute dtype into the DiT's inputs (caught on an H200 as 'mat1 and mat2 must have the same dtype')."""
    import torch

    from batchgen.core.config import ParallelConfig
    from batchgen.core.item import Item
    from batchgen.models.mochi.generator import MochiGenerator
    from batchgen.models.mochi.tiny import build_random_components

    components = build_random_components(full_size=False, dtype=torch.bfloat16, device="cpu")
    assert components.transformer.pos_frequencies.dtype == torch.float32
    generator = MochiGenerator.from_components(components, parallel=ParallelConfig(offload="model"), device="cpu")
    item = Item(
        id="bf16",
        prompt="a fox",
        negative_prompt="",
        seed=0,
        num_frames=13,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=4.5,
        row=0,
    )
    generator.prepare([item])
    video = generator.generate(item)
    assert video.frames.shape == (13, 64, 64, 3)
    assert video.extra["dtype"] == "bfloat16"
