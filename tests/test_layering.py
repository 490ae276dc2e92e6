"""The control plane never imports torch, diffusers, transformers or xfuser (fast start, light installs).

Checked in a fresh interpreter: every control-plane module is imported, then `batchgen --help` and
`batchgen validate` run, and the heavy packages must still be absent from sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "xfuser")

CONTROL_PLANE = [
    "batchgen.cli",
    "batchgen.core.config",
    "batchgen.core.errors",
    "batchgen.core.item",
    "batchgen.core.manifest",
    "batchgen.core.plan",
    "batchgen.core.layout",
    "batchgen.storage",
    "batchgen.storage.base",
    "batchgen.storage.local",
    "batchgen.storage.s3",
    "batchgen.storage.retry",
    "batchgen.worker.loop",
    "batchgen.dataset.index",
    "batchgen.core.progress",
    "batchgen.launch.local",
    "batchgen.core.video",
    "batchgen.core.topology",
    "batchgen.cli._options",
    "batchgen.core.quality",
    "batchgen.dataset",
    "batchgen.dataset.export",
    "batchgen.dataset.gallery",
]

SCRIPT = r"""
import contextlib, importlib, importlib.util, io, json, pkgutil, sys

modules = json.loads(sys.argv[1])
if importlib.util.find_spec("batchgen.launch.k8s") is not None:
    import batchgen.launch.k8s
    modules += [f"batchgen.launch.k8s.{m.name}" for m in pkgutil.iter_modules(batchgen.launch.k8s.__path__)]
imported, skipped = [], []
for name in modules:
    # Modules that do not exist yet are skipped, not failed: each is checked once it lands.
    if importlib.util.find_spec(name) is None:
        skipped.append(name)
        continue
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
print(json.dumps({"imported": imported, "skipped": skipped, "validate_code": code,
                  "validate_out": validate_out.getvalue(), "help": help_text.getvalue(), "heavy": heavy}))
"""


def test_control_plane_does_not_import_heavy_packages(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"], "id": ["cat", "dog"]}), manifest)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CONTROL_PLANE), str(manifest), json.dumps(HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"imported: {report['heavy']}"
    assert {"batchgen.cli", "batchgen.core.manifest", "batchgen.core.plan", "batchgen.core.layout"} <= set(
        report["imported"]
    )
    assert report["validate_code"] == 0 and "2 rows" in report["validate_out"]
    assert "validate" in report["help"] and "plan" in report["help"]


def test_help_starts_quickly():
    # Generous sanity bound only: the machine is shared; real start-up timing belongs in the benchmark.
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "batchgen", "--help"], cwd=ROOT, capture_output=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert b"exit codes" in result.stdout
    assert elapsed < 5.0, f"batchgen --help took {elapsed:.1f} s"
