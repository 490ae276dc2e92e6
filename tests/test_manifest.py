"""Manifest validation through the real CLI, derived ids/seeds, digests and item resolution."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.cli import main
from batchgen.core.config import MAX_PROMPT_CHARS, GenerationConfig
from batchgen.core.errors import EXIT_BAD_INPUT, ManifestError
from batchgen.core.manifest import (
    derive_id,
    derive_seed,
    iter_items,
    validate_manifest,
)

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, columns: dict, **kwargs) -> Path:
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def run_cli(*argv: str, capsys) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- malformed manifests: (case id, builder(tmp) -> path, [expected fragments]) ------------------------------
# Row numbers are 0-based, as in pandas and in Item.row.


def _bytes(name: str, data: bytes):
    def build(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return build


def _table(name: str = "m.parquet", **columns):
    return lambda tmp: write(tmp / name, columns)


MALFORMED = [
    ("missing-file", lambda tmp: tmp / "nope.parquet", ["nope.parquet", "file not found"]),
    ("empty-file", _bytes("empty.parquet", b""), ["empty.parquet", "file is empty"]),
    ("csv-file", _bytes("prompts.csv", b"prompt\na cat\n"), ["prompts.csv", "not a Parquet file", "a .csv file"]),
    (
        "truncated-parquet",
        _bytes("cut.parquet", b"PAR1" + b"\x00" * 20),
        ["cut.parquet", "not a readable Parquet file"],
    ),
    ("zero-rows", _table(prompt=pa.array([], pa.string())), ["m.parquet", "manifest has no rows"]),
    ("no-prompt-column", _table(text=["a cat"]), ["column 'prompt'", "required column is missing"]),
    ("prompt-wrong-type", _table(prompt=[1, 2]), ["column 'prompt'", "must be a string column, got type int64"]),
    ("seed-wrong-type", _table(prompt=["a"], seed=["7"]), ["column 'seed'", "must be an integer column"]),
    (
        "height-float-from-pandas",
        _table(prompt=["a", "b"], height=[480.0, None]),
        ["column 'height'", "must be an integer column, got type double", "Int64"],
    ),
    ("id-int-type", _table(prompt=["a"], id=[5]), ["column 'id'", "must be a string column", "cast it to string"]),
    ("null-prompt", _table(prompt=["a", None]), ["row 1, column 'prompt': is null"]),
    ("whitespace-prompt", _table(prompt=[" \t\n", "b"]), ["row 0, column 'prompt': is empty or whitespace only"]),
    ("empty-prompt", _table(prompt=["a", "b", ""]), ["row 2, column 'prompt': is empty"]),
    (
        "long-prompt",
        _table(prompt=["a", "x" * (MAX_PROMPT_CHARS + 1)]),
        [f"row 1, column 'prompt': is {MAX_PROMPT_CHARS + 1} characters long"],
    ),
    (
        "long-negative-prompt",
        _table(prompt=["a"], negative_prompt=["n" * (MAX_PROMPT_CHARS + 5)]),
        ["row 0, column 'negative_prompt'", f"at most {MAX_PROMPT_CHARS}"],
    ),
    (
        "duplicate-id",
        _table(prompt=["a", "b", "c"], id=["x", "y", "x"]),
        ["row 2, column 'id': duplicate id 'x' (first at row 0)"],
    ),
    (
        "identical-rows-derived-id",
        _table(prompt=["a cat", "a dog", "a cat"]),
        ["row 2, column 'id': row is identical to row 0"],
    ),
    ("null-id", _table(prompt=["a", "b"], id=["x", None]), ["row 1, column 'id': is null"]),
    ("empty-id", _table(prompt=["a"], id=[""]), ["row 0, column 'id': is empty"]),
    ("id-with-slash", _table(prompt=["a"], id=["a/b"]), ["row 0, column 'id'", "'a/b' has characters outside"]),
    ("id-dot-dot", _table(prompt=["a"], id=["a..b"]), ["row 0, column 'id'", "unsafe as an object key"]),
    ("id-leading-dot", _table(prompt=["a"], id=[".hidden"]), ["row 0, column 'id'", "unsafe as an object key"]),
    ("id-too-long", _table(prompt=["a"], id=["i" * 129]), ["row 0, column 'id': is 129 characters long"]),
    ("negative-seed", _table(prompt=["a", "b"], seed=[1, -5]), ["row 1, column 'seed'", "got -5"]),
    (
        "uint64-seed-too-big",
        _table(prompt=["a"], seed=pa.array([2**64 - 1], pa.uint64())),
        ["row 0, column 'seed'", f"got {2**64 - 1}"],
    ),
    ("frames-not-6k+1", _table(prompt=["a", "b"], num_frames=[13, 12]), ["row 1, column 'num_frames'", "6k+1"]),
    ("frames-too-many", _table(prompt=["a"], num_frames=[601]), ["row 0, column 'num_frames'", "at most 511"]),
    (
        "height-not-16",
        _table(prompt=["a"], height=[500]),
        ["row 0, column 'height'", "multiple of 16 for Mochi 1, got 500"],
    ),
    ("width-too-big", _table(prompt=["a"], width=[4096]), ["row 0, column 'width'", "at most 2048"]),
    ("steps-negative", _table(prompt=["a"], num_inference_steps=[-3]), ["row 0, column 'num_inference_steps'"]),
    ("guidance-negative", _table(prompt=["a"], guidance_scale=[-1.0]), ["row 0, column 'guidance_scale'"]),
    ("guidance-nan", _table(prompt=["a"], guidance_scale=[float("nan")]), ["row 0, column 'guidance_scale'", "nan"]),
]


@pytest.mark.parametrize(("builder", "expected"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_exit_2_names_file_row_column(tmp_path, capsys, builder, expected):
    path = builder(tmp_path)
    code, out, err = run_cli("validate", str(path), capsys=capsys)
    assert code == EXIT_BAD_INPUT
    assert out == ""  # no success summary
    assert str(path) in err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in:\n{err}"


def test_validate_writes_nothing_on_error(tmp_path, capsys):
    path = write(tmp_path / "m.parquet", {"prompt": ["a", None]})
    before = sorted(tmp_path.rglob("*"))
    assert run_cli("plan", str(path), "--output", str(tmp_path / "out"), capsys=capsys)[0] == EXIT_BAD_INPUT
    assert sorted(tmp_path.rglob("*")) == before


def test_all_problems_in_one_pass_then_capped(tmp_path, capsys):
    n = 120
    prompts = [None if i % 2 else "ok" for i in range(n)]
    heights = [500 if i % 2 == 0 else 480 for i in range(n)]  # every even row: bad height; every odd: null prompt
    ids = [f"item-{i}" for i in range(n)]
    path = write(tmp_path / "bad.parquet", {"id": ids, "prompt": prompts, "height": heights}, row_group_size=7)
    code, _, err = run_cli("validate", str(path), "--max-errors", "5", capsys=capsys)
    assert code == EXIT_BAD_INPUT
    assert f"{path}: {n} problem(s)" in err
    listed = [line for line in err.splitlines() if line.strip().startswith(f"{path}, row")]
    assert len(listed) == 5
    assert "... and 115 more" in err
    # Listed in row order, across both kinds of problem.
    assert [int(line.split("row ")[1].split(",")[0]) for line in listed] == [0, 1, 2, 3, 4]


def test_row_numbers_count_across_row_groups(tmp_path):
    prompts = [f"prompt {i}" for i in range(50)]
    prompts[37] = "   "
    path = write(tmp_path / "m.parquet", {"prompt": prompts}, row_group_size=8)
    with pytest.raises(ManifestError) as info:
        validate_manifest(path, GenerationConfig())
    assert info.value.problems == [f"{path}, row 37, column 'prompt': is empty or whitespace only"]


def test_schema_problems_reported_together(tmp_path):
    path = write(tmp_path / "m.parquet", {"prompt": [1], "seed": [1.5], "width": ["x"]})
    with pytest.raises(ManifestError) as info:
        validate_manifest(path, GenerationConfig())
    text = str(info.value)
    for column in ("prompt", "seed", "width"):
        assert f"column '{column}'" in text


def test_unknown_columns_warn_but_pass(tmp_path, capsys):
    path = write(tmp_path / "m.parquet", {"prompt": ["a", "b"], "caption_source": ["x", "y"]})
    code, out, err = run_cli("validate", str(path), capsys=capsys)
    assert code == 0
    assert "2 rows" in out and "1 warning(s)" in out
    assert "WARNING" in err and "'caption_source' is not a manifest column" in err


def test_validate_json_summary(tmp_path, capsys):
    path = write(tmp_path / "m.parquet", {"prompt": ["a", "b", "c"], "id": ["x", "y", "z"]})
    code, out, _ = run_cli("validate", str(path), "--json", capsys=capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["rows"] == 3 and summary["derived_ids"] is False and len(summary["digest"]) == 64


def test_shape_rules_follow_cli_defaults(tmp_path, capsys):
    # Rows without overrides take the run defaults; a bad default is a config error naming the key.
    path = write(tmp_path / "m.parquet", {"prompt": ["a"]})
    code, _, err = run_cli("validate", str(path), "--num-frames", "12", capsys=capsys)
    assert code == EXIT_BAD_INPUT and "generation.num_frames" in err


# -- ids, seeds, digests ------------------------------------------------------------------------------------


def test_derived_ids_and_seeds_are_pinned():
    # Pinned values: changing the derivation would silently re-key every existing run's outputs.
    assert derive_id("a cat") == derive_id("a cat", None, None, None, None, None, None, None)
    assert derive_id("a cat") == "93c514621060de8d"
    assert derive_id("a cat") == hashlib.sha256(b"5:a cat|~|~|~|~|~|~|~").hexdigest()[:16]
    assert derive_id("a cat", "blurry", 7, 13, 64, 64, 2, 4.5) == "b58a458edb12b965"
    assert derive_seed("item-1") == 6453814349519802412
    assert derive_seed("item-1") == int(hashlib.sha256(b"item-1").hexdigest()[:16], 16) & (2**63 - 1)
    assert 0 <= derive_seed("x") < 2**63


def test_derived_ids_stable_across_processes(tmp_path):
    path = write(
        tmp_path / "m.parquet",
        {"prompt": ["a cat", "a dog", "a cat"], "seed": [None, None, 3], "guidance_scale": [None, 6.0, None]},
    )
    script = (
        "import sys, json; from batchgen.core.manifest import iter_items; from batchgen.core.config import GenerationConfig;"
        "print(json.dumps([[i.id, i.seed] for i in iter_items(sys.argv[1], GenerationConfig())]))"
    )
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", script, str(path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
                env={"PYTHONHASHSEED": str(seed), "PATH": ""},
            ).stdout
        )
        for seed in (1, 2)
    ]
    assert runs[0] == runs[1]
    ids = [i for i, _ in runs[0]]
    assert len(set(ids)) == 3  # the third row differs by its seed only
    assert ids[0] == derive_id("a cat")
    assert runs[0][0][1] == derive_seed(ids[0]) and runs[0][2][1] == 3


def test_vectorised_ids_match_scalar_definition(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    columns = {
        "prompt": [f"p{i}|:~{'ü' * (i % 3)}" for i in range(n)],
        "negative_prompt": [None if i % 3 else f"neg {i}" for i in range(n)],
        "seed": pa.array([None if i % 4 else int(rng.integers(0, 2**62)) for i in range(n)], pa.int64()),
        "num_frames": pa.array([None if i % 2 else 13 for i in range(n)], pa.int32()),
        "guidance_scale": [None if i % 5 else float(i) / 7 for i in range(n)],
    }
    path = write(tmp_path / "m.parquet", columns, row_group_size=64)
    items = list(iter_items(path, GenerationConfig()))
    for i, item in enumerate(items):
        expected = derive_id(
            columns["prompt"][i],
            columns["negative_prompt"][i],
            columns["seed"][i].as_py(),
            columns["num_frames"][i].as_py(),
            None,
            None,
            None,
            columns["guidance_scale"][i],
        )
        assert item.id == expected, i


def test_digest_ignores_layout_and_widths_but_not_values(tmp_path):
    base = {"id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "height": pa.array([480, None, 240], pa.int64())}
    g = GenerationConfig()
    d1 = validate_manifest(write(tmp_path / "1.parquet", base), g).digest
    narrow = dict(base, height=pa.array([480, None, 240], pa.int16()))
    d2 = validate_manifest(write(tmp_path / "2.parquet", narrow, row_group_size=1), g).digest
    large = dict(base, prompt=pa.array(["x", "y", "z"], pa.large_string()), extra=[1, 2, 3])
    d3 = validate_manifest(write(tmp_path / "3.parquet", large), g).digest
    assert d1 == d2 == d3
    # An absent optional column reads as all-null.
    with_null_seed = dict(base, seed=pa.array([None, None, None], pa.int64()))
    assert validate_manifest(write(tmp_path / "4.parquet", with_null_seed), g).digest == d1
    changed = dict(base, height=pa.array([480, 480, 240], pa.int64()))
    assert validate_manifest(write(tmp_path / "5.parquet", changed), g).digest != d1
    moved = dict(base, prompt=["x", "yz", ""])  # same concatenated text, other boundaries
    with pytest.raises(ManifestError):
        validate_manifest(write(tmp_path / "6.parquet", moved), g)
    shifted = dict(base, prompt=["x", "yz", "q"])
    assert validate_manifest(write(tmp_path / "7.parquet", shifted), g).digest != d1


def test_items_resolve_defaults_and_overrides(tmp_path):
    path = write(
        tmp_path / "m.parquet",
        {
            "id": ["a", "b"],
            "prompt": ["first", "second"],
            "negative_prompt": [None, "ugly"],
            "seed": [None, 42],
            "num_frames": pa.array([None, 7], pa.int32()),
            "height": [None, 64],
            "guidance_scale": pa.array([None, 2], pa.int64()),
        },
    )
    g = GenerationConfig(
        num_frames=13, height=128, width=160, num_inference_steps=3, guidance_scale=5.0, negative_prompt="default neg"
    )
    a, b = iter_items(path, g)
    assert (
        a.id,
        a.prompt,
        a.negative_prompt,
        a.seed,
        a.num_frames,
        a.height,
        a.width,
        a.num_inference_steps,
        a.guidance_scale,
        a.row,
    ) == ("a", "first", "default neg", derive_seed("a"), 13, 128, 160, 3, 5.0, 0)
    assert (b.negative_prompt, b.seed, b.num_frames, b.height, b.width, b.guidance_scale, b.row) == (
        "ugly",
        42,
        7,
        64,
        160,
        2.0,
        1,
    )
    assert isinstance(b.guidance_scale, float) and isinstance(b.seed, int)


def test_iter_items_refuses_invalid_manifest(tmp_path):
    path = write(tmp_path / "m.parquet", {"prompt": ["ok", ""]})
    with pytest.raises(ManifestError, match="row 1, column 'prompt'"):
        list(iter_items(path, GenerationConfig()))


def test_dictionary_encoded_strings_are_accepted(tmp_path):
    prompts = pa.array(["a cat", "a dog", "a cat"]).dictionary_encode()
    path = write(tmp_path / "m.parquet", {"prompt": prompts, "id": ["1", "2", "3"]})
    assert [i.prompt for i in iter_items(path, GenerationConfig())] == ["a cat", "a dog", "a cat"]
