"""The stock diffusers pipelines (MochiPipeline, WanPipeline) as the reference batchgen's generators reproduce."""

from __future__ import annotations

from pathlib import Path

import torch


def stock_pipeline(pipeline_class, model_dir: str | Path):
    """``pipeline_class`` loaded from ``model_dir`` in fp32, without a progress bar."""
    pipe = pipeline_class.from_pretrained(str(model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_output(pipe, item, output_type: str):
    """``pipe`` on ``item``'s parameters, seeded as batchgen seeds an item: a CPU generator from its seed."""
    return pipe(
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
