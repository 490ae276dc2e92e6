"""Wan's official release layout (batchgen.models.wan.original): tiny diffusers modules written in the official
layout, loaded back and compared tensor by tensor and output by output; the UMT5 mapping against Wan's own T5
arithmetic; unhappy paths name the file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: E402
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel  # noqa: E402

from batchgen.core.errors import InputError  # noqa: E402
from batchgen.models import detect_family  # noqa: E402
from batchgen.models.common.tiny import randomize_parameters, write_tokenizer  # noqa: E402
from batchgen.models.wan import original as wan_original  # noqa: E402

TEXT_WIDTH = 16
TRANSFORMER = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": TEXT_WIDTH,
    "freq_dim": 16,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
}
# The official VAE's structure (dim_mult [1, 2, 4, 4], 2 residual blocks per level, z_dim 16) at width 8.
VAE = {"base_dim": 8, "z_dim": 16, "num_res_blocks": 2}
UMT5 = {
    "d_model": TEXT_WIDTH,
    "d_kv": 4,
    "d_ff": 32,
    "num_layers": 2,
    "num_heads": 4,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}


def _randomized(module, generator):
    randomize_parameters(module, generator)
    with torch.no_grad():
        # The VAE's RMS gains are named gamma; keep them near 1 so decoded values are not near zero.
        for name, param in module.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
    return module.eval()


def _tiny_components(tmp: Path, experts: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    vocab_size = write_tokenizer(tmp / "tokenizer")
    transformers = [_randomized(WanTransformer3DModel(**TRANSFORMER), generator) for _ in range(experts)]
    return {
        "transformer": transformers[0],
        "transformer_2": transformers[1] if experts == 2 else None,
        "vae": _randomized(AutoencoderKLWan(**VAE), generator),
        "text_encoder": _randomized(UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **UMT5)), generator),
        "tokenizer": T5TokenizerFast.from_pretrained(str(tmp / "tokenizer")),
    }


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    """One expert in one file (as Wan2.1-T2V-1.3B): (source components, model dir, loaded components)."""
    tmp = tmp_path_factory.mktemp("wan21")
    source = _tiny_components(tmp, experts=1, seed=0)
    root = wan_original.write_official_layout(tmp / "model", source)
    return source, root, wan_original.load_official_components(root, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    """Two experts, each sharded with an index (as Wan2.2-T2V-A14B)."""
    tmp = tmp_path_factory.mktemp("wan22")
    source = _tiny_components(tmp, experts=2, seed=1)
    root = wan_original.write_official_layout(tmp / "model", source, max_shard_size=40_000)
    return source, root, wan_original.load_official_components(root, dtype="fp32", device="cpu")


def _assert_same_tensors(loaded, source):
    got, want = loaded.state_dict(), source.state_dict()
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


# ----------------------------------------------------------------------------------------------------------------
# Layout and names


def test_files_and_names_are_wans_own(wan21, wan22):
    _, root, _ = wan21
    assert sorted(p.name for p in root.iterdir()) == [
        "Wan2.1_VAE.pth",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "google",
        "models_t5_umt5-xxl-enc-bf16.pth",
    ]
    assert (root / "google/umt5-xxl/tokenizer.json").is_file()
    config = json.loads((root / "config.json").read_text())
    # The keys WanModel registers (ignore_for_config drops patch_size, text_dim, norms, window_size).
    assert sorted(config) == sorted(
        ["_class_name", "_diffusers_version", "model_type", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim"]
        + ["out_dim", "num_heads", "num_layers", "eps"]
    )
    assert (config["_class_name"], config["model_type"]) == ("WanModel", "t2v")
    assert (config["dim"], config["num_heads"], config["text_len"]) == (24, 2, 512)
    dit = set(wan_original._header(root / "diffusion_pytorch_model.safetensors"))
    # Names from WanModel (wan/modules/model.py): Wan's norm3 is the affine cross-attention norm.
    for name in ("blocks.1.self_attn.q.weight", "blocks.0.cross_attn.o.bias", "blocks.0.norm3.weight"):
        assert name in dit, name
    assert {"head.modulation", "head.head.weight", "blocks.0.modulation", "time_projection.1.weight"} <= dit
    assert "blocks.0.ffn.0.weight" in dit and "blocks.0.norm2.weight" not in dit
    vae = torch.load(root / "Wan2.1_VAE.pth", weights_only=True)
    # Names from WanVAE_ (wan/modules/vae.py): flat decoder.upsamples with the level-1 shortcut at slot 4.
    for name in ("conv2.weight", "decoder.middle.1.to_qkv.weight", "decoder.upsamples.4.shortcut.weight"):
        assert name in vae, name
    assert "decoder.upsamples.11.resample.1.weight" in vae and "encoder.downsamples.5.time_conv.weight" in vae
    t5 = torch.load(root / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    assert sorted(t5) == sorted(_wan_t5_names(num_layers=2))

    _, root22, _ = wan22
    for expert in ("high_noise_model", "low_noise_model"):
        index = json.loads((root22 / expert / "diffusion_pytorch_model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert not (root22 / "config.json").exists() and (root22 / "Wan2.1_VAE.pth").is_file()


def _wan_t5_names(num_layers):
    """The state dict names of Wan's T5Encoder with shared_pos=False (wan/modules/t5.py umt5_xxl)."""
    names = ["token_embedding.weight", "norm.weight"]
    for i in range(num_layers):
        names += [f"blocks.{i}.attn.{p}.weight" for p in "qkvo"]
        names += [f"blocks.{i}.{n}.weight" for n in ("norm1", "norm2", "ffn.gate.0", "ffn.fc1", "ffn.fc2")]
        names.append(f"blocks.{i}.pos_embedding.embedding.weight")
    return names


def test_config_and_detection_without_torch(wan21, wan22):
    _, root, _ = wan21
    _, root22, _ = wan22
    script = (
        "import json, sys\n"
        "from batchgen.models.wan.original import is_official_layout, read_official_transformer_config\n"
        f"print(json.dumps([is_official_layout({str(root)!r}), is_official_layout({str(root22)!r}),\n"
        f"    read_official_transformer_config({str(root)!r}), read_official_transformer_config({str(root22)!r}),\n"
        "    'torch' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    one, two, config, config22, imported_torch = json.loads(done.stdout)
    assert (one, two, imported_torch) == (True, True, False)
    for read in (config, config22):
        assert {k: read[k] for k in TRANSFORMER} == TRANSFORMER
        assert read["eps"] == 1e-6 and read["rope_max_seq_len"] == 1024 and read["image_dim"] is None
    assert not wan_original.is_official_layout(root / "google")
    assert detect_family(root) == detect_family(root22) == "wan"


# ----------------------------------------------------------------------------------------------------------------
# Values and outputs


def test_every_tensor_round_trips(wan21):
    source, _, loaded = wan21
    for name in ("transformer", "vae", "text_encoder"):
        _assert_same_tensors(loaded[name], source[name])
    assert loaded["transformer_2"] is None and loaded["boundary_ratio"] is None and loaded["layout"] == "official"
    assert loaded["tokenizer"]("a red fox").input_ids == source["tokenizer"]("a red fox").input_ids


def test_transformer_forward_equals_diffusers(wan21):
    source, _, loaded = wan21
    generator = torch.Generator().manual_seed(5)
    inputs = {
        "hidden_states": torch.randn(1, 16, 3, 8, 8, generator=generator),
        "timestep": torch.tensor([700]),
        "encoder_hidden_states": torch.randn(1, 7, TEXT_WIDTH, generator=generator),
        "return_dict": False,
    }
    with torch.no_grad():
        want = source["transformer"](**inputs)[0]
        got = loaded["transformer"](**inputs)[0]
    assert want.abs().mean() > 0.05
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_vae_decodes_the_same(wan21):
    source, _, loaded = wan21
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = source["vae"].decode(latents).sample
        got = loaded["vae"].decode(latents).sample
    assert want.shape == (1, 3, 5, 32, 32) and want.abs().mean() > 0.01
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _wan_t5_encode(state, ids, mask, num_heads, num_buckets=32, max_dist=128):
    """Wan's T5Encoder forward (wan/modules/t5.py: T5SelfAttention with a per-block T5RelativeEmbedding, no
    attention scaling, tanh-GELU gate, RMS norms), written here from its state dict to check the UMT5 mapping."""

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6))

    def buckets(length):
        rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        half = num_buckets // 2
        out = (rel > 0).long() * half
        rel, exact = rel.abs(), half // 2
        large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_dist / exact) * (half - exact))
        return out + torch.where(rel < exact, rel, large.long().clamp(max=half - 1))

    x = state["token_embedding.weight"][ids]
    batch, length, _ = x.shape
    masked = torch.zeros(batch, 1, 1, length).masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(layers):
        p = f"blocks.{i}."
        bias = state[p + "pos_embedding.embedding.weight"][buckets(length)].permute(2, 0, 1)[None]
        h = rms(x, state[p + "norm1.weight"])
        q, k, v = (
            (h @ state[p + f"attn.{n}.weight"].T).view(batch, length, num_heads, -1).transpose(1, 2) for n in "qkv"
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) + bias + masked, dim=-1)
        x = x + (attn @ v).transpose(1, 2).reshape(batch, length, -1) @ state[p + "attn.o.weight"].T
        h = rms(x, state[p + "norm2.weight"])
        gate = torch.nn.functional.gelu(h @ state[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ state[p + "ffn.fc1.weight"].T) * gate) @ state[p + "ffn.fc2.weight"].T
    return rms(x, state["norm.weight"])


def test_umt5_mapping_gives_wans_encoder_output(wan21):
    _, root, loaded = wan21
    state = torch.load(root / wan_original.T5_CHECKPOINT, weights_only=True)
    tokens = loaded["tokenizer"](["a red fox jumps", "sky"], padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        got = loaded["text_encoder"](input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        want = _wan_t5_encode(state, tokens.input_ids, tokens.attention_mask, num_heads=UMT5["num_heads"])
    valid = tokens.attention_mask.bool()
    assert valid.sum() > 5 and want[valid].abs().mean() > 0.1
    torch.testing.assert_close(got.last_hidden_state[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_two_experts_load_both(wan22):
    source, _, loaded = wan22
    _assert_same_tensors(loaded["transformer"], source["transformer"])
    _assert_same_tensors(loaded["transformer_2"], source["transformer_2"])
    assert loaded["boundary_ratio"] == 0.875
    assert loaded["scheduler"].config.flow_shift == 12.0 and loaded["scheduler"].config.use_flow_sigmas


def test_wan_pipeline_runs_on_the_loaded_experts(wan22):
    """The returned keys are what diffusers' WanPipeline takes; three steps (timesteps 999, 960, 857 at shift 12:
    both experts run) give the same video as the source modules with the same scheduler."""
    from diffusers import WanPipeline

    source, _, loaded = wan22
    keys = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler", "boundary_ratio")
    videos = []
    for components in (dict(source, scheduler=loaded["scheduler"], boundary_ratio=0.875), loaded):
        pipe = WanPipeline(**{k: components[k] for k in keys})
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(3)
        kwargs = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 16}
        videos.append(pipe("a red fox", generator=generator, output_type="pt", **kwargs).frames)
    timesteps = loaded["scheduler"].timesteps
    assert timesteps.max() >= 875 > timesteps.min()
    assert videos[0].shape == (1, 5, 3, 32, 32) and videos[0].std() > 0.01
    torch.testing.assert_close(videos[1], videos[0], rtol=0, atol=0)


def test_bf16_keeps_diffusers_fp32_modules(wan21):
    _, root, _ = wan21
    folder_config = wan_original.read_official_transformer_config(root)
    transformer = wan_original.load_official_transformer(root, dtype=torch.bfloat16, device="cpu")
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    # WanTransformer3DModel._keep_in_fp32_modules, as from_pretrained(torch_dtype=bf16) keeps them.
    assert dtypes["scale_shift_table"] == dtypes["blocks.0.norm2.weight"] == torch.float32
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == dtypes["proj_out.weight"] == torch.bfloat16
    assert transformer.config.num_layers == folder_config["num_layers"]


# ----------------------------------------------------------------------------------------------------------------
# Unhappy paths


@pytest.fixture
def model_copy(wan21, tmp_path):
    import shutil

    _, root, _ = wan21
    return Path(shutil.copytree(root, tmp_path / "model"))


def _load(root):
    return wan_original.load_official_components(root, dtype="fp32", device="cpu")


def test_missing_t5_checkpoint_names_it(model_copy):
    (model_copy / wan_original.T5_CHECKPOINT).unlink()
    with pytest.raises(InputError, match=r"models_t5_umt5-xxl-enc-bf16\.pth: missing"):
        _load(model_copy)


def test_truncated_shard_names_it(model_copy):
    shard = model_copy / "diffusion_pytorch_model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"diffusion_pytorch_model\.safetensors: truncated safetensors file"):
        _load(model_copy)


def test_truncated_pth_names_it(model_copy):
    vae = model_copy / wan_original.VAE_CHECKPOINT
    vae.write_bytes(vae.read_bytes()[: vae.stat().st_size // 2])
    with pytest.raises(InputError, match=r"Wan2\.1_VAE\.pth: cannot read the checkpoint"):
        _load(model_copy)


def test_unknown_dit_tensor_names_the_shard(model_copy):
    from safetensors.torch import load_file, save_file

    shard = model_copy / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(shard))
    tensors["blocks.0.img_gate.weight"] = torch.zeros(2)
    save_file(tensors, str(shard))
    with pytest.raises(InputError, match=r"diffusion_pytorch_model\.safetensors: unknown tensor.*blocks\.0\.img_gate"):
        _load(model_copy)


def test_unknown_t5_tensor_names_the_file(model_copy):
    path = model_copy / wan_original.T5_CHECKPOINT
    state = torch.load(path, weights_only=True)
    state["pos_embedding.embedding.weight"] = torch.zeros(32, 4)  # a T5 with shared_pos, not Wan's UMT5
    torch.save(state, path)
    with pytest.raises(InputError, match=r"models_t5_umt5-xxl-enc-bf16\.pth: unknown tensor.*pos_embedding"):
        _load(model_copy)


def test_missing_shard_named_in_the_index(wan22, tmp_path):
    import shutil

    _, root, _ = wan22
    copy = Path(shutil.copytree(root, tmp_path / "model"))
    shard = sorted((copy / "low_noise_model").glob("diffusion_pytorch_model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(InputError, match=rf"{shard.name}: missing \(named in"):
        _load(copy)
    shutil.rmtree(copy / "low_noise_model")
    with pytest.raises(InputError, match=r"low_noise_model: missing"):
        _load(copy)


def test_image_to_video_is_refused_by_name(model_copy):
    config_path = model_copy / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, model_type="i2v")))
    with pytest.raises(InputError, match=r"config\.json: model_type 'i2v' is not supported"):
        wan_original.read_official_transformer_config(model_copy)


def test_writer_refuses_a_vae_the_release_cannot_hold(wan21, tmp_path):
    source, _, _ = wan21
    narrow = AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=1)
    with pytest.raises(ValueError, match=r"Wan2\.1_VAE\.pth holds the release's VAE structure"):
        wan_original.write_official_layout(tmp_path / "model", dict(source, vae=narrow))
    assert not (tmp_path / "model").exists()
