"""Functions that run inside the gloo worker processes of the distributed WanGenerator tests, and the single-process
diffusers WanPipeline reference they are compared with. Module level: picklable by reference for tests._dist."""

from __future__ import annotations

from typing import Any

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
    from batchgen.core.item import Item

    return Item(id=f"item-{seed}", seed=seed, **{**ITEM, **overrides})


def reference(model_dir: str, seed: int, overrides: dict | None = None) -> dict[str, Any]:
    """The stock diffusers WanPipeline on one process (fp32): final latents and float frames in [0, 1]."""
    from diffusers import WanPipeline

    from tests._stock import stock_output, stock_pipeline

    item = item_for(seed, **(overrides or {}))
    pipe = stock_pipeline(WanPipeline, model_dir)
    out = {output_type: stock_output(pipe, item, output_type) for output_type in ("latent", "np")}
    return {"latents": out["latent"], "frames": out["np"][0]}


def generator_case(model_dir: str, degrees: dict[str, int], overrides: dict | None = None) -> dict[str, Any]:
    """On every rank: WanGenerator under the layout, on this data-parallel group's item."""
    from batchgen.models.wan.generator import WanGenerator
    from batchgen.models.wan.loading import read_transformer_config
    from tests._dist import rank_context

    context = rank_context(degrees, read_transformer_config(model_dir)["num_attention_heads"])
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
