"""Mochi 1 (genmo/mochi-1-preview; shared/reference/mochi.md): its ``ModelSpec`` and the entry points the spec
holds. Nothing here imports torch: each entry point imports the family's module only when called (the control
plane reads the spec; only workers build a generator)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchgen.models.spec import ModelSpec, ParallelPlan


def _generator() -> type:
    from batchgen.models.mochi.generator import MochiGenerator

    return MochiGenerator


def _read_transformer_config(model_dir: str | Path) -> dict[str, Any]:
    from batchgen.models.mochi.loading import read_transformer_config

    return read_transformer_config(model_dir)


def _write_tiny_model(directory: str | Path, **options: Any) -> Path:
    from batchgen.models.mochi.tiny import write_tiny_model

    return write_tiny_model(directory, **options)


def _block_code() -> Any:
    from batchgen.models.mochi import blocks

    return blocks


def _official_layout(path: Path) -> bool:
    return (path / "dit.safetensors").is_file()


def _processors(transformer, context, state, kernel: str) -> list:
    from batchgen.models.mochi.parallel import mochi_processors

    return mochi_processors(transformer, context, state, kernel)


MOCHI = ModelSpec(
    family="mochi",
    title="Mochi 1",
    frame_step=6,
    vae_spatial=8,
    patch=(1, 2, 2),
    text_length=256,
    max_frames=511,
    default_heads=24,
    generation_defaults={
        "num_frames": 163,
        "height": 480,
        "width": 848,
        "num_inference_steps": 64,
        "guidance_scale": 4.5,
        "fps": 30,
        "max_sequence_length": 256,
    },
    generator=_generator,
    config_reader=_read_transformer_config,
    tiny_writer=_write_tiny_model,
    block_code=_block_code,
    pipeline_classes=("MochiPipeline",),
    transformer_prefix="Mochi",
    official_layout=_official_layout,
    official_layout_hint="dit.safetensors (Mochi's original layout)",
    parallel_plan=ParallelPlan(
        blocks="transformer_blocks",
        attention="attn1",
        rope="rope",
        rope_token_dim=0,
        output="proj_out",
        processors=_processors,
    ),
)
