"""``batchgen generate``: render one video from one prompt (the single-prompt CLI).

Under ``torchrun`` (WORLD_SIZE > 1) every rank runs this command; the ranks share the work through sequence and
CFG parallelism and only the writer rank of data-parallel group 0 writes the files.
"""

from __future__ import annotations

import argparse
import os

from batchgen.cli._options import add_generation_arguments, add_parallel_arguments

NAME = "generate"
HELP = "render one video from a prompt (MP4, optionally the final latents)"
DESCRIPTION = (
    "Render one video from --prompt with the Mochi or Wan model in --model-dir (family detected from its files) "
    "and write it to --out as an H.264 MP4. Generation defaults come from --config, else from "
    "DIR/batchgen-tiny.toml when the model directory is a tiny model, else the family's (Mochi 480x848, 163 frames, "
    "64 steps; Wan 480x832, 81 frames, 50 steps); flags override them. "
    "Run it under torchrun with --ulysses-degree/--ring-degree/--cfg-degree to split one video across processes. "
    "Exit 5 when the sample diverges (NaN or infinite values): nothing is written."
)
ORDER = 80


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir", required=True, metavar="DIR", help="Mochi or Wan weights (diffusers or original layout)"
    )
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--out", required=True, metavar="FILE.mp4", help="output MP4 (written atomically)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument(
        "--save-latents", metavar="FILE", default=None, help="also write the final fp32 latents (safetensors)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: the rank's GPU, else cpu)")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="model dtype (auto: bf16 on GPU, fp32 on CPU)"
    )
    add_generation_arguments(parser)
    add_parallel_arguments(parser)


def _load_config(args: argparse.Namespace):
    import logging
    from pathlib import Path

    from batchgen.cli._options import config_from_args
    from batchgen.models.common.tiny import TINY_TOML_NAME

    tiny_defaults = Path(args.model_dir) / TINY_TOML_NAME
    if args.config is None and tiny_defaults.is_file():
        # The tiny model's own defaults (13 frames at 64x64): Mochi's 163x480x848 would only be slow with it.
        logging.getLogger("batchgen.commands.generate").info("using generation defaults from %s", tiny_defaults)
        args = argparse.Namespace(**{**vars(args), "config": str(tiny_defaults)})
    # The family comes from the directory (its defaults apply); a contradicting --family or config is exit 4.
    return config_from_args(args, model_dir=args.model_dir)


def _check_output(path_text: str, flag: str):
    from pathlib import Path

    from batchgen.core.errors import InputError

    path = Path(path_text)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise InputError(f"{flag} {path}: directory {path.parent} does not exist")
    return path


def _write_atomically(path, data: bytes) -> None:
    import tempfile

    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def run(args: argparse.Namespace) -> int:
    import logging

    from batchgen.core.errors import IncompleteRunError, InputError
    from batchgen.core.item import Item
    from batchgen.core.quality import NonFiniteError
    from batchgen.core.topology import check_items, visual_tokens
    from batchgen.models import uses_cfg
    from batchgen.worker.context import open_context

    log = logging.getLogger("batchgen.commands.generate")
    if not args.prompt.strip():
        raise InputError("--prompt is empty")
    out_path = _check_output(args.out, "--out")
    latents_path = _check_output(args.save_latents, "--save-latents") if args.save_latents else None
    config = _load_config(args)
    generation, parallel = config.generation, config.parallel
    item = Item(
        id="generate",
        prompt=args.prompt,
        negative_prompt=generation.negative_prompt,
        seed=args.seed,
        num_frames=generation.num_frames,
        height=generation.height,
        width=generation.width,
        num_inference_steps=generation.num_inference_steps,
        guidance_scale=generation.guidance_scale,
        row=0,
    )
    # Shape and degree checks before any weights load.
    spec = config.spec
    num_heads = spec.num_heads(args.model_dir)
    tokens = (visual_tokens(item.num_frames, item.height, item.width, spec=spec),)
    use_cfg = uses_cfg(item.guidance_scale)
    context, topology = open_context(parallel, num_heads=num_heads, use_cfg=use_cfg, token_counts=tokens)
    try:
        check_items(topology, [item], num_heads=num_heads, sp_backend=parallel.sp_backend, spec=spec)
        # One video: data-parallel groups beyond the first have nothing to do.
        if context.dp_rank == 0:
            _generate(args, item, config, context, out_path, latents_path, log)
        context.barrier()
    except NonFiniteError as e:  # the item failed, as a run records it: a message and exit 5, not a traceback
        raise IncompleteRunError(f"{out_path}: not written: {e}") from None
    finally:
        context.close()
    return 0


def _generate(args, item, config, context, out_path, latents_path, log) -> None:
    import time

    from batchgen.core.video import encode_mp4, probe_mp4

    generation = config.generation
    started = time.perf_counter()
    generator = config.spec.generator_class()(
        args.model_dir,
        context=context,
        parallel=config.parallel,
        device=args.device,
        dtype=args.dtype,
        max_sequence_length=generation.max_sequence_length,
    )
    load_s = time.perf_counter() - started
    try:
        started = time.perf_counter()
        encoded = generator.encode_prompts([item])[item.id]
        encode_s = time.perf_counter() - started
        started = time.perf_counter()
        latents = generator.denoise(item, encoded)
        denoise_s = time.perf_counter() - started
        if not context.is_writer:
            return
        if latents_path is not None:
            _write_latents(latents_path, latents, item)
        started = time.perf_counter()
        frames = generator.decode(latents)
        decode_s = time.perf_counter() - started
    finally:
        generator.close()
    data = encode_mp4(frames, fps=generation.fps, crf=generation.crf)
    info = probe_mp4(data)
    _write_atomically(out_path, data)
    log.info("load %.2fs, text encode %.2fs, denoise %.2fs, decode %.2fs", load_s, encode_s, denoise_s, decode_s)
    print(f"{out_path}\t{info.frames} frames {info.width}x{info.height} @ {info.fps:g} fps, {len(data)} bytes")
    if latents_path is not None:
        print(f"{latents_path}\tlatents {list(latents.shape)} float32")


def _write_latents(path, latents, item) -> None:
    import json

    from safetensors.torch import save

    metadata = {"item": json.dumps(item.to_dict(), sort_keys=True)}
    _write_atomically(path, save({"latents": latents.detach().to("cpu").contiguous()}, metadata=metadata))
