"""Functions that run inside the gloo worker processes of the USP tests, and the single-process references.

Module level (picklable by reference) and importable by the forkserver children.
"""

from __future__ import annotations

from typing import Any

import torch

# The tiny Mochi's transformer shape (batchgen/generate/tiny.py): 4 heads x 16, 2 blocks, text width 32.
TINY_TRANSFORMER = {
    "patch_size": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_layers": 2,
    "pooled_projection_dim": 32,
    "in_channels": 12,
    "qk_norm": "rms_norm",
    "text_embed_dim": 32,
    "time_embed_dim": 32,
    "activation_fn": "swiglu",
    "max_sequence_length": 256,
}
TEXT_LEN = 16
# 13 frames at 64x96: T = 3 latent frames of 4 x 6 patches = 72 visual tokens (divisible by 1, 2, 3, 4, 6, 8),
# and a non-square frame so a height/width mix-up in the RoPE slice cannot go unnoticed.
SHAPE = {"num_frames": 13, "height": 64, "width": 96}
# 25 frames at 80x112: T = 5 latent frames of 5 x 7 patches = 175 visual tokens, which 2, 3 and 4 do not divide:
# every sequence-parallel layout pads it.
ODD_SHAPE = {"num_frames": 25, "height": 80, "width": 112}
# 1 frame at 48x48: 9 visual tokens; ring 4 makes chunks of 3 and the last rank's chunk is padding alone.
NINE_TOKENS = {"num_frames": 1, "height": 48, "width": 48}
STEPS = 3
GUIDANCE = 4.5


def tiny_transformer(seed: int = 0):
    """Deterministic random weights (no zero-initialised tensors: RoPE, adaLN gates and output all matter)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    model = MochiTransformer3DModel(**TINY_TRANSFORMER)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            values = torch.randn(param.shape, generator=gen)
            if param.ndim > 1:
                values = values / param[0].numel() ** 0.5  # fan-in scaled: activations stay O(1)
            elif "norm" in name and name.endswith("weight"):
                values = 1.0 + 0.1 * values
            else:
                values = 0.02 * values
            param.copy_(values)
        model.pos_frequencies.copy_(torch.rand(model.pos_frequencies.shape, generator=gen) * 0.5)
    return model.eval()


def prompt_tensors(item_seed: int, empty_negative: bool = False) -> dict[str, torch.Tensor]:
    """Random T5-like embeddings; cond and uncond have different valid lengths so padding removal matters.
    ``empty_negative``: the negative prompt has no valid token (Genmo's zeros for an empty prompt)."""
    gen = torch.Generator().manual_seed(1000 + item_seed)
    cond_valid, uncond_valid = 5 + item_seed % 7, 0 if empty_negative else 2 + item_seed % 3

    def one(valid: int):
        embeds = torch.randn(1, TEXT_LEN, TINY_TRANSFORMER["text_embed_dim"], generator=gen)
        mask = torch.zeros(1, TEXT_LEN, dtype=torch.long)
        mask[:, :valid] = 1
        return embeds * mask.unsqueeze(-1), mask

    prompt_embeds, prompt_mask = one(cond_valid)
    negative_embeds, negative_mask = one(uncond_valid)
    return {
        "prompt_embeds": prompt_embeds,
        "prompt_attention_mask": prompt_mask,
        "negative_prompt_embeds": negative_embeds,
        "negative_prompt_attention_mask": negative_mask,
    }


def forward_inputs(item_seed: int, shape: dict | None = None, empty_negative: bool = False) -> dict[str, torch.Tensor]:
    """One CFG batch [uncond, cond] as MochiPipeline builds it."""
    shape = shape or SHAPE
    p = prompt_tensors(item_seed, empty_negative)
    gen = torch.Generator().manual_seed(item_seed)
    frames = (shape["num_frames"] - 1) // 6 + 1
    latent = torch.randn(1, 12, frames, shape["height"] // 8, shape["width"] // 8, generator=gen)
    return {
        "hidden_states": torch.cat([latent, latent]),
        "encoder_hidden_states": torch.cat([p["negative_prompt_embeds"], p["prompt_embeds"]]),
        "timestep": torch.tensor([700.0, 700.0]),
        "encoder_attention_mask": torch.cat([p["negative_prompt_attention_mask"], p["prompt_attention_mask"]]),
    }


def denoise(transformer, item_seed: int, shape: dict | None = None, empty_negative: bool = False) -> torch.Tensor:
    """The stock diffusers MochiPipeline, latents out (no VAE, no T5: embeddings given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    pipe = MochiPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        **prompt_tensors(item_seed, empty_negative),
        **(shape or SHAPE),
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(item_seed),
        output_type="latent",
    ).frames


def reference(item_seed: int, shape: dict | None = None, empty_negative: bool = False) -> dict[str, torch.Tensor]:
    """Single process, stock model: the transformer forward on one CFG batch and a full denoising run."""
    transformer = tiny_transformer()
    with torch.no_grad():
        forward = transformer(**forward_inputs(item_seed, shape, empty_negative), return_dict=False)[0]
    return {"forward": forward, "latents": denoise(transformer, item_seed, shape, empty_negative)}


def parallel_case(
    degrees: dict[str, int],
    backend: str = "native",
    kernel: str = "auto",
    shape: dict | None = None,
    empty_negative: bool = False,
) -> dict[str, Any]:
    """On every rank: the parallel transformer forward and the full denoising run of this dp group's item."""
    from batchgen.parallel.apply import parallelize_transformer
    from tests._dist import rank_context

    context = rank_context(degrees, TINY_TRANSFORMER["num_attention_heads"], backend)
    item_seed = 11 + context.dp_rank  # data-parallel groups work on different items
    transformer = parallelize_transformer(tiny_transformer(), context, kernel=kernel)
    with torch.no_grad():
        forward = transformer(**forward_inputs(item_seed, shape, empty_negative), return_dict=False)[0]
    latents = denoise(transformer, item_seed, shape, empty_negative)
    return {
        "rank": context.rank,
        "dp_rank": context.dp_rank,
        "is_writer": context.is_writer,
        "topology": context.topology.to_dict(),
        "item_seed": item_seed,
        "forward": forward,
        "latents": latents,
    }


def context_case(fail_rank: int | None = None) -> dict[str, Any]:
    """ProcessContext semantics over a real process group."""
    from batchgen.core.config import ParallelConfig
    from batchgen.parallel.runtime import TorchContext
    from tests._dist import INIT_TIMEOUT_S

    context = TorchContext.from_env(ParallelConfig(ulysses_degree=2), num_heads=4, timeout_s=INIT_TIMEOUT_S)
    if fail_rank == context.rank:
        raise RuntimeError(f"injected failure on rank {context.rank}")
    agreed = context.broadcast({"items": [f"item-{context.rank}"]})
    all_ok = context.all_true(True)
    one_failed = context.all_true(context.rank != 1)
    context.barrier()
    return {
        "rank": context.rank,
        "dp_rank": context.dp_rank,
        "dp_size": context.dp_size,
        "is_writer": context.is_writer,
        "agreed": agreed,
        "all_ok": all_ok,
        "one_failed": one_failed,
    }


def rank_preferring_timer(rank: int):
    """A made-up timer on which rank 0 finds 'per-prompt/cpu_flash' fastest and every other rank
    'joint/cpu_flash': each candidate still runs once (it must work); only its time is invented."""
    preferred = "per-prompt/cpu_flash" if rank == 0 else "joint/cpu_flash"

    def timer(name: str, call) -> float:
        call()
        return 0.001 if name == preferred else 0.002 + 0.0001 * len(name)

    return timer


def choice_case(degrees: dict[str, int], shape: dict) -> dict[str, Any]:
    """On every rank: 'auto' attention measured with ``rank_preferring_timer``; the decision each rank ends with
    (``attention_facts``) and the forward."""
    from batchgen.parallel.apply import attention_facts, parallelize_transformer
    from tests._dist import rank_context

    context = rank_context(degrees, TINY_TRANSFORMER["num_attention_heads"])
    timer = rank_preferring_timer(context.rank)
    transformer = parallelize_transformer(tiny_transformer(), context, attention="auto", timer=timer)
    with torch.no_grad():
        forward = transformer(**forward_inputs(11, shape), return_dict=False)[0]
    return {"rank": context.rank, "facts": attention_facts(transformer), "forward": forward}
