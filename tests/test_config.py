"""Config files and flags: precedence, and errors that name the offending key (exit 2 through the CLI)."""

from __future__ import annotations

import argparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.cli import main
from batchgen.cli._options import (
    add_generation_arguments,
    add_parallel_arguments,
    add_shard_size_argument,
    config_from_args,
)
from batchgen.core.config import RunConfig
from batchgen.core.errors import EXIT_BAD_INPUT, ConfigError


@pytest.fixture
def small_manifest(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"]}), path)
    return path


BAD_TOML = [
    ("unknown-key", "[generation]\nframes = 13\n", ["generation", "unknown key(s) ['frames']"]),
    ("unknown-section", "[models]\nfamily = 'wan'\n", ["unknown section(s) ['models']"]),
    ("unknown-family", "[model]\nfamily = 'sora'\n", ["model.family must be one of mochi, wan"]),
    (
        "wan-frame-rule",
        "[model]\nfamily = 'wan'\n[generation]\nnum_frames = 163\n",
        ["generation.num_frames must be 4k+1", "'wan'"],
    ),
    ("wrong-type-int", "[generation]\nheight = '480'\n", ["generation.height must be an integer"]),
    ("bool-not-int", "[worker]\nshard_size = true\n", ["worker.shard_size must be an integer"]),
    ("wrong-type-float", "[generation]\nguidance_scale = 'high'\n", ["generation.guidance_scale must be a number"]),
    ("bad-value-frames", "[generation]\nnum_frames = 12\n", ["generation.num_frames must be 6k+1"]),
    ("bad-value-side", "[generation]\nwidth = 850\n", ["generation.width must be a positive multiple of 16"]),
    ("bad-value-parallel", "[parallel]\ncfg_degree = 3\n", ["parallel.cfg_degree must be 0, 1 or 2"]),
    ("bad-backend", "[parallel]\nsp_backend = 'nccl'\n", ["parallel.sp_backend"]),
    ("section-not-table", "generation = 5\n", ["[generation] must be a table"]),
    ("not-toml", "[generation\nheight = 480\n", ["not valid TOML"]),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD_TOML], ids=[c[0] for c in BAD_TOML])
def test_bad_config_file_names_the_key(tmp_path, capsys, small_manifest, text, expected):
    config = tmp_path / "run.toml"
    config.write_text(text)
    code = main(["validate", str(small_manifest), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert str(config) in err
    for fragment in expected:
        assert fragment in err, err


def test_missing_config_file(tmp_path, capsys, small_manifest):
    assert main(["validate", str(small_manifest), "--config", str(tmp_path / "none.toml")]) == EXIT_BAD_INPUT
    assert "none.toml: config file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--height", "100"], "generation.height"),
        (["--crf", "60"], "generation.crf"),
        (["--shard-size", "0"], "worker.shard_size"),
        (["--fps", "0"], "generation.fps"),
    ],
)
def test_bad_flag_value_names_the_key(capsys, small_manifest, tmp_path, flags, fragment):
    assert main(["plan", str(small_manifest), "--output", str(tmp_path / "o"), *flags]) == EXIT_BAD_INPUT
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_generation_arguments(p)
    add_shard_size_argument(p)
    add_parallel_arguments(p)
    return p


def test_precedence_defaults_then_file_then_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        "[generation]\nheight = 240\nwidth = 320\nguidance_scale = 6\n"
        "[parallel]\nulysses_degree = 2\n[worker]\nshard_size = 8\nmax_attempts = 5\n"
    )
    args = parser().parse_args(
        ["--config", str(config), "--width", "160", "--steps", "3", "--ring-degree", "2", "--max-attempts", "1"]
    )
    got = config_from_args(args)
    defaults = RunConfig()
    assert got.generation.height == 240  # file
    assert got.generation.width == 160  # flag beats file
    assert got.generation.num_inference_steps == 3  # flag
    assert got.generation.guidance_scale == 6.0  # file (an integer accepted for a float)
    assert got.generation.num_frames == defaults.generation.num_frames  # default
    assert (got.parallel.ulysses_degree, got.parallel.ring_degree) == (2, 2)
    assert (got.worker.shard_size, got.worker.max_attempts) == (8, 1)


def test_no_flags_no_file_gives_defaults():
    assert config_from_args(parser().parse_args([])) == RunConfig()


def test_commands_without_a_flag_group_leave_it_alone():
    # A command that registers only the generation flags must not trip over absent parallel attributes.
    p = argparse.ArgumentParser()
    add_generation_arguments(p)
    assert config_from_args(p.parse_args(["--num-frames", "7"])).generation.num_frames == 7


def test_flag_rejects_bad_parallel_choice():
    with pytest.raises(ConfigError, match="parallel.offload"):
        config_from_args(parser().parse_args(["--offload", "disk"]))
