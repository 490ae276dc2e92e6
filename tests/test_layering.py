"""Import boundaries, by package: no hand-kept list of modules.

- The torch-free packages (the control plane and the worker loop) never import torch, diffusers, transformers or
  xfuser at import time, so ``batchgen plan`` and the controller start fast and install light: in a fresh
  interpreter every module of those packages is imported, then ``batchgen --help`` and ``batchgen validate`` run,
  and the heavy packages must still be absent from sys.modules. A module added to one of them is checked at once.
- Each package imports only from the packages below it (``LAYERS``, docs/DESIGN.md), checked on the source of every
  module, imports inside functions included.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "xfuser")

TORCH_FREE = ("core", "storage", "worker", "launch", "dataset", "cli")
MODEL_FACTS = ("batchgen.models", "batchgen.models.spec", "batchgen.models.api")
"""The torch-free part of ``models``: the specs (facts about each family) and the generator protocol."""

LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("core", "storage", "model facts"),
    "storage": ("core",),
    "dataset": ("core", "storage", "model facts"),
    "worker": ("core", "storage", "dataset", "model facts", "parallel"),
    "launch": ("core", "storage", "dataset", "worker", "model facts"),
    "parallel": ("core", "models"),
    "models": ("core", "parallel", "worker"),
    "cli": ("core", "storage", "dataset", "worker", "launch", "models", "parallel"),
}
"""Which packages each package may import (besides itself). ``worker`` reaches ``parallel`` only for the
torch.distributed context, inside a function."""


SCRIPT = r"""
import contextlib, importlib, io, json, pkgutil, sys

packages, modules = json.loads(sys.argv[1])
for package in packages:
    root = importlib.import_module(f"batchgen.{package}")
    modules += [m.name for m in pkgutil.walk_packages(root.__path__, f"batchgen.{package}.")]
imported = []
for name in [*(f"batchgen.{p}" for p in packages), *modules]:
    importlib.import_module(name)
    imported.append(name)

from batchgen.cli import main

with contextlib.redirect_stdout(io.StringIO()) as help_text:
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
with contextlib.redirect_stdout(io.StringIO()) as validate_out:
    code = main(["validate", sys.argv[2]])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[3]))
print(json.dumps({"imported": imported, "validate_code": code,
                  "validate_out": validate_out.getvalue(), "help": help_text.getvalue(), "heavy": heavy}))
"""


def test_torch_free_packages_do_not_import_heavy_packages(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"], "id": ["cat", "dog"]}), manifest)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps([TORCH_FREE, MODEL_FACTS]), str(manifest), json.dumps(HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"imported: {sorted({m.split('.')[0] for m in report['heavy']})}"
    expected = {"batchgen.cli.plan", "batchgen.core.manifest", "batchgen.worker.loop", "batchgen.launch.k8s.pytorchjob"}
    assert expected <= set(report["imported"]) and len(report["imported"]) > 60
    assert report["validate_code"] == 0 and "2 rows" in report["validate_out"]
    assert "validate" in report["help"] and "plan" in report["help"]


HELP_SCRIPT = r"""
import contextlib, io, json, sys
from batchgen.cli import main

with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
packages = {m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"__main__"}
print(json.dumps({"help": out.getvalue(), "packages": sorted(p for p in packages if not p.startswith("_"))}))
"""


def test_help_imports_no_third_party_package_but_the_metrics_client():
    """`batchgen --help` starts fast because it loads nothing heavy: counted by what it imports, not timed."""
    result = subprocess.run([sys.executable, "-c", HELP_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "exit codes" in report["help"]
    assert "batchgen" in report["packages"] and set(report["packages"]) <= {"batchgen", "prometheus_client"}, report[
        "packages"
    ]


def _package_of(module: str) -> str:
    if module in MODEL_FACTS:
        return "model facts"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "batchgen"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``batchgen.*`` import in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batchgen"):
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "batchgen" else [node.module]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("batchgen.")]
    return found


def test_packages_import_only_the_layers_below():
    problems = []
    for path in sorted((ROOT / "batchgen").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if len(parts) < 3:  # batchgen/__init__.py, __main__.py
            continue
        package = parts[1]
        allowed = {package, "batchgen.__version__", *LAYERS[package]}
        if "models" in allowed:
            allowed.add("model facts")
        for line, module in _imports(path):
            target = "batchgen.__version__" if module == "batchgen.__version__" else _package_of(module)
            if target not in allowed:
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({package} may import {allowed})")
    assert problems == [], "\n".join(problems)


CORE_SCRIPT = r"""
import importlib, json, pkgutil, sys
import batchgen.core

for m in pkgutil.walk_packages(batchgen.core.__path__, "batchgen.core."):
    importlib.import_module(m.name)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"kubernetes", "boto3", *json.loads(sys.argv[1])})))
"""


def test_core_loads_no_cluster_or_cloud_client():
    """core/ is what every process reads first (plans, configs, keys): no kubernetes, boto3 or torch behind it."""
    result = subprocess.run(
        [sys.executable, "-c", CORE_SCRIPT, json.dumps(HEAVY)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
