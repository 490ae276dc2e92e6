"""One attention call per block for the whole CFG batch, without host syncs: the one-process joint processor and
the native USP processor (at degree 1, no process group needed) against diffusers' ``MochiAttnProcessor2_0`` in
fp32 on CPU, including empty prompts, and the once-per-item gathering of valid text tokens. Every candidate of
``[parallel] attention`` (joint and per-prompt, under every kernel) equals diffusers; the measured choice is
driven by an injected timer, on one process and on two gloo ranks that measure differently."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from batchgen.models.mochi.attention import USPMochiAttnProcessor
from batchgen.models.mochi.joint import MochiJointAttnProcessor, gather_valid_text
from batchgen.parallel import attention
from batchgen.parallel.choice import AttentionChooser, candidates, timed_candidates
from batchgen.parallel.usp import Axis
from tests import _usp_cases as cases
from tests._dist import run_world

TOLERANCE = 1e-5
SINGLE = Axis(group=None, size=1, rank=0, ranks=(0,))
# Tensor operations that wait for the device (or read a value on the host): none may run inside a block.
HOST_SYNCS = {"nonzero", "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}


@pytest.fixture(scope="module")
def block():
    return cases.tiny_transformer().transformer_blocks[0]


def attention_inputs(block, valid: list[int], text_len: int = 16, visual: int = 72, seed: int = 0):
    """Normed visual and text streams of a batch whose samples have ``valid`` text tokens each (a prefix, as T5's
    right padding gives), and RoPE for the visual tokens."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(valid)
    heads, head_dim = block.attn1.heads, block.attn1.to_q.out_features // block.attn1.heads
    hidden = torch.randn(batch, visual, block.attn1.to_q.in_features, generator=gen)
    text = torch.randn(batch, text_len, block.attn1.add_q_proj.in_features, generator=gen)
    mask = torch.arange(text_len).unsqueeze(0) < torch.tensor(valid).unsqueeze(1)
    angles = torch.rand(visual, heads, head_dim // 2, generator=gen) * 6.0
    return hidden, text, mask.long(), (angles.cos(), angles.sin())


def stock(block, hidden, text, mask, rope):
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    return MochiAttnProcessor2_0()(block.attn1, hidden, text, mask, rope)


PROCESSORS = {
    "joint": lambda kernel, chooser=None: MochiJointAttnProcessor(kernel=kernel, chooser=chooser),
    "usp-degree-1": lambda kernel, chooser=None: USPMochiAttnProcessor(SINGLE, SINGLE, kernel=kernel, chooser=chooser),
}
HEAD_DIM = cases.TINY_TRANSFORMER["attention_head_dim"]
CANDIDATES = candidates(torch.device("cpu"), torch.float32, HEAD_DIM)
TIMED = timed_candidates(torch.device("cpu"), torch.float32, HEAD_DIM)
BATCHES = {
    "cfg-different-lengths": [3, 11],
    "cfg-empty-negative": [0, 7],
    "all-empty": [0, 0],
    "one-full-prompt": [16],
}


@pytest.mark.parametrize("kernel", attention.list_kernels("cpu", masked=True))
@pytest.mark.parametrize("batch", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("processor", PROCESSORS.keys())
def test_processor_matches_diffusers(block, processor, batch, kernel):
    hidden, text, mask, rope = attention_inputs(block, batch)
    with torch.no_grad():
        expected_visual, expected_text = stock(block, hidden, text, mask, rope)
        visual, text_out = PROCESSORS[processor](kernel)(block.attn1, hidden, text, mask, rope)
    torch.testing.assert_close(visual, expected_visual, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(text_out, expected_text, atol=TOLERANCE, rtol=TOLERANCE)
    assert expected_visual.abs().max() > 0.1


@pytest.mark.parametrize("candidate", CANDIDATES, ids=[c.name for c in CANDIDATES])
@pytest.mark.parametrize("batch", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("processor", PROCESSORS.keys())
def test_every_attention_candidate_matches_diffusers(block, processor, batch, candidate):
    hidden, text, mask, rope = attention_inputs(block, batch)
    chooser = AttentionChooser(candidate.path, kernel=candidate.kernel)
    with torch.no_grad():
        expected_visual, expected_text = stock(block, hidden, text, mask, rope)
        visual, text_out = PROCESSORS[processor]("auto", chooser)(block.attn1, hidden, text, mask.bool(), rope)
    torch.testing.assert_close(visual, expected_visual, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(text_out, expected_text, atol=TOLERANCE, rtol=TOLERANCE)
    assert (chooser.last["path"], chooser.last["kernel"]) == (candidate.path, candidate.kernel)


@pytest.mark.parametrize("path", ["joint", "per-prompt"])
def test_valid_tokens_with_holes_give_diffusers_visual_output_on_both_paths(block, path):
    # Without gather_valid_text the per-prompt path gathers each prompt's keys by index instead of a slice.
    hidden, text, _, rope = attention_inputs(block, [0, 0])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 4, 9]] = True
    mask[1, [0, 2, 3, 5, 8, 15]] = True
    with torch.no_grad():
        expected_visual, _ = stock(block, hidden, text, mask.long(), rope)
        visual, _ = MochiJointAttnProcessor(chooser=AttentionChooser(path))(block.attn1, hidden, text, mask, rope)
    torch.testing.assert_close(visual, expected_visual, atol=TOLERANCE, rtol=TOLERANCE)


def test_candidates_are_both_paths_under_every_working_kernel():
    names = [c.name for c in CANDIDATES]
    assert names == [f"joint/{k}" for k in attention.list_kernels("cpu", torch.float32, HEAD_DIM, masked=True)] + [
        f"per-prompt/{k}" for k in attention.list_kernels("cpu", torch.float32, HEAD_DIM)
    ]
    assert {"joint/math", "per-prompt/math", "per-prompt/cpu_flash"} <= set(names)
    # 'auto' does not time the math fallback where a fused kernel serves the path.
    assert [c.name for c in TIMED] == [n for n in names if not n.endswith("/math")]


def test_auto_measures_each_shape_once_and_takes_the_fastest(block):
    measured: list[str] = []

    def timer(name, call):
        measured.append(name)
        call()
        return {"per-prompt/cpu_flash": 0.001}.get(name, 0.003)

    chooser = AttentionChooser("auto", timer=timer)
    processor = MochiJointAttnProcessor(chooser=chooser)
    with torch.no_grad():
        for visual in (72, 72, 48):
            hidden, text, mask, rope = attention_inputs(block, [3, 11], visual=visual)
            processor(block.attn1, hidden, text, mask.bool(), rope)
    # Two shapes, each candidate timed once per shape; the second call of the first shape measured nothing.
    assert measured == [c.name for c in TIMED] * 2
    facts = chooser.facts()
    assert (facts["setting"], facts["path"], facts["kernel"], facts["measured"]) == (
        "auto", "per-prompt", "cpu_flash", True,
    )  # fmt: skip
    assert facts["timings_ms"] == {c.name: (1.0 if c.name == "per-prompt/cpu_flash" else 3.0) for c in TIMED}
    assert facts["measure_s"] >= 0


def test_auto_without_a_timer_takes_the_joint_call_on_cpu(block):
    chooser = AttentionChooser("auto")
    hidden, text, mask, rope = attention_inputs(block, [3, 11])
    with torch.no_grad():
        MochiJointAttnProcessor(chooser=chooser)(block.attn1, hidden, text, mask.bool(), rope)
    best_masked = attention.list_kernels("cpu", torch.float32, HEAD_DIM, masked=True)[0]
    assert chooser.facts() == {"setting": "auto", "path": "joint", "kernel": best_masked, "measured": False}


CHOICE_LAYOUTS = [("cfg2", {"cfg": 2}, cases.SHAPE), ("ring2-padded", {"ring": 2}, cases.ODD_SHAPE)]


@pytest.mark.parametrize("name,degrees,shape", CHOICE_LAYOUTS, ids=[c[0] for c in CHOICE_LAYOUTS])
def test_ranks_that_measure_differently_all_take_rank_0s_choice(name, degrees, shape):
    # Rank 0's timer finds per-prompt/cpu_flash fastest, rank 1's joint/cpu_flash: both end with rank 0's choice and timings,
    # and the forward still equals the stock model's.
    results = run_world(2, cases.choice_case, degrees, shape)
    rank0_timer = cases.rank_preferring_timer(0)
    expected = {c.name: round(rank0_timer(c.name, lambda: None) * 1000, 4) for c in TIMED}
    for r in results:
        facts = r["facts"]
        assert (facts["path"], facts["kernel"], facts["measured"]) == ("per-prompt", "cpu_flash", True), r["rank"]
        assert facts["timings_ms"] == expected
    with torch.no_grad():
        reference = cases.tiny_transformer()(**cases.forward_inputs(11, shape), return_dict=False)[0]
    for r in results:
        torch.testing.assert_close(r["forward"], reference, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("processor", PROCESSORS.keys())
def test_valid_tokens_anywhere_gathered_once_equal_diffusers(block, processor):
    # diffusers compacts each sample's valid tokens to the front of its text output; gather_valid_text does the
    # same once per item, after which one masked call gives the same rows.
    hidden, text, _, rope = attention_inputs(block, [0, 0])
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0, [1, 4, 9]] = 1
    mask[1, [0, 2, 3, 5, 8, 15]] = 1
    gathered, gathered_mask = gather_valid_text(text, mask)
    assert gathered.shape == (2, 6, text.shape[-1]) and gathered_mask.sum(1).tolist() == [3, 6]
    with torch.no_grad():
        expected_visual, expected_text = stock(block, hidden, text, mask, rope)
        visual, text_out = PROCESSORS[processor]("auto")(block.attn1, hidden, gathered, gathered_mask, rope)
    torch.testing.assert_close(visual, expected_visual, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(text_out, expected_text[:, :6], atol=TOLERANCE, rtol=TOLERANCE)
    # Beyond them diffusers holds the output projection of zero rows, the same for every padded slot.
    assert (expected_text[:, 6:] - expected_text[:, 6:7]).abs().max() == 0


def test_gather_valid_text_keeps_order_and_one_slot_for_empty_prompts():
    embeds = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)
    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]])
    gathered, gathered_mask = gather_valid_text(embeds, mask)
    assert gathered[..., 0].tolist() == [[1.0, 3.0, 4.0], [5.0, 6.0, 7.0]]
    assert gathered_mask.tolist() == [[True, True, True], [True, False, False]]
    empty, empty_mask = gather_valid_text(embeds, torch.zeros(2, 5))
    assert empty.shape == (2, 1, 1) and not empty_mask.any()


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def kernel_calls_and_syncs(monkeypatch, processor, batch: list[int]) -> tuple[int, list[str]]:
    """Attention kernel calls and host-sync operations of one tiny-transformer forward (2 blocks)."""
    # The kernel probes read their checks on the host, once per process and kernel: done before counting.
    head_dim = cases.TINY_TRANSFORMER["attention_head_dim"]
    attention.list_kernels("cpu", torch.float32, head_dim, masked=True)
    attention.list_kernels("cpu", torch.float32, head_dim)
    calls = []
    for name, fn in list(attention._KERNELS.items()):
        monkeypatch.setitem(attention._KERNELS, name, lambda *a, _fn=fn: calls.append(1) or _fn(*a))
    model = cases.tiny_transformer()
    recorder = _Recorder()

    def recorded(attn, *args, **kwargs):
        with recorder:
            return processor(attn, *args, **kwargs)

    for b in model.transformer_blocks:
        b.attn1.processor = recorded
    inputs = cases.forward_inputs(3)
    mask = torch.arange(cases.TEXT_LEN).unsqueeze(0) < torch.tensor(batch).unsqueeze(1)
    inputs.update(
        hidden_states=inputs["hidden_states"][: len(batch)],
        timestep=inputs["timestep"][: len(batch)],
        encoder_hidden_states=inputs["encoder_hidden_states"][: len(batch)],
        encoder_attention_mask=mask,
    )
    with torch.no_grad():
        model(**inputs)
    return len(calls), [name for name in recorder.names if name in HOST_SYNCS]


@pytest.mark.parametrize("processor", PROCESSORS.keys())
def test_cfg_batch_runs_as_one_call_per_block_without_host_syncs(monkeypatch, processor):
    one_prompt, one_syncs = kernel_calls_and_syncs(monkeypatch, PROCESSORS[processor]("auto"), [5])
    cfg_pair, cfg_syncs = kernel_calls_and_syncs(monkeypatch, PROCESSORS[processor]("auto"), [0, 9])
    assert one_syncs == [] and cfg_syncs == []
    # The pair costs no more calls than one prompt: joint 1 per block; USP 3 per block (visual with text, text
    # with visual, text with text), whatever the batch.
    assert cfg_pair == one_prompt == {"joint": 2, "usp-degree-1": 6}[processor]


def test_stock_processor_syncs_per_sample(monkeypatch):
    # What the processors above replace: diffusers' processor runs a nonzero per sample and block.
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    _, syncs = kernel_calls_and_syncs(monkeypatch, MochiAttnProcessor2_0(), [0, 9])
    assert syncs.count("nonzero") == 4  # 2 samples x 2 blocks


def test_per_prompt_path_reads_the_text_mask_once_per_forward(monkeypatch):
    # One unmasked call per prompt and block; the mask (the same tensor in every block) is read on the host once.
    processor = MochiJointAttnProcessor(chooser=AttentionChooser("per-prompt"))
    calls, syncs = kernel_calls_and_syncs(monkeypatch, processor, [0, 9])
    assert calls == 2 * 2
    # One copy to the host for both blocks; the scalar reads after it are on that host copy.
    assert syncs.count("cpu") == 1 and set(syncs) <= {"cpu", "__int__", "__bool__"}


def test_masked_probe_drops_a_kernel_that_ignores_its_mask(monkeypatch):
    # pytorch/pytorch#177842: cuDNN once ignored custom masks. A kernel that does is dropped, not trusted.
    monkeypatch.setitem(attention._KERNELS, "cpu_flash", lambda q, k, v, key_mask=None: attention._cpu_flash(q, k, v))
    monkeypatch.setattr(attention, "_probe_cache", {})
    assert attention.list_kernels("cpu", masked=True) == ["math"]
    assert attention.list_kernels("cpu") == ["cpu_flash", "math"]
