"""One attention call per block for the whole CFG batch, without host syncs: the one-process joint processor and
the native USP processor (at degree 1, no process group needed) against diffusers' ``MochiAttnProcessor2_0`` in
fp32 on CPU, including empty prompts, and the once-per-item gathering of valid text tokens."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from batchgen.models.mochi.joint import MochiJointAttnProcessor, gather_valid_text
from batchgen.parallel import attention
from batchgen.parallel.usp import Axis, USPMochiAttnProcessor
from tests import _usp_cases as cases

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
    "joint": lambda kernel: MochiJointAttnProcessor(kernel=kernel),
    "usp-degree-1": lambda kernel: USPMochiAttnProcessor(SINGLE, SINGLE, kernel=kernel),
}
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


def kernel_calls_and_syncs(monkeypatch, processor, batch: list[int]) -> tuple[int, set[str]]:
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
    return len(calls), set(recorder.names) & HOST_SYNCS


@pytest.mark.parametrize("processor", PROCESSORS.keys())
def test_cfg_batch_runs_as_one_call_per_block_without_host_syncs(monkeypatch, processor):
    one_prompt, one_syncs = kernel_calls_and_syncs(monkeypatch, PROCESSORS[processor]("auto"), [5])
    cfg_pair, cfg_syncs = kernel_calls_and_syncs(monkeypatch, PROCESSORS[processor]("auto"), [0, 9])
    assert one_syncs == set() and cfg_syncs == set()
    # The pair costs no more calls than one prompt: joint 1 per block; USP 3 per block (visual with text, text
    # with visual, text with text), whatever the batch.
    assert cfg_pair == one_prompt == {"joint": 2, "usp-degree-1": 6}[processor]


def test_stock_processor_syncs_per_sample(monkeypatch):
    # What the processors above replace: diffusers' processor runs a nonzero per sample and block.
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    _, syncs = kernel_calls_and_syncs(monkeypatch, MochiAttnProcessor2_0(), [0, 9])
    assert "nonzero" in syncs


def test_masked_probe_drops_a_kernel_that_ignores_its_mask(monkeypatch):
    # pytorch/pytorch#177842: cuDNN once ignored custom masks. A kernel that does is dropped, not trusted.
    monkeypatch.setitem(attention._KERNELS, "cpu_flash", lambda q, k, v, key_mask=None: attention._cpu_flash(q, k, v))
    monkeypatch.setattr(attention, "_probe_cache", {})
    assert attention.list_kernels("cpu", masked=True) == ["math"]
    assert attention.list_kernels("cpu") == ["cpu_flash", "math"]
