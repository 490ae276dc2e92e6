"""Command-line options shared by several subcommands, and how they become one ``RunConfig``.

Every flag defaults to ``None`` so that "not given" is distinguishable from "given the default value":
precedence is the model family's defaults < ``--config`` TOML file < flags actually given on the command line.
The TOML tables and the flags are merged first and the config is built once, so choosing the family (in the file,
by ``--family``, by ``--model-dir`` or by the manifest's ``model_family`` column) rebases every generation value
the user did not set.
Not a subcommand itself (no ``NAME``), so ``batchgen.cli`` skips it.
"""

from __future__ import annotations

import argparse
from typing import Any

from batchgen.core.config import ParallelConfig, RunConfig, WorkerConfig, flag_specs, merge_tables, read_config_table

# (flag, config section, config key, type, help). One table per group, so the flag -> key mapping used by
# config_from_args cannot drift from the flags that exist. The parallel and worker flags are derived from the
# config dataclasses; the generation flags keep their own short names (--steps) and family-aware help.
_GENERATION_FLAGS: tuple[tuple[str, str, str, type, str], ...] = (
    ("--num-frames", "generation", "num_frames", int, "decoded frames per video, Mochi 6k+1 (163), Wan 4k+1 (81)"),
    ("--height", "generation", "height", int, "pixels, multiple of 16 (default 480)"),
    ("--width", "generation", "width", int, "pixels, multiple of 16 (default Mochi 848, Wan 832)"),
    ("--steps", "generation", "num_inference_steps", int, "denoising steps (default Mochi 64, Wan 50)"),
    ("--guidance-scale", "generation", "guidance_scale", float, "classifier-free guidance (Mochi 4.5, Wan 5)"),
    ("--negative-prompt", "generation", "negative_prompt", str, "default negative prompt (default empty)"),
    ("--fps", "generation", "fps", int, "MP4 frames per second (default Mochi 30, Wan 16)"),
    ("--crf", "generation", "crf", int, "H.264 quality, 0 lossless .. 51 worst (default 18)"),
)


def _section_flags(klass: type, section: str, keys: tuple[str, ...] | None = None):
    """The flags of a config section whose fields are declared with ``config.setting`` (derived, never restated)."""
    return tuple(
        (flag, section, key, kind, help_text)
        for flag, key, kind, help_text in flag_specs(klass)
        if keys is None or key in keys
    )


_SHARD_FLAGS = _section_flags(WorkerConfig, "worker", ("shard_size",))
_PARALLEL_FLAGS = _section_flags(ParallelConfig, "parallel") + _section_flags(
    WorkerConfig, "worker", ("max_attempts", "metrics_port")
)
_MODEL_FLAGS: tuple[tuple[str, str, str, type, str], ...] = (
    ("--family", "model", "family", str, "model family: mochi (default) or wan; one run uses one family"),
    ("--weights-fingerprint", "model", "weights", str, "the weights' fingerprint (hex), part of the run id"),
)
_ALL_FLAGS = _MODEL_FLAGS + _GENERATION_FLAGS + _SHARD_FLAGS + _PARALLEL_FLAGS


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add(parser: argparse.ArgumentParser, table, title: str) -> None:
    group = parser.add_argument_group(title)
    for flag, _section, _key, kind, help_text in table:
        if kind is bool:  # a switch: absent leaves the config's value
            group.add_argument(flag, dest=_dest(flag), action="store_const", const=True, default=None, help=help_text)
            continue
        group.add_argument(
            flag, dest=_dest(flag), type=kind, default=None, metavar=kind.__name__.upper(), help=help_text
        )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_URI and --run-id: how every command that reads a run names it (resolved by ``plan.locate_run``)."""
    parser.add_argument(
        "run",
        metavar="RUN_URI",
        help="the run's folder (<output>/<run-id>, as run and submit print it) or its output root",
    )
    parser.add_argument("--run-id", default=None, metavar="RUN", help="which run, when RUN_URI is a root with several")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None, help="TOML config file; flags override it")


def add_generation_arguments(parser: argparse.ArgumentParser, *, config: bool = True) -> None:
    """--config (optional), --family and the run-wide generation defaults (--num-frames ... --crf)."""
    if config:
        add_config_argument(parser)
    _add(parser, _MODEL_FLAGS[:1], "model")
    _add(parser, _GENERATION_FLAGS, "generation defaults (manifest columns override them per row)")


def add_weights_arguments(parser: argparse.ArgumentParser, *, model_dir: bool = True) -> None:
    """--weights-fingerprint, and --model-dir (optional) whose family and fingerprint enter the run id."""
    _add(parser, _MODEL_FLAGS[1:], "model")
    if model_dir:
        parser.add_argument(
            "--model-dir",
            metavar="DIR",
            default=None,
            help="model directory reachable from here: its family and weights' fingerprint become part of the run id",
        )


def add_shard_size_argument(parser: argparse.ArgumentParser) -> None:
    _add(parser, _SHARD_FLAGS, "planning")


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``ParallelConfig`` field (--ulysses-degree ... --fp8), --max-attempts and --metrics-port."""
    _add(parser, _PARALLEL_FLAGS, "parallelism and worker runtime")


def config_from_args(args: argparse.Namespace, *, model_dir: str | None = None) -> RunConfig:
    """The family's defaults, then ``args.config`` (TOML) if any, then every flag that was given.

    Flags a command did not register are simply absent from ``args`` and leave the config alone. With
    ``model_dir`` (weights reachable from here) the family is detected from it and its fingerprint pinned;
    otherwise an unset family is taken from ``args.manifest``'s ``model_family`` column, if any.
    Raises ConfigError naming the key on a bad value, ModelMismatchError when the weights contradict the config.
    """
    path = getattr(args, "config", None)
    overrides: dict[str, dict[str, Any]] = {}
    for flag, section, key, _kind, _help in _ALL_FLAGS:
        value = getattr(args, _dest(flag), None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    merged = merge_tables(read_config_table(path) if path else {}, overrides)
    model = merged.setdefault("model", {})
    if isinstance(model, dict):  # a [model] that is not a table is reported by from_dict
        if model_dir:
            _pin_weights(model, model_dir)
        elif "family" not in model and getattr(args, "manifest", None):
            _family_from_manifest(model, args.manifest)
    source = "command line" if not path else f"{path} and the command line" if overrides else str(path)
    return RunConfig.from_dict(merged, source=source)


def _pin_weights(model: dict[str, Any], model_dir: str) -> None:
    from batchgen.models import check_weights, detect_family
    from batchgen.models.common.weights import fingerprint_model_dir

    if "family" not in model:
        model["family"] = detect_family(model_dir)
    fingerprint = fingerprint_model_dir(model_dir)
    check_weights(model_dir, family=model["family"], weights=model.get("weights", ""), fingerprint=fingerprint)
    model["weights"] = fingerprint


def _family_from_manifest(model: dict[str, Any], manifest: str) -> None:
    from batchgen.core.manifest import manifest_family

    family = manifest_family(manifest)
    if family is not None:
        model["family"] = family
