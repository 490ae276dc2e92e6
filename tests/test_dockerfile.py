"""Static checks of the Dockerfile (no Docker daemon here): a pinned CUDA PyTorch base, pinned Python
dependencies that satisfy pyproject.toml, a non-root numeric USER for everything that runs, `batchgen` as the
entrypoint, no secrets in the image or its build context."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomllib
from packaging.requirements import Requirement

from batchgen.core.errors import EXIT_BAD_INPUT

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
CONSTRAINTS = ROOT / "docker" / "constraints.txt"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + "\n"
            continue
        pending += line
        keyword, _, rest = pending.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return out


INSTRUCTIONS = instructions(DOCKERFILE)


def arg_default(name: str) -> str:
    for keyword, rest in INSTRUCTIONS:
        if keyword == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"ARG {name} has no default")


def test_base_image_is_a_pinned_cuda_pytorch_build():
    (base,) = [rest for keyword, rest in INSTRUCTIONS if keyword == "FROM"]
    image = arg_default("BASE_IMAGE") if base == "${BASE_IMAGE}" else base
    repository, _, tag = image.partition(":")
    assert repository == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), tag
    torch_version = tuple(int(p) for p in tag.split("-")[0].split("."))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch_req,) = [Requirement(d) for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    assert torch_req.specifier.contains(".".join(map(str, torch_version))), (torch_version, torch_req)


def test_dependencies_are_pinned_and_satisfy_pyproject():
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line.strip())
        assert match, f"constraints.txt: not an exact pin: {line!r}"
        pins[match[1].lower().replace("_", "-")] = match[2]
    assert "torch" not in pins  # the base image's CUDA build is kept and pinned at install time
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for dependency in pyproject["project"]["dependencies"]:
        req = Requirement(dependency)
        if req.name == "torch":
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} is not pinned in docker/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"
    # Every pip install in the image is held to the pins; torch is named at the base image's own version.
    installs = [rest for keyword, rest in INSTRUCTIONS if keyword == "RUN" and "pip install" in rest]
    assert installs
    for command in installs:
        for part in command.split("pip install")[1:]:
            assert "--constraint docker/constraints.txt" in part or part.lstrip().startswith("--no-deps ."), part
    assert '"torch==${torch_version}"' in DOCKERFILE


def test_runs_as_non_root_with_batchgen_entrypoint():
    users = [(i, rest) for i, (keyword, rest) in enumerate(INSTRUCTIONS) if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    last_user_at, user = users[-1]
    uid, _, gid = user.partition(":")
    # Numeric, so the kubelet can check runAsNonRoot; the chart and the rendered jobs use 1000:1000.
    assert uid == "1000" and gid == "1000", user
    after = [keyword for keyword, _ in INSTRUCTIONS[last_user_at + 1 :]]
    assert "RUN" not in after and "COPY" not in after and "ADD" not in after, after
    entrypoints = [rest for keyword, rest in INSTRUCTIONS if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["batchgen"]']  # exec form: signals (SIGTERM) reach batchgen directly


SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"(?i)aws_secret_access_key\s*[=:]"),
    re.compile(r"(?i)(password|passwd|token|secret)\s*="),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


@pytest.mark.parametrize("path", ["Dockerfile", ".dockerignore", "docker/constraints.txt"])
def test_no_secrets(path):
    text = (ROOT / path).read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{path}: {pattern.pattern}"
    for keyword, rest in INSTRUCTIONS:
        if keyword in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_.]*)=", rest) or [rest.split()[0]]
            for name in names:
                assert not re.search(r"(?i)secret|password|token|access_key|credential", name), f"{keyword} {name}"


def test_build_context_is_an_allowlist():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "start from nothing, so a stray credentials file or .venv never reaches the build"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "docker/constraints.txt", "batchgen"}
    sources = []
    for keyword, rest in INSTRUCTIONS:
        if keyword == "COPY":
            sources += rest.split()[:-1]
    assert sources
    for source in sources:
        assert any(fnmatch.fnmatchcase(a, source.rstrip("/")) for a in allowed), (
            f"COPY {source}: excluded from the context"
        )


def test_flash_attn_wheel_name_matches_the_release_naming(tmp_path):
    """The wheel URL the build computes, for a torch 2.7 / CUDA 12 / pre-C++11-ABI / CPython 3.11 base, is the name
    of an asset published on flash-attention's v2.8.3 release."""
    snippet = re.search(r"wheel=\"\$\(python -c '(.*?)' \"\$\{FLASH_ATTN_VERSION\}\"\)\"", DOCKERFILE, re.S)
    assert snippet, "flash-attn wheel computation not found"
    code = snippet[1].replace("\\\n", "")
    # A stand-in torch module carrying only what the snippet reads; the real CUDA build is not available here.
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        "import types\n__version__ = '2.7.1+cu126'\nversion = types.SimpleNamespace(cuda='12.6')\n"
        "_C = types.SimpleNamespace(_GLIBCXX_USE_CXX11_ABI=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(fake)}
    result = subprocess.run([sys.executable, "-c", code, "2.8.3"], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == (
        "https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/"
        f"flash_attn-2.8.3+cu12torch2.7cxx11abiFALSE-cp{sys.version_info.major}{sys.version_info.minor}"
        f"-cp{sys.version_info.major}{sys.version_info.minor}-linux_x86_64.whl"
    )
    assert arg_default("FLASH_ATTN") in ("auto", "require", "skip")


def test_the_installed_console_script_is_the_entrypoint_and_keeps_exit_codes(tmp_path):
    """The image runs the `batchgen` console script (pip's wrapper around batchgen.cli:main), not `python -m`:
    run that very script, as installed next to this interpreter, and see its output and exit codes."""
    (entrypoint,) = [json.loads(rest) for keyword, rest in INSTRUCTIONS if keyword == "ENTRYPOINT"]
    script = Path(sys.executable).with_name(entrypoint[0])
    assert script.is_file(), f"{script} is not installed: `pip install -e .` writes it from [project.scripts]"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, whatever the install points at

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=120)

    shown = run("--help")
    assert shown.returncode == 0 and "exit codes" in shown.stdout, shown.stderr
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"], "id": ["cat", "dog"]}), manifest)
    valid = run("validate", str(manifest))
    assert valid.returncode == 0, valid.stderr
    assert "2 rows" in valid.stdout
    missing = run("status", (tmp_path / "nothing").as_uri())
    assert missing.returncode == EXIT_BAD_INPUT, missing.stderr
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .endswith("it holds no run, nor does the folder above it (plan one with `batchgen run` or `batchgen plan`)")
    )
