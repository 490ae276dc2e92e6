"""Wan under CFG and sequence parallelism on real multi-process gloo: each layout's transformer forwards (including
token counts that need padding) against the stock single-process ``WanTransformer3DModel``, and a two-expert
(Wan 2.2 A14B-style) run of the stock diffusers ``WanPipeline`` driving the parallelized experts against the same
pipeline on the stock experts."""

from __future__ import annotations

import pytest
import torch

from batchgen.models import WAN
from tests import _wan_cases as cases
from tests._dist import run_world

FORWARD_TOLERANCE = 1e-5
LATENTS_TOLERANCE = 1e-4

PLAIN = {"latent": cases.LATENT}
ODD = {"latent": cases.ODD_LATENT}
ODD_PER_TOKEN_TIMESTEP = {"latent": cases.ODD_LATENT, "per_token_timestep": True}

LAYOUTS = [
    # (name, world size, degrees, forward inputs, collectives that must have carried bytes)
    ("ulysses2", 2, {"ulysses": 2}, [PLAIN, ODD], {"ulysses", "output_gather"}),
    ("ring2", 2, {"ring": 2}, [PLAIN, ODD], {"ring", "output_gather"}),
    ("ulysses2xring2", 4, {"ulysses": 2, "ring": 2}, [PLAIN, ODD, ODD_PER_TOKEN_TIMESTEP], {"ulysses", "ring"}),
    ("cfg2", 2, {"cfg": 2}, [PLAIN], {"cfg_gather"}),
    ("cfg2xulysses2", 4, {"cfg": 2, "ulysses": 2}, [PLAIN, ODD], {"cfg_gather", "ulysses"}),
]

_references: dict[tuple, dict] = {}


def reference(item_seed: int, inputs: list[dict]) -> dict:
    key = (item_seed, repr(inputs))
    if key not in _references:
        _references[key] = cases.reference(item_seed, inputs, pipeline=True)
    return _references[key]


def visual_tokens(latent: tuple[int, int, int]) -> int:
    frames, height, width = latent
    return frames * (height // 2) * (width // 2)


def assert_matches_reference(results: list[dict], inputs: list[dict]) -> None:
    for r in results:
        ref = reference(r["item_seed"], inputs)
        for case, got, want in zip(inputs, r["forwards"], ref["forwards"], strict=True):
            assert got.shape == want.shape
            diff = (got - want).abs().max().item()
            assert diff <= FORWARD_TOLERANCE, f"rank {r['rank']}, {case}: transformer forward differs by {diff}"
        assert r["calls"] == ref["calls"] and min(ref["calls"]) > 0, "both experts must serve part of the run"
        diff = (r["latents"] - ref["latents"]).abs().max().item()
        assert diff <= LATENTS_TOLERANCE, f"rank {r['rank']}: two-expert WanPipeline latents differ by {diff}"


@pytest.mark.parametrize("name,world,degrees,inputs,collectives", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_parallel_layout_matches_single_process(name, world, degrees, inputs, collectives):
    sp = degrees.get("ulysses", 1) * degrees.get("ring", 1)
    if sp > 1:
        assert visual_tokens(cases.ODD_LATENT) % sp, "the odd latent must need padding for this layout"
    results = run_world(world, cases.parallel_case, degrees, inputs, True)
    assert_matches_reference(results, inputs)
    for r in results:
        sent = {kind for kind, nbytes in r["comm"].items() if nbytes}
        assert collectives <= sent, f"rank {r['rank']} sent over {sorted(sent)}, expected at least {collectives}"


def test_xfuser_backend_through_shim_matches_single_process():
    # xDiT's attention without joint tensors (see tests/_xfuser_shim.py for what the shim can and cannot verify).
    results = run_world(4, cases.parallel_case, {"ulysses": 2, "ring": 2}, [PLAIN], True, "xfuser-shim")
    assert_matches_reference(results, [PLAIN])


def test_stock_processors_come_back_and_cross_attention_is_untouched():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from batchgen.parallel.apply import parallelize_transformer, unparallelize_transformer
    from batchgen.worker.context import SingleProcess

    model = cases.tiny_transformer()
    before = [(block.attn1.processor, block.attn2.processor) for block in model.blocks]
    want = cases.forwards(model, 3, [ODD])[0]
    parallelize_transformer(model, SingleProcess(), plan=WAN.parallel_plan)
    assert all(isinstance(block.attn1.processor, WanAttnProcessor) for block in model.blocks)
    assert [block.attn2.processor for block in model.blocks] == [p for _, p in before]
    assert torch.equal(cases.forwards(model, 3, [ODD])[0], want)
    unparallelize_transformer(model)
    assert [(block.attn1.processor, block.attn2.processor) for block in model.blocks] == before


# -- first-block cache on Wan's blocks -----------------------------------------------------------------------------

CACHE_THRESHOLD = 0.5  # the tiny experts' relative changes sit at 0.43-0.58: some steps reuse, some compute


def test_cache_threshold_zero_on_wan_equals_uncached_exactly():
    uncached, calls = cases.denoise(
        cases.tiny_transformer(0), cases.tiny_transformer(1), 11, cases.ODD_VIDEO, 1.0, cases.CACHE_STEPS
    )
    cached = cases.cached_denoise(11, 0.0)
    assert torch.equal(cached["latents"], uncached)
    assert [facts["steps_computed"] for facts in cached["cache"]] == calls
    assert all(facts["steps_reused"] == 0 for facts in cached["cache"])


def test_cached_wan_under_ulysses2_with_padding_decides_like_one_process():
    # 175 tokens padded to 176: the padding row stays out of the metric, so both ranks skip the steps one process
    # skips, and skipping changes the result (the cache is not a no-op here).
    one = cases.cached_denoise(11, CACHE_THRESHOLD)
    assert sum(facts["steps_reused"] for facts in one["cache"]) > 0
    uncached = cases.cached_denoise(11, 0.0)
    assert (one["latents"] - uncached["latents"]).abs().max().item() > 0.01
    for r in run_world(2, cases.parallel_cached_case, {"ulysses": 2}, CACHE_THRESHOLD):
        assert r["cache"] == one["cache"], f"rank {r['rank']} decided other steps than one process"
        assert r["changes"] == pytest.approx(one["changes"], rel=1e-6, nan_ok=True), (
            "the metric must be the one process's"
        )
        diff = (r["latents"] - one["latents"]).abs().max().item()
        assert diff <= LATENTS_TOLERANCE, f"rank {r['rank']}: cached latents differ by {diff}"


@pytest.mark.slow
def test_compiled_wan_blocks_match_eager_and_compile_once_per_shape(tmp_path, monkeypatch):
    from batchgen.models.common.compile import compile_blocks, graph_count

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = cases.tiny_transformer()
    inputs = cases.forward_inputs(3, cases.ODD_LATENT)
    with torch.no_grad():
        eager = model(**inputs, return_dict=False)[0]
        compile_blocks(model, spec=WAN)
        compiled = model(**inputs, return_dict=False)[0]
        graphs = graph_count()
        again = model(**inputs, return_dict=False)[0]
    assert graph_count() == graphs, "a second forward of the same shape must not compile again"
    assert torch.equal(again, compiled)
    assert (compiled - eager).abs().max().item() <= FORWARD_TOLERANCE * eager.abs().max().item()


def test_compile_refuses_another_model_with_a_config_error():
    from diffusers import AutoencoderKLWan

    from batchgen.core.errors import ConfigError
    from batchgen.models.common.compile import compile_blocks

    with pytest.raises(ConfigError, match=r"parallel.compile \(--compile\): AutoencoderKLWan is not a Wan"):
        compile_blocks(AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1], num_res_blocks=1), spec=WAN)


def test_fp8_gate_on_a_wan_block_converts_only_a_faithful_kernel():
    from batchgen.models.common.fp8 import Fp8Linear, emulated_kernel, enable_fp8

    def off_by_a_fifth(a, b, scale_a, scale_b, out_dtype):
        return ((a.float() * scale_a) @ (b.float() * scale_b) * 1.2).to(out_dtype)

    model = cases.tiny_transformer().to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in cases.forward_inputs(3, cases.LATENT).items()}
    with torch.no_grad():
        bf16 = model(**inputs, return_dict=False)[0].float()
    facts = enable_fp8(model, "cpu", spec=WAN, kernel=off_by_a_fifth)
    assert facts["used"] is False and not any(isinstance(m, Fp8Linear) for m in model.modules())
    facts = enable_fp8(model, "cpu", spec=WAN, kernel=emulated_kernel)
    # Both blocks' attn1 and attn2 q/k/v/out and the two FFN linears.
    assert facts["used"] is True and facts["linear_layers"] == 2 * (4 + 4 + 2)
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == facts["linear_layers"]
    with torch.no_grad():
        fp8 = model(**inputs, return_dict=False)[0].float()
    assert 0 < ((fp8 - bf16).norm() / bf16.norm()).item() < 0.05
