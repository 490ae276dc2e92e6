"""The CLI as users run it (issue 19): every user-facing command, on a folder and on S3 (moto), in each situation a
user meets; each case asserts the documented exit code, that the last line is a sentence (no traceback) and that
no secret appears.

``MATRIX`` is the table: a row per command, a cell per situation, each a ``Case`` or an ``NA`` saying why the
situation does not apply. Adding a command means adding its row (``test_every_command_has_a_row`` fails until
then); the cells become test cases by themselves.

How each situation is made:

- success / failed items: commands read the two runs ``run``'s own cells make once per backend and session: the
  tiny model (its ``tiny-model`` cell writes it), and the same model with NaN weights, so that every item fails;
- invalid input: the cell's bad manifest, option or argument;
- permanent storage error: on S3 a fault proxy answering 403 AccessDenied to every request; on a folder a path
  through a regular file (ENOTDIR) for the commands that write, and for those that only read a run (status,
  index, verify) a copy of a run whose plan was deleted (a damaged output: a path that names no run is invalid
  input, exit 2);
- transient storage error outlasting the retries: a fault proxy answering 503 SlowDown to every request, with two
  attempts and no backoff (the file backend has no transient errors: an OSError is permanent);
- interrupt: SIGINT raised at the command's first storage request, or at its first step where it has no storage;
  ``run``'s is a real SIGINT to a real ``batchgen run`` once its progress shows, so its workers are running.

Commands run in this process (``batchgen.cli.main``, stdout and stderr captured), which makes them as fast as the
commands themselves, except ``run``'s: its success and failed cells are real ``batchgen run`` processes, all four
started together when the module begins, so that they overlap each other and the other cells. One tiny model, one
moto server and two fault proxies serve every cell. Global options go after the subcommand in every other case.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.cli import _command_modules, _merge_global_options, build_parser, main
from batchgen.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STORAGE,
    EXIT_TRANSIENT,
)
from batchgen.core.logs import LOG_FORMAT_ENV
from tests._runs import SMALL_SHAPE, write_manifest
from tests.fixtures.faultproxy import FaultProxy

BACKENDS = ("folder", "s3")
SITUATIONS = ("success", "failed", "invalid", "permanent", "transient", "interrupt")
REPO = Path(__file__).resolve().parents[1]

# -- the table ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    """What a cell's command line points at, for one backend and situation."""

    backend: str
    situation: str
    manifest: str
    """A valid two-row manifest (on S3 for the S3 backend)."""
    bad_manifest: str
    """A manifest with a duplicate id and an empty prompt."""
    output: str
    """A fresh, empty output root."""
    run_root: str
    """An output root holding one run: complete (success, interrupt), with every item failed (failed)."""
    runs_root: str
    """An output root holding two runs."""
    destination: str
    """A fresh destination for export and gallery."""
    local: Path
    """A fresh local folder (generate, tiny-model)."""
    model: Path
    """The tiny model; with NaN weights in the failed situation."""
    config: Path
    """The tiny model's generation defaults."""


@dataclass(frozen=True)
class Case:
    argv: Callable[[Where], list[str]]
    exit: int
    yaml_output: bool = False
    """stdout is a YAML document (render): it must parse, and the sentence check looks at stderr."""
    interrupt_at: tuple[str, ...] = ()
    """``module:attribute`` paths where a SIGINT arrives; empty = the first storage request."""


@dataclass(frozen=True)
class NA:
    why: str


FOLDER_NO_TRANSIENT = NA("the file backend has no transient errors: every OSError is permanent")
LOCAL_ONLY = NA("writes a local file or folder only: no storage URI to point at S3")
NO_ITEMS = "plans or renders; no item is generated, so none can fail"


def small(w: Where) -> list[str]:
    return ["--config", str(w.config), *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL_SHAPE.items())]


def run_line(w: Where) -> list[str]:
    output = w.run_root if w.situation in ("success", "failed") else w.output
    return ["run", w.manifest, "--output", output, "--model-dir", str(w.model), "--max-attempts=1", "--poll=0.5"]


def render_line(w: Where) -> list[str]:
    return ["render", "--manifest", w.manifest, "--output", w.output, "--shards=all"]


def generate_line(w: Where) -> list[str]:
    return ["generate", "--model-dir", str(w.model), "--prompt", "a red fox", "--out", str(w.local / "fox.mp4")]


def storage_errors() -> dict[str, object]:
    """Permanent on both backends, transient on S3: the success cell's command line, on failing storage."""
    return {
        "permanent": Case(lambda w: [], EXIT_STORAGE),
        "transient": {"folder": FOLDER_NO_TRANSIENT, "s3": Case(lambda w: [], EXIT_TRANSIENT)},
    }


# Each row: situation -> Case or NA (both backends), or situation -> {backend: Case or NA}. A Case whose argv is
# empty reuses the success cell's command line (the storage is what fails).
MATRIX: dict[str, dict[str, object]] = {
    "validate": {
        "success": Case(lambda w: ["validate", w.manifest], EXIT_OK),
        "failed": NA("checks a manifest; nothing is generated"),
        "invalid": Case(lambda w: ["validate", w.bad_manifest], EXIT_BAD_INPUT),
        **storage_errors(),
        "permanent": {
            "folder": NA("a local manifest is read straight from the file system: unreadable is invalid input"),
            "s3": Case(lambda w: [], EXIT_STORAGE),
        },
        "interrupt": Case(lambda w: [], EXIT_INTERRUPTED, interrupt_at=("batchgen.core.manifest:validate_manifest",)),
    },
    "plan": {
        "success": Case(lambda w: ["plan", w.manifest, "--output", w.output, *small(w)], EXIT_OK),
        "failed": NA(NO_ITEMS),
        "invalid": Case(lambda w: ["plan", w.bad_manifest, "--output", w.output], EXIT_BAD_INPUT),
        **storage_errors(),
        "interrupt": Case(lambda w: [], EXIT_INTERRUPTED),
    },
    "run": {
        "success": Case(lambda w: [*run_line(w), *small(w)], EXIT_OK),
        "failed": Case(lambda w: [*run_line(w), *small(w)], EXIT_INCOMPLETE),
        "invalid": Case(lambda w: ["run", w.bad_manifest, "--output", w.output, "--model-dir", str(w.model)], 2),
        **storage_errors(),
        "interrupt": Case(lambda w: [*run_line(w), *small(w)], EXIT_INTERRUPTED),
    },
    "status": {
        "success": Case(lambda w: ["status", w.run_root], EXIT_OK),
        "failed": Case(lambda w: ["status", w.run_root], EXIT_OK),
        "invalid": Case(lambda w: ["status", w.run_root, "--rate-window=0"], EXIT_BAD_INPUT),
        **storage_errors(),
        "interrupt": Case(lambda w: [], EXIT_INTERRUPTED),
    },
    "index": {
        "success": Case(lambda w: ["index", w.run_root], EXIT_OK),
        "failed": Case(lambda w: ["index", w.run_root], EXIT_INCOMPLETE),
        "invalid": Case(lambda w: ["index", w.runs_root], EXIT_BAD_INPUT),
        **storage_errors(),
        "interrupt": Case(lambda w: [], EXIT_INTERRUPTED),
    },
    "verify": {
        "success": Case(lambda w: ["verify", w.run_root], EXIT_OK),
        "failed": Case(lambda w: ["verify", w.run_root], EXIT_OK),
        "invalid": Case(lambda w: ["verify", w.runs_root], EXIT_BAD_INPUT),
        **storage_errors(),
        "interrupt": Case(lambda w: [], EXIT_INTERRUPTED),
    },
    "tail": {
        "success": Case(lambda w: ["tail", w.run_root, "--poll", "0.1"], EXIT_OK),
        "failed": Case(lambda w: ["tail", w.run_root, "--once"], EXIT_OK),  # never complete: --once stops it
        "invalid": Case(lambda w: ["tail", w.run_root, "--start-after", "not-a-cursor"], EXIT_BAD_INPUT),
        **storage_errors(),
        "interrupt": Case(lambda w: [], EXIT_INTERRUPTED),
    },
    "export": {
        "success": Case(lambda w: ["export", w.run_root, "--out", w.destination], EXIT_OK),
        "failed": Case(lambda w: ["export", w.run_root, "--out", w.destination], EXIT_OK),
        "invalid": Case(lambda w: ["export", w.run_root, "--out", w.destination, "--fraction=0"], EXIT_BAD_INPUT),
        **storage_errors(),
        "interrupt": Case(lambda w: [], EXIT_INTERRUPTED),
    },
    "gallery": {
        "success": Case(lambda w: ["gallery", w.run_root, "--out", w.destination], EXIT_OK),
        "failed": Case(lambda w: ["gallery", w.run_root, "--out", w.destination], EXIT_OK),
        "invalid": Case(lambda w: ["gallery", w.runs_root, "--out", w.destination], EXIT_BAD_INPUT),
        **storage_errors(),
        "interrupt": Case(lambda w: [], EXIT_INTERRUPTED),
    },
    "render": {
        "success": Case(lambda w: [*render_line(w), *small(w)], EXIT_OK, yaml_output=True),
        "failed": NA(NO_ITEMS),
        "invalid": Case(lambda w: [*render_line(w), "--attempt=0"], EXIT_BAD_INPUT),
        **storage_errors(),
        "interrupt": Case(lambda w: [], EXIT_INTERRUPTED),
    },
    "submit": {
        "success": Case(lambda w: ["submit", w.manifest, "--output", w.output, "--dry-run", *small(w)], EXIT_OK),
        "failed": NA(NO_ITEMS + " (--dry-run creates no job)"),
        "invalid": Case(lambda w: ["submit", w.manifest, "--output", w.output, "--dry-run", "--max-jobs=0"], 2),
        **storage_errors(),
        "interrupt": Case(lambda w: [], EXIT_INTERRUPTED),
    },
    "generate": {
        situation: {"folder": case, "s3": LOCAL_ONLY}
        for situation, case in {
            "success": Case(lambda w: [*generate_line(w), *small(w)], EXIT_OK),
            "failed": Case(lambda w: [], EXIT_INCOMPLETE),
            "invalid": Case(lambda w: [*generate_line(w), "--num-frames=8"], EXIT_BAD_INPUT),
            "permanent": NA("no storage: an --out that cannot be written is refused before generating"),
            "transient": FOLDER_NO_TRANSIENT,
            "interrupt": Case(lambda w: [], EXIT_INTERRUPTED, interrupt_at=("batchgen.worker.context:open_context",)),
        }.items()
    },
    "tiny-model": {
        situation: {"folder": case, "s3": LOCAL_ONLY}
        for situation, case in {
            "success": Case(lambda w: ["tiny-model", str(w.local / "tiny")], EXIT_OK),
            "failed": NA("writes random weights; nothing is generated"),
            "invalid": Case(lambda w: ["tiny-model", str(w.local / "tiny"), "--experts=2"], EXIT_BAD_INPUT),
            "permanent": NA("no storage: writes a local folder"),
            "transient": FOLDER_NO_TRANSIENT,
            "interrupt": Case(
                lambda w: [], EXIT_INTERRUPTED, interrupt_at=("batchgen.models.mochi.tiny:write_tiny_model",)
            ),
        }.items()
    },
    "worker": dict.fromkeys(SITUATIONS, NA("internal: what run and Kubernetes jobs start; test_worker runs it")),
    "cancel": dict.fromkeys(SITUATIONS, NA("deletes jobs through the Kubernetes API; test_k8s_e2e runs it")),
}


def cell(command: str, backend: str, situation: str) -> Case | NA:
    entry = MATRIX[command][situation]
    return entry[backend] if isinstance(entry, dict) else entry


def cases() -> list[tuple[str, str, str]]:
    return [
        (command, backend, situation)
        for command in MATRIX
        for backend in BACKENDS
        for situation in SITUATIONS
        if isinstance(cell(command, backend, situation), Case)
    ]


CASES = cases()
GLOBALS_AFTER = {case for index, case in enumerate(CASES) if index % 2}
"""Every other case puts the global options after the subcommand (``batchgen run ... --log-format json``)."""
# run's own successful runs are what the other cells read: they use the form issue 19 found refused.
GLOBALS_AFTER |= {("run", backend, "success") for backend in BACKENDS}


def global_options(case: tuple[str, str, str]) -> tuple[list[str], list[str]]:
    """(before the subcommand, after it)."""
    if case in GLOBALS_AFTER:
        return [], ["-v", "--log-format", "json"]
    return ["--log-format", "text"], []


# -- running a cell -----------------------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    argv: list[str] = field(default_factory=list)


STORAGE_REQUESTS = ("list", "head", "get_bytes", "get_file", "put_bytes", "put_file", "delete")


def _interrupting(mp: pytest.MonkeyPatch, targets: tuple[str, ...]) -> None:
    """A SIGINT arrives at the first call of any of ``targets`` (default: any storage request), as a Ctrl-C would."""
    from batchgen.storage.local import LocalStorage
    from batchgen.storage.s3 import S3Storage

    fired: list[bool] = []
    places = [(cls, name) for cls in (LocalStorage, S3Storage) for name in STORAGE_REQUESTS]
    if targets:
        import importlib

        places = []
        for target in targets:
            module, _, name = target.partition(":")
            places.append((importlib.import_module(module), name))
    for owner, name in places:
        original = getattr(owner, name)

        def interrupted(*args, _original=original, **kwargs):
            if not fired:
                fired.append(True)
                signal.raise_signal(signal.SIGINT)
            return _original(*args, **kwargs)

        mp.setattr(owner, name, interrupted)


def invoke(argv: list[str], env: dict[str, str], interrupt_at: tuple[str, ...] | None = None) -> Result:
    """``batchgen ARGV`` in this process: exit code, stdout, stderr. Logging and the environment are restored."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers = root.handlers[:]
    levels = _logger_levels()  # main() quiets botocore and friends: later tests' caplog must see them again
    with pytest.MonkeyPatch.context() as mp:
        # main() sets it for its workers: setenv first so that undoing restores its absence too (a bare delenv of
        # an absent variable records nothing, and the value main() set would leak into later tests).
        mp.setenv(LOG_FORMAT_ENV, "")
        mp.delenv(LOG_FORMAT_ENV)
        for name, value in env.items():
            mp.setenv(name, value)
        if interrupt_at is not None:
            _interrupting(mp, interrupt_at)
        # Ctrl-C as a terminal delivers it: a suite started in the background inherits SIGINT ignored.
        sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse's usage errors
                    code = e.code
        finally:
            signal.signal(signal.SIGINT, sigint)
            root.handlers[:] = handlers
            for logger, level in levels.items():
                logger.setLevel(level)
    return Result(int(code or 0), out.getvalue(), err.getvalue(), argv)


def _logger_levels() -> dict[logging.Logger, int]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return {logger: logger.level for logger in loggers if isinstance(logger, logging.Logger)}


def start(argv: list[str], env: dict[str, str], **streams) -> subprocess.Popen:
    """A real ``batchgen ARGV`` process running this checkout."""
    environment = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "batchgen", *argv],
        stdin=subprocess.DEVNULL,
        text=True,
        env=environment,
        preexec_fn=_default_sigint,
        **streams,
    )


def _default_sigint() -> None:
    """A suite started in the background hands its children SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: the interrupt cells need SIGINT as a terminal delivers it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_subprocess(argv: list[str], env: dict[str, str]) -> Result:
    """A real ``batchgen`` process, sent SIGINT once its progress line shows (its workers are running)."""
    proc = start(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if " done (" in line:
            proc.send_signal(signal.SIGINT)
            break
    stdout, rest = proc.communicate(timeout=180)
    return Result(proc.returncode, stdout, "".join(lines) + rest, argv)


# -- the world the cells point at ---------------------------------------------------------------------------


class World:
    """Inputs, runs and fault proxies shared by every cell; results of the cells the others depend on are kept."""

    def __init__(self, root: Path, s3_client, s3_server: str, secret: str):
        self.root = root
        self.secret = secret
        self.bucket = f"bg-matrix-{uuid.uuid4().hex[:12]}"
        s3_client.create_bucket(Bucket=self.bucket)
        inputs = root / "inputs"
        inputs.mkdir()
        self.manifest = write_manifest(inputs / "prompts.parquet", 2)
        self.bad_manifest = inputs / "bad.parquet"
        pq.write_table(pa.table({"id": ["a", "a"], "prompt": ["a red fox", " "]}), self.bad_manifest)
        for path in (self.manifest, self.bad_manifest):
            s3_client.upload_file(str(path), self.bucket, f"inputs/{path.name}")
        (root / "a-file").write_text("not a folder\n")
        self.denying = FaultProxy(s3_server, 0.0, seed=0, deny_path_prefix="/")
        self.failing = FaultProxy(s3_server, 1.0, seed=0, faults=("503",))
        self.denying.start()
        self.failing.start()
        self.results: dict[tuple[str, str, str], Result] = {}
        self._fresh = 0
        self._model: Path | None = None
        self._two_runs: set[str] = set()
        self._running: dict[tuple[str, str, str], tuple[subprocess.Popen, Path, list[str]]] = {}

    def close(self) -> None:
        for proc, _, _ in self._running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.denying.stop()
        self.failing.stop()

    def start_runs(self) -> None:
        """Start the runs the other cells read (run's success and failed cells) as real ``batchgen run`` processes,
        all at once: they overlap each other and the cells that run in this process."""
        for backend in BACKENDS:
            for situation in ("success", "failed"):
                key = ("run", backend, situation)
                argv, env = self._command_line(key)
                logs = self.root / "logs" / "-".join(key)
                logs.mkdir(parents=True)
                with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
                    self._running[key] = (start(argv, env, stdout=out, stderr=err), logs, argv)

    def uri(self, backend: str, name: str) -> str:
        return f"s3://{self.bucket}/{name}" if backend == "s3" else (self.root / backend / name).as_uri()

    def fresh(self, backend: str, kind: str) -> str:
        self._fresh += 1
        return self.uri(backend, f"{kind}-{self._fresh}")

    @property
    def model(self) -> Path:
        """The tiny model: what tiny-model's success cell wrote."""
        self.result("tiny-model", "folder", "success")
        assert self._model is not None
        return self._model

    @property
    def nan_model(self) -> Path:
        folder = self.root / "nan-model"
        if not folder.exists():
            from safetensors.torch import load_file, save_file

            shutil.copytree(self.model, folder)
            (weights,) = (folder / "transformer").glob("*.safetensors")
            tensors = load_file(weights)
            tensors["proj_out.weight"].fill_(float("nan"))  # every denoising step yields NaN: every item fails
            save_file(tensors, weights, metadata={"format": "pt"})
        return folder

    def damaged_run(self) -> str:
        """A folder copy of the successful run whose plan was deleted: its registry marker still names it."""
        copy = self.root / "folder" / "run-damaged"
        if not copy.exists():
            self.result("run", "folder", "success")
            shutil.copytree(self.root / "folder" / "run-success", copy)
            (plan,) = copy.glob("*/plan/run.json")
            plan.unlink()
        return copy.as_uri()

    def runs_root(self, backend: str) -> str:
        uri = self.uri(backend, "two-runs")
        if backend not in self._two_runs:
            self._two_runs.add(backend)
            for name in ("first", "second"):
                assert invoke(["plan", self.manifest_on(backend), "--output", uri, "--run-name", name], {}).code == 0
        return uri

    def manifest_on(self, backend: str, bad: bool = False) -> str:
        path = self.bad_manifest if bad else self.manifest
        return f"s3://{self.bucket}/inputs/{path.name}" if backend == "s3" else str(path)

    def where(self, command: str, backend: str, situation: str) -> Where:
        folder = self.root / command
        broken = situation == "permanent" and backend == "folder"
        run_situation = "failed" if situation == "failed" else "success"
        reads_runs = command in ("status", "index", "verify", "export", "gallery")
        if reads_runs:
            self.result("run", backend, run_situation)  # the run this cell reads
        run_root = self.uri(backend, f"run-{run_situation}")
        tiny = command == "tiny-model"
        where = Where(
            backend=backend,
            situation=situation,
            manifest=self.manifest_on(backend),
            bad_manifest=self.manifest_on(backend, bad=True),
            output=self.fresh(backend, "output"),
            run_root=run_root,
            runs_root=self.runs_root(backend) if situation == "invalid" and reads_runs else "",
            destination=self.fresh(backend, "destination"),
            local=folder / f"local-{self._fresh}",
            model=Path() if tiny else self.model,
            config=Path() if tiny else self.model / "batchgen-tiny.toml",
        )
        if situation == "failed":
            where = replace(where, model=self.nan_model)
        if broken:
            # export and gallery read the run and write elsewhere: the write is what fails. A path through a file
            # names no run (invalid input), so the commands that only read a run read a damaged copy of it.
            through_a_file = (self.root / "a-file" / "output").as_uri()
            run_root = where.run_root if command in ("export", "gallery") else self.damaged_run()
            where = replace(where, output=through_a_file, run_root=run_root, destination=through_a_file)
        where.local.mkdir(parents=True, exist_ok=True)
        return where

    def environment(self, situation: str, backend: str) -> dict[str, str]:
        if backend != "s3" or situation not in ("permanent", "transient"):
            return {}
        if situation == "permanent":
            return {"AWS_ENDPOINT_URL": self.denying.url}
        return {"AWS_ENDPOINT_URL": self.failing.url, "BATCHGEN_S3_MAX_ATTEMPTS": "2", "BATCHGEN_S3_BACKOFF_S": "0"}

    def result(self, command: str, backend: str, situation: str) -> Result:
        key = (command, backend, situation)
        if key not in self.results:
            self.results[key] = self._finish(key) if key in self._running else self._execute(key)
        return self.results[key]

    def _finish(self, key: tuple[str, str, str]) -> Result:
        proc, logs, argv = self._running[key]
        proc.wait(timeout=600)
        return Result(proc.returncode, (logs / "stdout").read_text(), (logs / "stderr").read_text(), argv)

    def _command_line(self, key: tuple[str, str, str]) -> tuple[list[str], dict[str, str]]:
        """The cell's full command line (global options placed) and its environment."""
        command, backend, situation = key
        case = cell(*key)
        assert isinstance(case, Case), f"{key} is not applicable: {case}"
        where = self.where(command, backend, situation)
        if key == ("tiny-model", "folder", "success"):
            self._model = where.local / "tiny"
        argv = case.argv(where) or cell(command, backend, "success").argv(where)
        before, after = global_options(key)
        return [*before, *argv, *after], self.environment(situation, backend)

    def _execute(self, key: tuple[str, str, str]) -> Result:
        argv, env = self._command_line(key)
        if key[0] == "run" and key[2] == "interrupt":
            return interrupt_subprocess(argv, env)
        case = cell(*key)
        return invoke(argv, env, case.interrupt_at if key[2] == "interrupt" else None)


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_client, s3_server, s3_credentials) -> Iterator[World]:
    made = World(tmp_path_factory.mktemp("matrix"), s3_client, s3_server, s3_credentials["AWS_SECRET_ACCESS_KEY"])
    try:
        made.start_runs()
        yield made
    finally:
        made.close()


# -- the checks ---------------------------------------------------------------------------------------------

_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*File \"|^[A-Z]\w*(Error|Exception|Interrupt)\b")


def message_of(line: str) -> str:
    """A log line's message: the JSON record's, or the text line itself."""
    if line.startswith("{"):
        return json.loads(line)["message"]
    return line


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return message_of(lines[-1].strip()) if lines else ""


def assert_sentence(line: str, where: str) -> None:
    assert line, f"{where} is empty"
    assert not _TRACEBACK.search(line), f"{where} is a traceback line: {line!r}"
    assert len(re.findall(r"[A-Za-z]{2,}", line)) >= 2, f"{where} is not a sentence: {line!r}"


# A real run started and stopped on top of the four the module shares: slow.
HEAVY = {("run", backend, "interrupt") for backend in BACKENDS}


@pytest.mark.parametrize(
    ("command", "backend", "situation"),
    [pytest.param(*case, id="/".join(case), marks=[pytest.mark.slow] if case in HEAVY else []) for case in CASES],
)
def test_cli_case(world: World, command: str, backend: str, situation: str):
    case = cell(command, backend, situation)
    result = world.result(command, backend, situation)
    context = (
        f"batchgen {' '.join(result.argv)}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    assert result.code == case.exit, context
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, context
    assert world.secret not in everything, context
    if case.yaml_output and result.code == EXIT_OK:
        assert list(yaml.safe_load_all(result.stdout)), context
        assert_sentence(last_line(result.stderr), "stderr's last line")
    else:
        # The final word: the summary on stdout after a success, the error on stderr otherwise (run and index
        # print their summary on stdout whatever the outcome).
        summary = result.stdout.strip() and (result.code == EXIT_OK or command in ("run", "index"))
        assert_sentence(last_line(result.stdout if summary else result.stderr), "the last line")
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            json.loads(line)  # JSON logs stay one object per line


def test_every_command_has_a_row():
    """A new subcommand fails here until the table says, cell by cell, how it is tested or why it is not."""
    names = {module.NAME for module in _command_modules()}
    assert names == set(MATRIX), f"rows missing: {sorted(names - set(MATRIX))}; stale: {sorted(set(MATRIX) - names)}"
    for command, row in MATRIX.items():
        assert set(row) == set(SITUATIONS), command
        for situation in SITUATIONS:
            for backend in BACKENDS:
                entry = cell(command, backend, situation)
                assert isinstance(entry, Case) or (isinstance(entry, NA) and entry.why), (command, backend, situation)


def test_half_the_cases_put_the_global_options_after_the_subcommand():
    assert abs(len(GLOBALS_AFTER) - len(CASES) / 2) <= 2


def test_run_json_logs_name_the_run_once_it_is_known(world: World):
    """Issue 19 item 5: every record the run writes after planning carries ``run_id`` (here: all of them, since
    the run id is known from the plan's first record on)."""
    result = world.result("run", "folder", "success")
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    known = next(index for index, record in enumerate(records) if "run_id" in record)
    after = records[known:]
    assert {"batchgen.plan", "batchgen.localrun", "batchgen.progress", "batchgen.index"} <= {r["logger"] for r in after}
    run_id = records[known]["run_id"]
    assert all(r.get("run_id") == run_id for r in after), [r for r in after if r.get("run_id") != run_id]


def test_run_summary_counts_failed_and_flagged(world: World):
    failed = world.result("run", "folder", "failed").stdout
    assert re.search(r"items +2 total: 0 done .*, 2 failed, 0 pending", failed), failed
    assert "/errors/ (one JSON per failed item)" in failed
    done = world.result("run", "s3", "success").stdout
    assert re.search(r"^flagged +0 of 2 videos", done, re.M), done


def test_global_options_are_accepted_on_both_sides_of_the_subcommand():
    """Issue 19 item 2: as kubectl, aws and gcloud do; -v counts on both sides, the later --log-format wins."""
    args = build_parser().parse_args(["-v", "--log-format", "text", "status", "out", "-v", "--log-format", "json"])
    _merge_global_options(args)
    assert (args.verbose, args.quiet, args.log_format) == (2, False, "json")
    args = build_parser().parse_args(["validate", "m.parquet", "-q"])
    _merge_global_options(args)
    assert (args.verbose, args.quiet, args.log_format) == (0, True, None)
