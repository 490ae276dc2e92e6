"""``batchgen tiny-model DIR``: write a tiny random Mochi or Wan (real layout) for demos and tests."""

from __future__ import annotations

import argparse

NAME = "tiny-model"
HELP = "write a tiny randomly initialised Mochi or Wan model (real layout) for demos and tests"
DESCRIPTION = (
    "Write a tiny randomly initialised model of --family (mochi: exactly the diffusers layout of "
    "genmo/mochi-1-preview; wan: the diffusers layout of Wan 2.1 T2V, or a Wan 2.2 A14B-style pair of experts with "
    "--experts 2) plus DIR/batchgen-tiny.toml with its [model] family and generation defaults that fit it. It loads "
    "through the same code as real weights. For Mochi, --layout original writes the DiT as dit.safetensors in "
    "Genmo's key layout instead of transformer/."
)
ORDER = 90


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="output directory (created; must be empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    parser.add_argument("--family", choices=("mochi", "wan"), default="mochi", help="model family (default mochi)")
    parser.add_argument(
        "--experts", type=int, default=None, choices=(1, 2), help="Wan only: 2 = Wan 2.2-style high/low-noise experts"
    )
    parser.add_argument(
        "--layout",
        choices=("diffusers", "original"),
        default="diffusers",
        help="where the DiT goes: transformer/ (diffusers, default) or dit.safetensors (Genmo's original layout)",
    )


def run(args: argparse.Namespace) -> int:
    from batchgen.models import spec_for
    from batchgen.models.common.tiny import TINY_TOML_NAME

    path = spec_for(args.family).write_tiny_model(args.directory, **tiny_options(args))
    print(f"{path}\t(generation defaults: {path / TINY_TOML_NAME})")
    return 0


def tiny_options(args: argparse.Namespace) -> dict[str, object]:
    """The writer's keywords for the family; ConfigError for an option the family does not have."""
    from batchgen.core.errors import ConfigError

    if args.family == "mochi":
        if args.experts is not None:
            raise ConfigError("--experts is for --family wan (Mochi has one transformer)")
        return {"seed": args.seed, "layout": args.layout}
    if args.layout != "diffusers":
        raise ConfigError(f"--layout {args.layout} is for --family mochi; the tiny Wan is written in diffusers layout")
    return {"seed": args.seed, "experts": args.experts or 1}
