"""Type checking covers the oldest Python the package claims (mypy runs in ``make lint``), and what it found there."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

# Python 3.10 as batchgen sees it: an older version_info and no standard-library tomllib.
AS_PYTHON_3_10 = """
import sys
sys.version_info = (3, 10, 14, "final", 0)
sys.modules["tomllib"] = None
"""


def test_mypy_checks_the_oldest_python_that_requires_python_allows():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floor = pyproject["project"]["requires-python"].removeprefix(">=")
    assert pyproject["tool"]["mypy"]["python_version"] == floor


def test_config_files_are_read_without_the_standard_tomllib(tmp_path):
    # Found by mypy at Python 3.10: config.py imported tomllib (3.11+), so every command failed on 3.10.
    (tmp_path / "run.toml").write_text('[generation]\nnum_frames = 13\n[worker]\nmax_attempts = "x"\n')
    script = AS_PYTHON_3_10 + textwrap.dedent(f"""
        from batchgen.core.config import load_config
        from batchgen.core.errors import ConfigError
        try:
            load_config({str(tmp_path / "run.toml")!r})
        except ConfigError as e:
            print(e)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "max_attempts" in result.stdout and str(tmp_path / "run.toml") in result.stdout
