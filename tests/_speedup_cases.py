"""Functions run inside the gloo processes of tests/test_speedups.py (module level: picklable by reference)."""

from __future__ import annotations

import os
from typing import Any

import torch

from batchgen.core.item import Item

SHAPE = {"num_frames": 13, "height": 64, "width": 64}  # 48 visual tokens: splits over ulysses 2


def tiny_item(steps: int, seed: int = 1, **shape: int) -> Item:
    return Item(
        id=f"item-{seed}",
        prompt="a red cat walking in the snow",
        negative_prompt="",
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=4.5,
        row=0,
        **{**SHAPE, **shape},
    )


def denoise_case(
    model_dir: str, parallel: dict[str, Any], steps: int, inductor_dir: str | None = None, shape: dict | None = None
) -> dict:
    """One rank: TorchContext from torchrun's environment, the real generator, one item's final latents."""
    if inductor_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
    from batchgen.core.config import ParallelConfig
    from batchgen.models.mochi.generator import MochiGenerator
    from batchgen.parallel.runtime import TorchContext
    from tests._dist import INIT_TIMEOUT_S

    config = ParallelConfig(**parallel)
    context = TorchContext.from_env(config, num_heads=4, use_cfg=True, timeout_s=INIT_TIMEOUT_S)
    generator = MochiGenerator(model_dir, context=context, parallel=config, device="cpu")
    latents = generator.denoise(tiny_item(steps, **(shape or {})))
    return {
        "rank": context.rank,
        "latents": latents,
        "cache": generator.caches[0].facts() if generator.caches else None,
        "last_change": generator.caches[0].last_change if generator.caches else None,
        "compile_s": generator.last_compile_s,
    }


def single_process_latents(
    model_dir: str, parallel: dict[str, Any], steps: int, shape: dict | None = None
) -> tuple[torch.Tensor, Any]:
    from batchgen.core.config import ParallelConfig
    from batchgen.models.mochi.generator import MochiGenerator

    generator = MochiGenerator(model_dir, parallel=ParallelConfig(**parallel), device="cpu")
    latents = generator.denoise(tiny_item(steps, **(shape or {})))
    if not generator.caches:
        return latents, None
    (cache,) = generator.caches
    return latents, {**cache.facts(), "last_change": cache.last_change}
