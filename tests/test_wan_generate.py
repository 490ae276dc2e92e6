"""WanGenerator against diffusers' own WanPipeline on the tiny Wan models (fp32, CPU): one and two experts, CFG on
and off, empty and non-empty negative prompts; prompt encoding once per shard; loading errors."""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pytest
import torch

from batchgen.core.config import ParallelConfig
from batchgen.core.errors import EXIT_BAD_INPUT, InputError
from batchgen.core.item import Item
from batchgen.core.quality import NonFiniteError
from batchgen.models.wan.generator import WanGenerator
from batchgen.models.wan.loading import load_wan_components
from batchgen.worker.context import SingleProcess
from tests._stock import stock_output, stock_pipeline

TOLERANCE = 1e-4
STEPS = 4  # the two-expert model's 4th timestep (800) is below its boundary (875): both experts run


def make_item(**overrides) -> Item:
    values = dict(
        id="item-0",
        prompt="a red cat walking in the snow",
        negative_prompt="",
        seed=1234,
        num_frames=9,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        row=0,
    )
    values.update(overrides)
    return Item(**values)


@pytest.fixture(scope="module", params=["one-expert", "two-experts"])
def model_dir(request, tiny_wan_dir, tiny_wan2_dir):
    return tiny_wan_dir if request.param == "one-expert" else tiny_wan2_dir


@pytest.fixture(scope="module")
def generator(model_dir):
    gen = WanGenerator(model_dir, device="cpu", dtype="fp32")
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def reference_pipeline(model_dir):
    from diffusers import WanPipeline

    return stock_pipeline(WanPipeline, model_dir)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"negative_prompt": "blurry, static", "seed": 7}, {"guidance_scale": 1.0, "seed": 3}],
    ids=["cfg-empty-negative", "cfg-negative", "no-cfg"],
)
def test_latents_and_frames_match_diffusers_wan_pipeline(generator, reference_pipeline, overrides):
    item = make_item(**overrides)
    expected_latents = stock_output(reference_pipeline, item, "latent")
    latents = generator.denoise(item)
    assert latents.dtype == torch.float32
    assert (latents - expected_latents).abs().max().item() <= TOLERANCE

    expected_video = stock_output(reference_pipeline, item, "np")[0]  # [F, H, W, 3] in [0, 1]
    video = generator.decode_video(latents)[0].permute(1, 2, 3, 0).numpy()  # [-1, 1]
    assert np.abs((video + 1) / 2 - expected_video).max() <= TOLERANCE
    frames = generator.decode(latents)
    assert frames.dtype == np.uint8 and frames.shape == (9, 64, 64, 3)
    # Rounding where diffusers' float output is compared: at most one level apart, and the video is not flat.
    assert np.abs(frames.astype(np.int16) - np.round(expected_video * 255)).max() <= 1
    assert frames.std() > 10


def test_two_experts_switch_at_the_boundary(tiny_wan2_dir):
    gen = WanGenerator(tiny_wan2_dir, device="cpu", dtype="fp32")
    assert gen.boundary_timestep == 875.0 and len(gen.transformers) == 2
    calls = {0: [], 1: []}
    for index, transformer in enumerate(gen.transformers):
        transformer.register_forward_pre_hook(
            lambda module, args, kwargs, i=index: calls[i].append(int(kwargs["timestep"][0])), with_kwargs=True
        )
    gen.denoise(make_item())
    # UniPC with flow shift 12 over 4 steps: 999, 973, 923 are high-noise steps, 800 is a low-noise step.
    assert calls == {0: [999, 973, 923], 1: [800]}


def test_the_cfg_batch_is_one_transformer_call_per_step(tiny_wan_dir):
    gen = WanGenerator(tiny_wan_dir, device="cpu", dtype="fp32")
    batches = []
    gen.transformers[0].register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    gen.denoise(make_item())
    gen.denoise(make_item(guidance_scale=1.0))
    assert batches == [2] * STEPS + [1] * STEPS


def test_prompts_are_encoded_once_per_distinct_text_as_wan_pipeline_does(tiny_wan_dir):
    from diffusers import WanPipeline

    gen = WanGenerator(tiny_wan_dir, device="cpu", dtype="fp32")
    rows = []
    hook = gen.text_encoder.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    items = [
        make_item(id="a", prompt="cat"),
        make_item(id="b", prompt="cat", negative_prompt="dog"),
        make_item(id="c", prompt="dog", guidance_scale=1.0, negative_prompt="never used"),
    ]
    gen.prepare(items)
    for item in items:
        gen.generate(dataclasses.replace(item, num_inference_steps=1))
    hook.remove()
    # "", "cat" and "dog", each once: the empty negative prompt goes through UMT5 too, and generate reuses them.
    assert sum(rows) == 3
    encoded = gen._encoded
    assert encoded["c"].uncond is None
    assert torch.equal(encoded["a"].cond, encoded["b"].cond) and torch.equal(encoded["b"].uncond, encoded["c"].cond)

    pipe = WanPipeline.from_pretrained(str(tiny_wan_dir), dtype=torch.float32)
    cond, uncond = pipe.encode_prompt("cat", negative_prompt="", max_sequence_length=512, device="cpu")
    assert encoded["a"].cond.shape == cond.shape == (1, 512, 32)
    assert (encoded["a"].cond - cond).abs().max().item() <= 1e-5
    assert (encoded["a"].uncond - uncond).abs().max().item() <= 1e-5
    assert encoded["a"].uncond.abs().sum() > 0  # the empty text's </s> token is a real embedding, not zeros
    assert not encoded["a"].cond[0, 5:].any()  # zero-padded past the prompt's tokens


def test_non_writer_rank_does_not_decode(tiny_wan_dir):
    class Follower(SingleProcess):
        is_writer = False

    follower = WanGenerator(tiny_wan_dir, device="cpu", dtype="fp32", context=Follower())
    decoded = []
    follower.vae.decoder.register_forward_pre_hook(lambda *a: decoded.append(1))
    assert follower.generate(make_item(num_inference_steps=1)) is None
    assert decoded == []


def test_non_finite_latents_and_vae_output_raise_before_the_uint8_cast(tiny_wan_dir):
    components = load_wan_components(tiny_wan_dir, dtype="fp32", device="cpu")
    with torch.no_grad():
        components.transformer.proj_out.bias[0] = float("nan")
    gen = WanGenerator.from_components(components, device="cpu")
    with pytest.raises(NonFiniteError, match="latents after denoising"):
        gen.generate(make_item(num_inference_steps=1))

    components = load_wan_components(tiny_wan_dir, dtype="fp32", device="cpu")
    with torch.no_grad():
        components.vae.decoder.conv_out.bias[0] = float("nan")  # the decoder clamps: inf would become 1
    gen = WanGenerator.from_components(components, device="cpu")
    with pytest.raises(NonFiniteError, match="VAE output"):
        gen.generate(make_item(num_inference_steps=1))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"num_frames": 10}, "4k\\+1"), ({"height": 72}, "multiple of 16"), ({"width": 8}, "multiple of 16")],
)
def test_shapes_that_do_not_fit_wan_are_input_errors(tiny_wan_dir, overrides, message):
    gen = WanGenerator(tiny_wan_dir, device="cpu", dtype="fp32")
    with pytest.raises(InputError, match=message) as raised:
        gen.denoise(make_item(id="odd", **overrides))
    assert "item odd" in str(raised.value) and raised.value.exit_code == EXIT_BAD_INPUT


def test_first_block_cache_runs_per_expert(tiny_wan2_dir):
    item = make_item(num_inference_steps=6)  # timesteps 999, 983, 960, 923 | 857, 707: 4 high-noise, 2 low-noise
    plain = WanGenerator(tiny_wan2_dir, device="cpu", dtype="fp32").denoise(item)
    never = WanGenerator(tiny_wan2_dir, device="cpu", dtype="fp32", parallel=ParallelConfig(cache_threshold=1e-9))
    assert (never.denoise(item) - plain).abs().max().item() <= 1e-6
    assert [c.facts()["steps_reused"] for c in never.caches] == [0, 0]

    cached = WanGenerator(tiny_wan2_dir, device="cpu", dtype="fp32", parallel=ParallelConfig(cache_threshold=1.0))
    video = cached.generate(item)
    high, low = video.extra["cache"]
    assert high["steps_computed"] + high["steps_reused"] == 4 and low["steps_computed"] + low["steps_reused"] == 2
    assert high["steps_computed"] >= 1 and low["steps_computed"] >= 1  # each expert's first step runs every block
    assert high["steps_reused"] >= 1
    again = cached.generate(item)  # reset per item: the same decisions again
    assert again.extra["cache"] == video.extra["cache"] and np.array_equal(again.frames, video.frames)


def test_fp8_without_fp8_tensor_cores_stays_in_the_model_dtype(tiny_wan_dir):
    gen = WanGenerator(tiny_wan_dir, device="cpu", dtype="fp32", parallel=ParallelConfig(fp8=True))
    video = gen.generate(make_item(num_inference_steps=1))
    assert video.extra["fp8"] == {"used": False, "reason": "no FP8 tensor cores"}


@pytest.mark.slow
def test_compiled_blocks_equal_eager_and_compile_once_per_shape(tiny_wan_dir):
    item = make_item(num_inference_steps=2)
    eager = WanGenerator(tiny_wan_dir, device="cpu", dtype="fp32").denoise(item)
    compiled = WanGenerator(tiny_wan_dir, device="cpu", dtype="fp32", parallel=ParallelConfig(compile=True))
    first = compiled.generate(item)
    assert (compiled.denoise(item) - eager).abs().max().item() <= 1e-5
    assert first.timings["compile"] > 0 and compiled.generate(item).timings["compile"] == 0


def test_bf16_keeps_wan_fp32_modules_and_latents(tiny_wan_dir):
    gen = WanGenerator(tiny_wan_dir, device="cpu", dtype="bf16")
    transformer = gen.components.transformer
    assert gen.transformer_dtype == torch.bfloat16 and transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert transformer.scale_shift_table.dtype == torch.float32 and gen.vae.dtype == torch.float32
    latents = gen.denoise(make_item(num_inference_steps=2))
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    assert gen.generate(make_item(num_inference_steps=1)).extra["dtype"] == "bfloat16"


# --- loading errors ------------------------------------------------------------------------------------------------


def _weights(folder: str) -> str:
    name = "model.safetensors" if folder == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return f"{folder}/{name}"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: [shutil.rmtree(d), d.mkdir()], "not a Wan model directory"),
        (lambda d: shutil.rmtree(d / "text_encoder"), "text_encoder: missing"),
        (lambda d: shutil.rmtree(d / "scheduler"), "scheduler: missing"),
        (lambda d: (d / _weights("vae")).unlink(), "vae: no weight file"),
        (lambda d: shutil.rmtree(d / "transformer_2"), "transformer_2: no weight file"),
        (lambda d: _truncate(d / _weights("transformer_2")), "transformer_2.*truncated safetensors"),
        (lambda d: _truncate(d / _weights("text_encoder")), "text_encoder.*truncated safetensors"),
        (lambda d: (d / "model_index.json").write_text("{"), "model_index.json: not valid JSON"),
    ],
    ids=[
        "missing-dir",
        "empty-dir",
        "no-text-encoder",
        "no-scheduler",
        "no-vae-weights",
        "no-second-expert",
        "truncated-expert",
        "truncated-text-encoder",
        "bad-model-index",
    ],
)
def test_bad_model_dir_is_input_error_naming_the_file(tmp_path, tiny_wan2_dir, damage, message):
    model = tmp_path / "model"
    shutil.copytree(tiny_wan2_dir, model)
    damage(model)
    with pytest.raises(InputError, match=message) as raised:
        load_wan_components(model, dtype="fp32", device="cpu")
    assert raised.value.exit_code == EXIT_BAD_INPUT


def test_bf16_variant_files_are_used_for_bf16(tmp_path, tiny_wan_dir):
    from diffusers import WanTransformer3DModel

    model = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, model)
    transformer = WanTransformer3DModel.from_pretrained(str(model / "transformer"), dtype=torch.bfloat16)
    transformer.save_pretrained(str(model / "transformer"), variant="bf16")
    (model / _weights("transformer")).unlink()  # only the bf16 variant left: used whatever the dtype
    components = load_wan_components(model, dtype="bf16", device="cpu")
    loaded = components.transformer.state_dict()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in transformer.state_dict().items())


def test_official_release_layout_loads_through_the_same_seam(tmp_path, tiny_wan2_dir):
    from batchgen.models.wan import original as wan_original
    from batchgen.models.wan.loading import detect_wan_layout, read_transformer_config

    source = load_wan_components(tiny_wan2_dir, dtype="fp32", device="cpu")
    fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(source)}
    root = wan_original.write_official_layout(tmp_path / "official", fields)
    assert detect_wan_layout(root) == "official" and read_transformer_config(root)["num_attention_heads"] == 4
    official = load_wan_components(root, dtype="fp32", device="cpu")
    assert official.layout == "official" and official.boundary_ratio == 0.875 and official.transformer_2 is not None
    item = make_item(seed=5)
    expected = WanGenerator.from_components(source, device="cpu").denoise(item)
    assert (WanGenerator.from_components(official, device="cpu").denoise(item) - expected).abs().max() <= TOLERANCE


# --- distributed: real gloo process groups against the single-process WanPipeline ---------------------------------

# 9 frames at 48x48: 3 x 3 x 3 = 27 visual tokens, which no sequence-parallel degree divides (padded).
ODD_SHAPE = {"height": 48, "width": 48}
LAYOUTS = [
    # (name, world size, degrees, two experts, item overrides)
    ("ulysses2", 2, {"ulysses": 2}, False, {}),
    ("ring2", 2, {"ring": 2}, False, {}),
    ("cfg2", 2, {"cfg": 2}, False, {}),
    ("cfg2xulysses2", 4, {"cfg": 2, "ulysses": 2}, False, {}),
    ("ulysses2-two-experts", 2, {"ulysses": 2}, True, {}),
    ("ring2-padded", 2, {"ring": 2}, False, ODD_SHAPE),
    ("dp2", 2, {}, False, {}),
    ("cfg2-no-guidance", 2, {"cfg": 2}, False, {"guidance_scale": 1.0}),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,world,degrees,two_experts,overrides", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_parallel_generator_matches_single_process_wan_pipeline(
    name, world, degrees, two_experts, overrides, tiny_wan_dir, tiny_wan2_dir
):
    from tests import _wan_gen_cases as cases
    from tests._dist import run_world

    model_dir = str(tiny_wan2_dir if two_experts else tiny_wan_dir)
    results = run_world(world, cases.generator_case, model_dir, degrees, overrides, timeout_s=240)
    dp = results[0]["topology"]["dp"]
    assert dp == world // max(1, degrees.get("cfg", 1) * degrees.get("ulysses", 1) * degrees.get("ring", 1))
    assert sum(r["is_writer"] for r in results) == dp, "exactly one writer per data-parallel group"
    assert len({r["seed"] for r in results}) == dp, "each data-parallel group works on its own item"
    references = {seed: cases.reference(model_dir, seed, overrides) for seed in {r["seed"] for r in results}}
    for r in results:
        expected = references[r["seed"]]
        diff = (r["latents"] - expected["latents"]).abs().max().item()
        assert diff <= TOLERANCE, f"rank {r['rank']}: final latents differ by {diff}"
        if not r["is_writer"]:
            assert r["frames"] is None, f"rank {r['rank']} is not a writer but returned a video"
            continue
        assert r["parallel"]["world_size"] == world and r["parallel"]["cfg"] == degrees.get("cfg", 1)
        frames = r["frames"].astype(np.int16)
        assert np.abs(frames - np.round(expected["frames"] * 255)).max() <= 1
    if dp == 2:
        a, b = (references[s]["latents"] for s in sorted(references))
        assert (a - b).abs().max() > 0.1, "the two groups' items must differ for this case to mean anything"


def test_offload_estimate_counts_both_experts(tiny_wan2_dir):
    gen = WanGenerator(tiny_wan2_dir, device="cpu", dtype="fp32")
    needs = gen._memory_needs([make_item(), make_item(id="b", num_frames=17, guidance_scale=1.0)])
    experts = gen.components.experts
    assert len(experts) == 2
    assert needs.transformer_bytes == sum(p.numel() * 4 for t in experts for p in t.parameters())
    assert needs.tokens_per_rank == 5 * 4 * 4 and needs.batch_per_rank == 2 and needs.width == 4 * 24


@pytest.mark.slow
def test_batch_run_on_two_experts_under_ulysses_2_commits_each_item_once(tmp_path, tiny_wan2_dir):
    """The whole machinery on Wan: `batchgen run` (plan, torchrun-style worker pair, commit, index), then a rerun
    that finds everything done."""
    from batchgen.core.plan import load_plan
    from batchgen.models.common.weights import fingerprint_model_dir
    from batchgen.storage import open_storage
    from tests._runs import assert_exactly_once, run_cli, tiny_run_args, write_manifest

    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "prompts.parquet", 4)
    args = ["run", str(manifest), "--output", str(out), *tiny_run_args(tiny_wan2_dir), "--shard-size", "2"]
    first = run_cli(*args, "--nproc-per-worker", "2", "--ulysses-degree", "2")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "4 done (4 generated now, 0 reused, 0 resumed), 0 failed" in first.stdout
    storage = open_storage(str(out))
    run_id = re.search(r"^run\s+(\S+)$", first.stdout, re.M).group(1)
    sidecars = assert_exactly_once(storage, load_plan(storage, run_id))
    assert len(sidecars) == 4 and {s["frames"] for s in sidecars.values()} == {9}
    assert {s["model"]["fingerprint"] for s in sidecars.values()} == {fingerprint_model_dir(tiny_wan2_dir)}
    assert {s["model"]["family"] for s in sidecars.values()} == {"wan"}
    assert {(s["parallel"]["world_size"], s["parallel"]["ulysses"]) for s in sidecars.values()} == {(2, 2)}
    second = run_cli(*args, "--nproc-per-worker", "2", "--ulysses-degree", "2")
    assert second.returncode == 0 and "Nothing to generate" in second.stdout, second.stderr[-4000:]
    assert "4 done (0 generated now, 0 reused, 4 resumed)" in second.stdout
