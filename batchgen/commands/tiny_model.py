"""``batchgen tiny-model DIR``: write a tiny random Mochi (diffusers layout) for demos and tests."""

from __future__ import annotations

import argparse

NAME = "tiny-model"
HELP = "write a tiny randomly initialised Mochi model (diffusers layout) for demos and tests"
DESCRIPTION = (
    "Write a tiny randomly initialised Mochi in exactly the diffusers layout of genmo/mochi-1-preview "
    "(model_index.json, scheduler/, text_encoder/, tokenizer/, transformer/, vae/) plus DIR/batchgen-tiny.toml "
    "with generation defaults that fit it (13 frames at 64x64). It loads through the same code as real weights. "
    "With --layout original the DiT is written as dit.safetensors in Genmo's key layout instead of transformer/."
)
ORDER = 90


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="output directory (created; must be empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    parser.add_argument(
        "--layout",
        choices=("diffusers", "original"),
        default="diffusers",
        help="where the DiT goes: transformer/ (diffusers, default) or dit.safetensors (Genmo's original layout)",
    )


def run(args: argparse.Namespace) -> int:
    from batchgen.generate.tiny import TINY_TOML_NAME, write_tiny_model

    path = write_tiny_model(args.directory, seed=args.seed, layout=args.layout)
    print(f"{path}\t(generation defaults: {path / TINY_TOML_NAME})")
    return 0
