"""One way to name a run: every command that reads a run takes the run folder that `batchgen run` prints, the
output root with --run-id, or the root alone when it holds one run; a URI naming no run is exit 2 and the message
lists the runs the root holds. Each command, each form, through the real CLI (exit code and last line)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from batchgen.core.errors import EXIT_BAD_INPUT, EXIT_OK
from tests._runs import SMALL_SHAPE, run_cli, tiny_run_args, write_manifest

SHAPE_ARGS = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL_SHAPE.items()]

# command -> (extra arguments, pattern the last line of stdout must match on success)
COMMANDS = {
    "status": ([], r"^state +complete \(_SUCCESS\.json present\)$"),
    "index": ([], r"^complete: .*/_SUCCESS\.json$"),
    "verify": ([], r"^verify +OK$"),
    "export": (["--out", "{out}"], r"^2 samples in 1 tar\(s\) -> .*/manifest\.json$"),
    "gallery": (["--out", "{out}"], r"^2 videos \(\d+ flagged\) on 1 page\(s\), .* -> .*/index\.html$"),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> tuple[str, str, str]:
    """(output root URI, run folder URI as `run` printed it, run id) of a complete two-item run."""
    folder = tmp_path_factory.mktemp("run-uri")
    manifest = write_manifest(folder / "clips.parquet", 2)
    root = (folder / "out").as_uri()
    result = run_cli("run", str(manifest), "--output", root, *tiny_run_args(tiny_model_dir), *SHAPE_ARGS)
    assert result.returncode == EXIT_OK, result.stderr
    index_uri = re.search(r"^index +(\S+)/index/index\.parquet ", result.stdout, re.M).group(1)
    return root, index_uri, index_uri.rsplit("/", 1)[1]


def _last_error(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def _forms(root: str, folder: str, run_id: str) -> dict[str, list[str]]:
    return {"run folder": [folder], "root with --run-id": [root, "--run-id", run_id], "root alone": [root]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_every_form(command, finished_run, tmp_path):
    root, folder, run_id = finished_run
    extra, last_line = COMMANDS[command]
    for form, naming in _forms(root, folder, run_id).items():
        out = tmp_path / form.replace(" ", "-")
        result = run_cli(command, *naming, *[a.format(out=out) for a in extra])
        assert result.returncode == EXIT_OK, f"{command} by {form}: {result.stderr}"
        assert re.match(last_line, result.stdout.strip().splitlines()[-1]), f"{command} by {form}: {result.stdout}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_uri_naming_no_run_is_bad_input_listing_the_runs(command, finished_run, tmp_path):
    root, folder, run_id = finished_run
    extra = [a.format(out=tmp_path / "o") for a in COMMANDS[command][0]]
    for naming in ([f"{root}/{run_id}-typo"], [root, "--run-id", "nope"], [folder, "--run-id", "nope"]):
        result = run_cli(command, *naming, *extra)
        assert result.returncode == EXIT_BAD_INPUT, f"{command} {naming}: {result.returncode} {result.stderr}"
        last = _last_error(result)
        assert "no run" in last and run_id in last and "Traceback" not in result.stderr, last
    empty = (tmp_path / "empty").as_uri()
    result = run_cli(command, empty, *extra)
    assert result.returncode == EXIT_BAD_INPUT
    assert _last_error(result).endswith(
        f"no run at {empty}: it holds no run, nor does the folder "
        "above it (plan one with `batchgen run` or `batchgen plan`)"
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir) -> tuple[str, list[str]]:
    """An output root holding two planned runs (nothing generated)."""
    folder = tmp_path_factory.mktemp("two-runs")
    root = (folder / "out").as_uri()
    for name in ("first", "second"):
        manifest = write_manifest(folder / f"{name}.parquet", 1)
        result = run_cli("plan", str(manifest), "--output", root, *tiny_run_args(tiny_model_dir))
        assert result.returncode == EXIT_OK, result.stderr
    runs = sorted(p.name for p in Path(folder / "out").iterdir() if not p.name.startswith("_"))
    return root, runs


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"status"}))
def test_a_root_with_several_runs_needs_one_named(command, two_runs, tmp_path):
    root, runs = two_runs
    extra = [a.format(out=tmp_path / "o") for a in COMMANDS[command][0]]
    result = run_cli(command, root, *extra)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert _last_error(result).endswith(
        f"{root} holds 2 runs: {', '.join(runs)}; name one by its folder ({root}/<run-id>) or add --run-id"
    )


def test_status_lists_the_runs_of_a_root_with_several(two_runs):
    root, runs = two_runs
    result = run_cli("status", root)
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.strip().splitlines() == [
        f"2 runs under {root}; name one by its folder or --run-id:",
        *(f"  {root}/{run}" for run in runs),
    ]
    named = run_cli("status", f"{root}/{runs[1]}")
    assert named.returncode == EXIT_OK and named.stdout.strip().splitlines()[-1] == "state     not started"


def test_an_s3_run_folder_names_its_run(s3_uri, tmp_path, tiny_model_dir):
    manifest = write_manifest(tmp_path / "clips.parquet", 1)
    planned = run_cli("plan", str(manifest), "--output", s3_uri, *tiny_run_args(tiny_model_dir))
    assert planned.returncode == EXIT_OK, planned.stderr
    run_id = re.search(r"\bclips-[0-9a-f]{12}\b", planned.stdout + planned.stderr).group(0)
    result = run_cli("status", f"{s3_uri}/{run_id}")
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.splitlines()[:2] == [f"run       {run_id}", f"output    {s3_uri}"]
    typo = run_cli("status", f"{s3_uri}/{run_id}x")
    assert typo.returncode == EXIT_BAD_INPUT
    assert _last_error(typo).endswith(
        f"no run at {s3_uri}/{run_id}x: {s3_uri} holds runs {run_id} (name one as {s3_uri}/<run-id>)"
    )
