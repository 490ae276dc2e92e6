"""USP correctness on real multi-process gloo: each layout's transformer forward and full denoising run (the stock
diffusers MochiPipeline driving the parallelized model) against a single-process run of the stock model."""

from __future__ import annotations

import pytest
import torch

from batchgen.parallel.attention import attention_with_lse, list_kernels, merge_partial
from tests import _usp_cases as cases
from tests._dist import run_world

TOLERANCE = 1e-4

_references: dict[tuple, dict[str, torch.Tensor]] = {}


def reference(item_seed: int, shape: dict | None = None, empty_negative: bool = False) -> dict[str, torch.Tensor]:
    key = (item_seed, tuple(sorted((shape or cases.SHAPE).items())), empty_negative)
    if key not in _references:
        _references[key] = cases.reference(item_seed, shape, empty_negative)
    return _references[key]


def visual_tokens(shape: dict) -> int:
    return ((shape["num_frames"] - 1) // 6 + 1) * (shape["height"] // 16) * (shape["width"] // 16)


def assert_matches_reference(results, shape, empty_negative=False):
    for r in results:
        ref = reference(r["item_seed"], shape, empty_negative)
        assert r["forward"].shape == ref["forward"].shape
        forward_diff = (r["forward"] - ref["forward"]).abs().max().item()
        latents_diff = (r["latents"] - ref["latents"]).abs().max().item()
        assert forward_diff <= TOLERANCE, f"rank {r['rank']}: transformer forward differs by {forward_diff}"
        assert latents_diff <= TOLERANCE, f"rank {r['rank']}: final latents differ by {latents_diff}"


LAYOUTS = [
    # (name, world size, degrees, backend)
    ("ulysses2", 2, {"ulysses": 2}, "native"),
    ("ring2", 2, {"ring": 2}, "native"),
    ("ulysses2xring2", 4, {"ulysses": 2, "ring": 2}, "native"),
    ("cfg2", 2, {"cfg": 2}, "native"),
    ("cfg2xulysses2", 4, {"cfg": 2, "ulysses": 2}, "native"),
    ("dp2xulysses2", 4, {"ulysses": 2}, "native"),
]


@pytest.mark.parametrize("name,world,degrees,backend", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_parallel_layout_matches_single_process(name, world, degrees, backend):
    results = run_world(world, cases.parallel_case, degrees, backend)
    dp = results[0]["topology"]["dp"]
    assert dp == world // max(1, degrees.get("cfg", 1) * degrees.get("ulysses", 1) * degrees.get("ring", 1))
    assert sum(r["is_writer"] for r in results) == dp, "exactly one writer per data-parallel group"
    seeds = {r["item_seed"] for r in results}
    assert len(seeds) == dp, "each data-parallel group works on its own item"
    for r in results:
        ref = reference(r["item_seed"])
        assert r["forward"].shape == ref["forward"].shape
        forward_diff = (r["forward"] - ref["forward"]).abs().max().item()
        latents_diff = (r["latents"] - ref["latents"]).abs().max().item()
        assert forward_diff <= TOLERANCE, f"rank {r['rank']}: transformer forward differs by {forward_diff}"
        assert latents_diff <= TOLERANCE, f"rank {r['rank']}: final latents differ by {latents_diff}"
    if dp == 2:
        a, b = (reference(s)["latents"] for s in sorted(seeds))
        assert (a - b).abs().max() > 0.1, "the two groups' items must differ for this case to mean anything"


PADDED_LAYOUTS = [
    ("ulysses2", 2, {"ulysses": 2}),
    ("ulysses4", 4, {"ulysses": 4}),
    ("ring3", 3, {"ring": 3}),
    ("ulysses2xring2", 4, {"ulysses": 2, "ring": 2}),
]


@pytest.mark.parametrize("name,world,degrees", PADDED_LAYOUTS, ids=[c[0] for c in PADDED_LAYOUTS])
def test_padded_layout_matches_single_process(name, world, degrees):
    # 175 visual tokens on 2, 3 or 4 sequence-parallel ranks: padded to 176 or 177, the padding dropped after.
    assert visual_tokens(cases.ODD_SHAPE) % world, "the degree must not divide the token count"
    results = run_world(world, cases.parallel_case, degrees, "native", "auto", cases.ODD_SHAPE)
    assert_matches_reference(results, cases.ODD_SHAPE)


def test_ring4_with_a_chunk_of_padding_alone_and_an_empty_negative_prompt():
    # 9 tokens in chunks of 3: rank 3 holds padding only (its keys are skipped by everyone), and the negative
    # prompt has no valid text token, so its text attention has no key at all in one block.
    results = run_world(4, cases.parallel_case, {"ring": 4}, "native", "auto", cases.NINE_TOKENS, True)
    assert_matches_reference(results, cases.NINE_TOKENS, empty_negative=True)


def test_ring4_with_math_kernel_matches_single_process():
    # Ring of 4 exercises the multi-hop K/V passing; the math kernel is the portable reference path.
    results = run_world(4, cases.parallel_case, {"ring": 4}, "native", "math")
    ref = reference(results[0]["item_seed"])
    for r in results:
        assert (r["latents"] - ref["latents"]).abs().max().item() <= TOLERANCE


def test_context_broadcast_agreement_and_writers():
    results = run_world(4, cases.context_case)
    assert [r["agreed"] for r in results] == [{"items": ["item-0"]}] * 4
    assert all(r["all_ok"] for r in results)
    assert not any(r["one_failed"] for r in results)
    # ulysses 2 on 4 ranks: two data-parallel groups (ranks 0-1, 2-3), writers 0 and 2.
    assert [(r["dp_rank"], r["dp_size"], r["is_writer"]) for r in results] == [
        (0, 2, True),
        (0, 2, False),
        (1, 2, True),
        (1, 2, False),
    ]


def test_failed_rank_is_named_without_hanging():
    # run_world stops at the first failed rank (the other may wait in a collective); a hang would end in its
    # TimeoutError instead, which this does not match.
    with pytest.raises(AssertionError, match="rank 1 of 2 failed"):
        run_world(2, cases.context_case, 1, timeout_s=600)


# Local attention kernels and the LSE merge (single process).


@pytest.mark.parametrize("kernel", list_kernels("cpu"))
def test_kernels_match_softmax_attention(kernel):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen) for n in (70, 90, 90))
    out, lse = attention_with_lse(q, k, v, kernel=kernel)
    scores = q @ k.transpose(-1, -2) / 4.0
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


def test_math_kernel_chunks_queries(monkeypatch):
    from batchgen.parallel import attention

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for n in (50, 33, 33))
    whole = attention_with_lse(q, k, v, kernel="math")
    monkeypatch.setattr(attention, "MATH_CHUNK", 7)
    chunked = attention_with_lse(q, k, v, kernel="math")
    torch.testing.assert_close(whole, chunked)


def test_merge_of_disjoint_key_blocks_equals_full_attention():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for n in (10, 30, 30))
    full, full_lse = attention_with_lse(q, k, v, kernel="math")
    acc = lse = None
    for block in (slice(0, 7), slice(7, 20), slice(20, 30)):
        acc, lse = merge_partial(acc, lse, *attention_with_lse(q, k[:, :, block], v[:, :, block], kernel="math"))
    torch.testing.assert_close(acc, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", list_kernels("cpu", masked=True))
def test_masked_keys_shift_neither_output_nor_lse_and_an_empty_block_weighs_nothing(kernel):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, 8, generator=gen) for n in (10, 30, 30))
    junk = 50 * torch.randn(2, 2, 6, 8, generator=gen)  # large keys: any leak would dominate the softmax
    key_mask = torch.ones(2, 36, dtype=torch.bool)
    key_mask[:, 30:] = False
    padded = attention_with_lse(
        q, torch.cat([k, junk], dim=2), torch.cat([v, junk], dim=2), key_mask=key_mask, kernel=kernel
    )
    exact = attention_with_lse(q, k, v, kernel="math")
    torch.testing.assert_close(padded, exact, atol=1e-5, rtol=1e-5)
    # A block with no valid key (a sample's empty prompt): out 0, lse -inf, and merging it changes nothing.
    nothing = torch.zeros(2, 6, dtype=torch.bool)
    empty_out, empty_lse = attention_with_lse(q, junk, junk, key_mask=nothing, kernel=kernel)
    assert empty_out.abs().max() == 0 and torch.isneginf(empty_lse).all()
    for first, second in ((exact, (empty_out, empty_lse)), ((empty_out, empty_lse), exact)):
        merged = merge_partial(*first, *second)
        torch.testing.assert_close(merged, (exact[0].float(), exact[1]), atol=1e-6, rtol=1e-6)
