"""Wan 2.1 / 2.2 (Wan-AI; diffusers 0.42 ``WanPipeline``, ``WanTransformer3DModel``, ``AutoencoderKLWan``: 4x
temporal, 8x spatial, patch (1, 2, 2), UMT5 with 512 tokens; the official configs wan/configs/*.py in
Wan-Video/Wan2.1 and Wan2.2: 480x832, 81 frames, 16 fps): its ``ModelSpec`` and the entry points the spec holds.
Nothing here imports torch: each entry point imports the family's module only when called."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchgen.models.spec import ModelSpec, ParallelPlan


def _generator() -> type:
    from batchgen.models.wan.generator import WanGenerator

    return WanGenerator


def _read_transformer_config(model_dir: str | Path) -> dict[str, Any]:
    from batchgen.models.wan.loading import read_transformer_config

    return read_transformer_config(model_dir)


def _write_tiny_model(directory: str | Path, **options: Any) -> Path:
    from batchgen.models.wan.tiny import write_tiny_wan

    return write_tiny_wan(directory, **options)


def _block_code() -> Any:
    from batchgen.models.wan import blocks

    return blocks


def _official_layout(path: Path) -> bool:
    from batchgen.models.common.weights import read_json_object

    return "model_type" in read_json_object(path / "config.json") or (path / "high_noise_model").is_dir()


def _processors(transformer, context, state, kernel: str) -> list:
    from batchgen.models.wan.parallel import wan_processors

    return wan_processors(transformer, context, state, kernel)


WAN = ModelSpec(
    family="wan",
    title="Wan 2.1/2.2",
    frame_step=4,
    vae_spatial=8,
    patch=(1, 2, 2),
    text_length=512,
    # WanRotaryPosEmbed holds rope_max_seq_len = 1024 positions per axis; 4 x 1023 + 1 frames use them all.
    max_frames=4093,
    default_heads=40,
    generation_defaults={
        "num_frames": 81,
        "height": 480,
        "width": 832,
        "num_inference_steps": 50,
        "guidance_scale": 5.0,
        "fps": 16,
        "max_sequence_length": 512,
    },
    generator=_generator,
    config_reader=_read_transformer_config,
    tiny_writer=_write_tiny_model,
    block_code=_block_code,
    pipeline_classes=("WanPipeline",),
    transformer_prefix="Wan",
    official_layout=_official_layout,
    official_layout_hint="a Wan config.json (the official layout)",
    parallel_plan=ParallelPlan(
        blocks="blocks",
        attention="attn1",
        rope="rope",
        rope_token_dim=1,
        output="proj_out",
        processors=_processors,
    ),
)
