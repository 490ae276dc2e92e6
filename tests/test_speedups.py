"""Issue 9 items 3-6 on CPU: offload='auto' decisions, the first-block cache (alone and agreed over gloo ranks),
compiled block regions against eager, and the FP8 numeric gate driven by an injected kernel."""

from __future__ import annotations

import pytest
import torch

from batchgen.core.config import ParallelConfig
from batchgen.models import MOCHI as MOCHI_SPEC
from batchgen.models.common.cache import FirstBlockCache
from batchgen.models.common.fp8 import Fp8Linear, emulated_kernel, enable_fp8, numeric_gate
from batchgen.models.common.memory import GIB, MemoryNeeds, decide_offload
from batchgen.models.mochi.generator import MochiGenerator
from tests import _speedup_cases as cases
from tests._dist import run_world

TOLERANCE = 1e-4
CACHE_STEPS = 8
# The tiny random model's first-block residual moves 45-130% per step (bench/quality.py prints the metric); 0.6
# makes it reuse some steps and compute others.
CACHE_THRESHOLD = 0.6

# Mochi in bf16 (shared/reference/mochi.md): DiT 20.1 GB, T5 encoder 9.5 GB, VAE about 0.36 B parameters.
MOCHI = dict(transformer_bytes=20_100_000_000, vae_bytes=720_000_000, text_encoder_bytes=9_500_000_000, width=3072)


# -- offload = "auto" ---------------------------------------------------------------------------------------------


def test_auto_keeps_everything_on_a_big_gpu():
    # 163 frames at 480x848 (44,520 tokens), CFG batch 2 on one H200 (about 140 GiB free).
    needs = MemoryNeeds(**MOCHI, tokens_per_rank=44_520, batch_per_rank=2)
    decision = decide_offload("auto", needs, free_bytes=140 * GIB)
    assert not decision.offload
    assert "stays on the GPU" in decision.reason and "140.0 GiB free" in decision.reason
    # 36 bytes x 2 x 44,520 x 3072 = 9.2 GiB of activations, above T5's 8.8 GiB: the DiT's peak decides.
    assert needs.activation_bytes == 36 * 2 * 44_520 * 3072
    assert needs.resident_peak_bytes == 20_100_000_000 + 720_000_000 + needs.activation_bytes


def test_auto_offloads_on_a_small_gpu():
    needs = MemoryNeeds(**MOCHI, tokens_per_rank=44_520, batch_per_rank=2)
    decision = decide_offload("auto", needs, free_bytes=24 * GIB)
    assert decision.offload
    # Estimated 28.6 GiB; measured with --offload model (VAE not resident): 27.3 GiB (README, H200).
    assert (
        "offloading" in decision.reason and "peak 28.6 GiB" in decision.reason and "21.6 GiB usable" in decision.reason
    )


def test_auto_counts_the_split_of_sequence_and_cfg_parallelism():
    # 253 frames at 480x848 (68,370 tokens) with 34 GiB free: the whole CFG batch (33.5 GiB) does not fit, the
    # quarter of it one rank of cfg 2 x ulysses 2 holds does (then T5's visit is the peak: 28.2 GiB).
    whole = MemoryNeeds(**MOCHI, tokens_per_rank=68_370, batch_per_rank=2)
    split = MemoryNeeds(**MOCHI, tokens_per_rank=68_370 // 2, batch_per_rank=1)
    assert decide_offload("auto", whole, free_bytes=34 * GIB).offload
    assert not decide_offload("auto", split, free_bytes=34 * GIB).offload
    assert split.activation_bytes * 4 == whole.activation_bytes
    # Short clips: T5's visit (9.5 GB) is the peak, not the activations.
    short = MemoryNeeds(**MOCHI, tokens_per_rank=1590, batch_per_rank=2)
    assert short.resident_peak_bytes == 20_100_000_000 + 720_000_000 + 9_500_000_000


def test_explicit_modes_and_cpu_are_taken_as_given():
    needs = MemoryNeeds(**MOCHI, tokens_per_rank=44_520, batch_per_rank=2)
    assert decide_offload("model", needs, 1000 * GIB).offload
    assert not decide_offload("none", needs, 1 * GIB).offload
    cpu = decide_offload("auto", None, None)
    assert not cpu.offload and "CPU" in cpu.reason
    with pytest.raises(ValueError, match="offload mode"):
        decide_offload("disk", needs, GIB)


def test_auto_is_the_default_and_recorded(tiny_model_dir):
    generator = MochiGenerator(tiny_model_dir, device="cpu")
    assert ParallelConfig().offload == "auto"
    facts = generator.parallel_facts()
    assert facts["offload"] == "auto" and facts["offloaded"] is False and facts["compile"] is False


def test_attention_choice_lands_in_the_sidecar_and_per_prompt_equals_joint(tiny_model_dir):
    # The generator carries [parallel] attention to its processors; each item's sidecar says what ran.
    item = cases.tiny_item(CACHE_STEPS)
    joint = MochiGenerator(tiny_model_dir, device="cpu", parallel=ParallelConfig(attention="joint"))
    per_prompt = MochiGenerator(tiny_model_dir, device="cpu", parallel=ParallelConfig(attention="per-prompt"))
    torch.testing.assert_close(per_prompt.denoise(item), joint.denoise(item), atol=1e-5, rtol=1e-5)
    facts = per_prompt.generate(item).extra["parallel"]["attention"]
    assert (facts["setting"], facts["path"], facts["measured"]) == ("per-prompt", "per-prompt", False)
    assert facts["kernel"] in ("cpu_flash", "math")
    auto = MochiGenerator(tiny_model_dir, device="cpu").generate(item).extra["parallel"]["attention"]
    assert (auto["setting"], auto["path"], auto["measured"]) == ("auto", "joint", False)  # no timer on CPU


# -- first-block cache -------------------------------------------------------------------------------------------


def test_cache_threshold_zero_equals_uncached_exactly(tiny_model_dir):
    plain = MochiGenerator(tiny_model_dir, device="cpu")
    reference = plain.denoise(cases.tiny_item(CACHE_STEPS))
    cached = MochiGenerator(tiny_model_dir, device="cpu")
    cached.caches = [FirstBlockCache(cached.components.transformer, 0.0)]
    assert torch.equal(cached.denoise(cases.tiny_item(CACHE_STEPS)), reference)
    assert cached.caches[0].facts() == {"threshold": 0.0, "steps_computed": CACHE_STEPS, "steps_reused": 0}


def test_cache_reuses_steps_resets_per_item_and_lands_in_the_sidecar(tiny_model_dir):
    plain = MochiGenerator(tiny_model_dir, device="cpu").denoise(cases.tiny_item(CACHE_STEPS))
    generator = MochiGenerator(tiny_model_dir, device="cpu", parallel=ParallelConfig(cache_threshold=CACHE_THRESHOLD))
    first = generator.denoise(cases.tiny_item(CACHE_STEPS))
    (cache,) = generator.caches
    facts = cache.facts()
    assert facts["steps_reused"] > 0 and facts["steps_computed"] > 1
    assert facts["steps_computed"] + facts["steps_reused"] == CACHE_STEPS
    assert torch.isfinite(first).all() and not torch.equal(first, plain)
    # A second item starts from scratch: same item, same result and counts (nothing carried over).
    video = generator.generate(cases.tiny_item(CACHE_STEPS))
    assert video.extra["cache"] == facts
    assert torch.equal(generator.denoise(cases.tiny_item(CACHE_STEPS)), first)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("degrees", "shape"),
    [
        ({"ulysses_degree": 2}, None),
        ({"cfg_degree": 2}, None),
        # 13 frames at 48x80: 45 visual tokens, padded to 46; the padding row must not enter the skip metric.
        ({"ulysses_degree": 2}, {"height": 48, "width": 80}),
    ],
    ids=["ulysses2", "cfg2", "ulysses2-padded"],
)
def test_cached_parallel_group_matches_one_process(tiny_model_dir, degrees, shape):
    parallel = {"cache_threshold": CACHE_THRESHOLD}
    model = str(tiny_model_dir)
    reference, reference_facts = cases.single_process_latents(model, parallel, CACHE_STEPS, shape)
    results = run_world(2, cases.denoise_case, model, {**parallel, **degrees}, CACHE_STEPS, None, shape)
    reference_change = reference_facts.pop("last_change")
    for r in results:
        assert r["cache"] == reference_facts, f"rank {r['rank']} decided other steps than one process"
        # The metric itself, not only the decisions it led to: padding rows must not enter it.
        assert r["last_change"] == pytest.approx(reference_change, rel=1e-6), f"rank {r['rank']}: skip metric"
        diff = (r["latents"] - reference).abs().max().item()
        assert diff <= TOLERANCE, f"rank {r['rank']}: latents differ by {diff}"
    assert reference_facts["steps_reused"] > 0


# -- compiled blocks -----------------------------------------------------------------------------------------------

COMPILE_STEPS = 2
# 13 frames at 32x64: 24 visual tokens, what each rank of the ulysses-2 test below holds of 64x64, so the ranks
# find the block graphs in the inductor cache this test filled (compiling is the slow part on CPU).
HALF_SHAPE = {"height": 32, "width": 64}
BF16_TOLERANCE = 1e-2  # relative to the latents' magnitude: bf16 keeps 8 bits of mantissa


@pytest.fixture(scope="module")
def inductor_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("inductor")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
        yield str(path)


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_compile_once_per_shape(tiny_model_dir, inductor_dir):
    from batchgen.models.common.compile import graph_count

    item = cases.tiny_item(COMPILE_STEPS, **HALF_SHAPE)
    eager = MochiGenerator(tiny_model_dir, device="cpu").denoise(item)
    generator = MochiGenerator(tiny_model_dir, device="cpu", parallel=ParallelConfig(compile=True))
    video = generator.generate(item)
    assert video.timings["compile"] > 0
    compiled = generator.denoise(item)
    scale = eager.abs().max().item()
    assert (compiled - eager).abs().max().item() <= BF16_TOLERANCE * scale
    graphs = graph_count()
    again = generator.generate(item)
    assert again.timings["compile"] == 0.0, "a second item of the same shape must not compile again"
    assert graph_count() == graphs
    assert [list(c.shapes) for c in generator.compiled] == [[(2, 12, 3, 4, 8)]]


@pytest.mark.slow
def test_compiled_blocks_under_ulysses2_match_eager(tiny_model_dir, inductor_dir):
    eager, _ = cases.single_process_latents(str(tiny_model_dir), {}, COMPILE_STEPS)
    results = run_world(
        2,
        cases.denoise_case,
        str(tiny_model_dir),
        {"ulysses_degree": 2, "compile": True},
        COMPILE_STEPS,
        inductor_dir,
        timeout_s=900,
    )
    scale = eager.abs().max().item()
    for r in results:
        assert r["compile_s"] > 0
        assert (r["latents"] - eager).abs().max().item() <= BF16_TOLERANCE * scale


# -- FP8 gate -------------------------------------------------------------------------------------------------------


def _bf16_block(context_pre_only: bool = False):
    from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock

    torch.manual_seed(0)
    return MochiTransformerBlock(64, 4, 16, pooled_projection_dim=32, context_pre_only=context_pre_only).to(
        torch.bfloat16
    )


def _off_by_a_fifth(a, b, scale_a, scale_b, out_dtype):
    return ((a.float() * scale_a) @ (b.float() * scale_b) * 1.2).to(out_dtype)


def test_fp8_gate_passes_a_faithful_kernel_and_rejects_a_wrong_one():
    block = _bf16_block()
    good = numeric_gate(block, emulated_kernel, "cpu", spec=MOCHI_SPEC)
    assert good.passed and good.reference_error < good.fp8_error <= good.limit
    bad = numeric_gate(block, _off_by_a_fifth, "cpu", spec=MOCHI_SPEC)
    assert not bad.passed and bad.fp8_error > bad.limit
    # The multiple is what decides: a faithful FP8 block is several times less exact than bf16.
    assert not numeric_gate(block, emulated_kernel, "cpu", spec=MOCHI_SPEC, multiple=2.0).passed


def test_fp8_enable_converts_the_linears_only_when_the_gate_passes(tiny_model_dir):
    from batchgen.models.mochi.loading import load_components

    transformer = load_components(tiny_model_dir, dtype=torch.bfloat16, device="cpu").transformer
    facts = enable_fp8(transformer, "cpu", spec=MOCHI_SPEC, kernel=_off_by_a_fifth)
    assert facts["used"] is False and facts["reason"] == "numeric gate failed"
    assert not any(isinstance(m, Fp8Linear) for m in transformer.modules())
    facts = enable_fp8(transformer, "cpu", spec=MOCHI_SPEC, kernel=emulated_kernel)
    assert facts["used"] is True and facts["linear_layers"] > 0
    assert sum(isinstance(m, Fp8Linear) for m in transformer.modules()) == facts["linear_layers"]


def test_fp8_is_off_by_default_and_refused_without_fp8_hardware(tiny_model_dir):
    assert ParallelConfig().fp8 is False
    generator = MochiGenerator(tiny_model_dir, device="cpu", parallel=ParallelConfig(fp8=True))
    assert generator.fp8_facts == [{"used": False, "reason": "no FP8 tensor cores"}]
    assert not any(isinstance(m, Fp8Linear) for m in generator.components.transformer.modules())


# -- configuration ---------------------------------------------------------------------------------------------------


def test_config_keys_and_flags(tmp_path):
    import argparse

    from batchgen.cli._options import add_config_argument, add_parallel_arguments, config_from_args
    from batchgen.core.config import load_config
    from batchgen.core.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_config_argument(parser)
    add_parallel_arguments(parser)
    parallel = config_from_args(parser.parse_args(["--compile", "--cache-threshold", "0.05", "--fp8"])).parallel
    assert (parallel.compile, parallel.cache_threshold, parallel.fp8, parallel.offload) == (True, 0.05, True, "auto")
    assert config_from_args(parser.parse_args([])).parallel == ParallelConfig()
    bad = tmp_path / "bad.toml"
    bad.write_text('[parallel]\ncompile = "yes"\n')
    with pytest.raises(ConfigError, match=r"parallel.compile must be true or false"):
        load_config(bad)
    with pytest.raises(ConfigError, match="parallel.cache_threshold must be between 0 and 1"):
        ParallelConfig(cache_threshold=1.5)
    assert config_from_args(parser.parse_args(["--attention", "per-prompt"])).parallel.attention == "per-prompt"
    with pytest.raises(ConfigError, match="parallel.attention must be 'auto', 'joint' or 'per-prompt', got 'x'"):
        config_from_args(parser.parse_args(["--attention", "x"]))
    with pytest.raises(ConfigError, match="parallel.attention 'joint' needs a key mask"):
        ParallelConfig(attention="joint", sp_backend="xfuser")


@pytest.mark.parametrize(
    "parallel",
    [
        ParallelConfig(),
        ParallelConfig(compile=True, cache_threshold=0.05, fp8=True),
        ParallelConfig(attention="per-prompt"),
    ],
)
def test_local_workers_get_the_speed_settings(parallel):
    import argparse
    import types

    from batchgen.cli import worker
    from batchgen.cli._options import config_from_args
    from batchgen.core.config import RunConfig
    from batchgen.launch.local import worker_command

    plan = types.SimpleNamespace(run_id="demo-0123456789ab")
    command = worker_command(plan, "file:///out", ["shard-000000"], "/models/tiny", RunConfig(parallel=parallel))
    parser = argparse.ArgumentParser()
    worker.add_arguments(parser)
    args = parser.parse_args(command[command.index("worker") + 1 :])
    assert config_from_args(args).parallel == parallel
