"""Functions that run inside the gloo worker processes of the Wan USP tests, and the single-process references.

Module level (picklable by reference) and importable by the forkserver children.
"""

from __future__ import annotations

from math import nan
from typing import Any

import torch

# A tiny WanTransformer3DModel: 4 heads x 16 (RoPE splits the head dim 8 / 4 / 4 over frame / height / width),
# 2 blocks, text width 32, 4 latent channels.
TINY_TRANSFORMER = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 64,
}
TEXT_LEN = 12
# Latent shapes [frames, height, width]. 3 x 8 x 12 -> 3 x 4 x 6 = 72 tokens (divisible by 2 and 4), a non-square
# frame so a height/width mix-up in the RoPE slice cannot go unnoticed.
LATENT = (3, 8, 12)
# 5 x 10 x 14 -> 5 x 5 x 7 = 175 tokens: every layout with 2 or 4 sequence-parallel ranks pads it.
ODD_LATENT = (5, 10, 14)
# A full WanPipeline run: 9 frames at 64x96 -> the 72-token latent above; 17 frames at 80x112 -> 175 tokens.
VIDEO = {"num_frames": 9, "height": 64, "width": 96}
ODD_VIDEO = {"num_frames": 17, "height": 80, "width": 112}
STEPS = 4
GUIDANCE = 5.0
CACHE_STEPS = 8
# Wan 2.2 A14B's switch: the first expert while t >= 0.875 x 1000, the second after.
BOUNDARY_RATIO = 0.875


def tiny_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    from batchgen.models.common.tiny import randomize_parameters

    model = WanTransformer3DModel(**TINY_TRANSFORMER)
    randomize_parameters(model, torch.Generator().manual_seed(seed))
    return model.eval()


def prompt_embeds(item_seed: int) -> dict[str, torch.Tensor]:
    """UMT5-like embeddings as WanPipeline passes them: valid tokens first, zeros after (no mask)."""
    gen = torch.Generator().manual_seed(1000 + item_seed)

    def one(valid: int) -> torch.Tensor:
        embeds = torch.randn(1, TEXT_LEN, TINY_TRANSFORMER["text_dim"], generator=gen)
        embeds[:, valid:] = 0
        return embeds

    return {"prompt_embeds": one(5 + item_seed % 7), "negative_prompt_embeds": one(2 + item_seed % 3)}


def forward_inputs(item_seed: int, latent: tuple[int, int, int], per_token_timestep: bool = False):
    """One CFG batch [uncond, cond] (one latent, both prompts). ``per_token_timestep``: Wan 2.2 TI2V's [B, N]
    timesteps (the first latent frame clean at 0, the rest at 700), which the blocks see per token."""
    p = prompt_embeds(item_seed)
    gen = torch.Generator().manual_seed(item_seed)
    frames, height, width = latent
    sample = torch.randn(1, TINY_TRANSFORMER["in_channels"], frames, height, width, generator=gen)
    timestep = torch.tensor([700.0, 700.0])
    if per_token_timestep:
        per_frame = (height // 2) * (width // 2)
        timestep = torch.full((2, frames * per_frame), 700.0)
        timestep[:, :per_frame] = 0.0
    return {
        "hidden_states": torch.cat([sample, sample]),
        "timestep": timestep,
        "encoder_hidden_states": torch.cat([p["negative_prompt_embeds"], p["prompt_embeds"]]),
    }


def forwards(transformer, item_seed: int, inputs: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [transformer(**forward_inputs(item_seed, **case), return_dict=False)[0] for case in inputs]


def denoise(
    high_noise, low_noise, item_seed: int, video: dict | None = None, guidance: float = GUIDANCE, steps: int = STEPS
) -> tuple[torch.Tensor, list[int]]:
    """The stock diffusers WanPipeline with two experts switched at BOUNDARY_RATIO (Wan 2.2 A14B's layout), latents
    out (no VAE, no UMT5: embeddings given); and how many transformer calls each expert served."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    calls = [0, 0]

    def counter(index: int):
        def hook(module, args, kwargs):
            calls[index] += 1

        return hook

    handles = [m.register_forward_pre_hook(counter(i), with_kwargs=True) for i, m in enumerate((high_noise, low_noise))]
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=scheduler,
        transformer=high_noise,
        transformer_2=low_noise,
        boundary_ratio=BOUNDARY_RATIO,
    )
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        **prompt_embeds(item_seed),
        **(video or VIDEO),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(item_seed),
        output_type="latent",
    ).frames
    for handle in handles:
        handle.remove()
    return latents, calls


def reference(item_seed: int, inputs: list[dict], pipeline: bool) -> dict[str, Any]:
    """Single process, stock models: the transformer forwards and (``pipeline``) a two-expert denoising run."""
    high_noise = tiny_transformer(0)
    result: dict[str, Any] = {"forwards": forwards(high_noise, item_seed, inputs)}
    if pipeline:
        result["latents"], result["calls"] = denoise(high_noise, tiny_transformer(1), item_seed)
    return result


def parallel_case(degrees: dict[str, int], inputs: list[dict], pipeline: bool, backend: str = "native") -> dict:
    """On every rank: the parallelized transformer's forwards and (``pipeline``) the two-expert denoising run,
    each expert parallelized by its own call."""
    from batchgen.models import WAN
    from batchgen.parallel.apply import parallelize_transformer
    from batchgen.parallel.usp import COMM_STATS
    from tests._dist import rank_context

    context = rank_context(degrees, TINY_TRANSFORMER["num_attention_heads"], backend)
    item_seed = 11 + context.dp_rank
    high_noise = parallelize_transformer(tiny_transformer(0), context, plan=WAN.parallel_plan)
    COMM_STATS.reset()
    result: dict[str, Any] = {"rank": context.rank, "item_seed": item_seed}
    result["forwards"] = forwards(high_noise, item_seed, inputs)
    result["comm"] = dict(COMM_STATS.bytes)
    if pipeline:
        low_noise = parallelize_transformer(tiny_transformer(1), context, plan=WAN.parallel_plan)
        result["latents"], result["calls"] = denoise(high_noise, low_noise, item_seed)
    return result


def cached_denoise(item_seed: int, threshold: float, context=None) -> dict[str, Any]:
    """A two-expert WanPipeline run over ODD_VIDEO (padded under sequence parallelism) with a first-block cache on
    each expert, guidance 1 (one transformer call per step, so consecutive calls are consecutive steps). With a
    ``context`` the experts are parallelized and the caches agree over its sp and cfg groups."""
    from batchgen.models import WAN
    from batchgen.models.common.cache import FirstBlockCache, group_axes
    from batchgen.parallel.apply import parallelize_transformer

    experts = [tiny_transformer(0), tiny_transformer(1)]
    if context is not None:
        experts = [parallelize_transformer(e, context, plan=WAN.parallel_plan) for e in experts]
    caches = [FirstBlockCache(e, threshold, group_axes(context), plan=WAN.parallel_plan) for e in experts]
    changes: list[float] = []  # the metric each call decided on (nan: an expert's first step, nothing to compare)

    def record(cache):
        return lambda module, args, output: changes.append(nan if cache.last_change is None else cache.last_change)

    for expert, cache in zip(experts, caches, strict=True):
        expert.register_forward_hook(record(cache))
    latents, calls = denoise(*experts, item_seed, ODD_VIDEO, guidance=1.0, steps=CACHE_STEPS)
    return {"latents": latents, "calls": calls, "cache": [c.facts() for c in caches], "changes": changes}


def parallel_cached_case(degrees: dict[str, int], threshold: float) -> dict[str, Any]:
    from tests._dist import rank_context

    context = rank_context(degrees, TINY_TRANSFORMER["num_attention_heads"])
    return {"rank": context.rank, **cached_denoise(11, threshold, context)}
