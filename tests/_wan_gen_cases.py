"""Functions that run inside the gloo worker processes of the distributed WanGenerator tests, and the single-process
diffusers WanPipeline reference they are compared with. Module level: picklable by reference for tests._dist."""

from __future__ import annotations

from typing import Any

import torch

ITEM = {
    "prompt": "a red cat walking in the snow",
    "negative_prompt": "blurry",
    "num_frames": 9,
    "height": 64,
    "width": 64,
    "num_inference_steps": 4,
    "guidance_scale": 5.0,
    "row": 0,
}


def item_for(seed: int, **overrides):
    from batchgen.item import Item

    return Item(id=f"item-{seed}", seed=seed, **{**ITEM, **overrides})


def reference(model_dir: str, seed: int, overrides: dict | None = None) -> dict[str, Any]:
    """The stock diffusers WanPipeline on one process (fp32): final latents and float frames in [0, 1]."""
    from diffusers import WanPipeline

    item = item_for(seed, **(overrides or {}))
    pipe = WanPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for output_type in ("latent", "np"):
        out[output_type] = pipe(
            prompt=item.prompt,
            negative_prompt=item.negative_prompt,
            num_frames=item.num_frames,
            height=item.height,
            width=item.width,
            num_inference_steps=item.num_inference_steps,
            guidance_scale=item.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(item.seed),
            output_type=output_type,
        ).frames
    return {"latents": out["latent"], "frames": out["np"][0]}


def generator_case(model_dir: str, degrees: dict[str, int], overrides: dict | None = None) -> dict[str, Any]:
    """On every rank: WanGenerator under the layout, on this data-parallel group's item."""
    from batchgen.config import ParallelConfig
    from batchgen.generate.wan import WanGenerator
    from batchgen.generate.wan_loading import read_transformer_config
    from batchgen.parallel.runtime import TorchContext
    from tests._dist import INIT_TIMEOUT_S

    context = TorchContext.from_env(
        ParallelConfig(
            ulysses_degree=degrees.get("ulysses", 1),
            ring_degree=degrees.get("ring", 1),
            cfg_degree=degrees.get("cfg", 1),
        ),
        num_heads=read_transformer_config(model_dir)["num_attention_heads"],
        timeout_s=INIT_TIMEOUT_S,
    )
    item = item_for(21 + context.dp_rank, **(overrides or {}))  # data-parallel groups work on different items
    generator = WanGenerator(model_dir, context=context, device="cpu", dtype="fp32")
    generator.prepare([item])
    latents = generator.denoise(item)
    video = generator.generate(item)
    return {
        "rank": context.rank,
        "is_writer": context.is_writer,
        "topology": context.topology.to_dict(),
        "seed": item.seed,
        "latents": latents,
        "frames": None if video is None else video.frames,
        "parallel": None if video is None else video.extra["parallel"],
    }
