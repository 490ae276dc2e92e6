"""The suite's own rules for CI: a missing tool fails the test that needs it, and under CI=true a test that
skips itself fails unless README.md lists it (tests/fixtures/ci.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import ci

ROOT = Path(__file__).resolve().parents[1]

SKIPPING = """
import pytest

def test_runs():
    pass

def test_skips_itself():
    pytest.skip("no frobnicator here")
"""


def _pytest(folder: Path, ci_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci_value} if ci_value is not None else {})
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.fixtures.ci", "-p", "no:cacheprovider", str(folder)]
    return subprocess.run(command, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_a_skip_fails_under_ci_unless_the_readme_lists_it(tmp_path):
    (tmp_path / "test_sample.py").write_text(SKIPPING)
    local = _pytest(tmp_path, None)
    assert local.returncode == 0 and "1 passed, 1 skipped" in local.stdout, local.stdout
    in_ci = _pytest(tmp_path, "true")
    assert in_ci.returncode == 1 and "1 failed, 1 passed" in in_ci.stdout, in_ci.stdout
    assert "test_skips_itself skipped itself under CI (Skipped: no frobnicator here)" in in_ci.stdout
    assert 'unless README.md\'s "Tests that may skip in CI" names it' in in_ci.stdout


def test_the_readme_lists_no_test_that_may_skip_in_ci():
    assert ci.allowed_skips() == frozenset()


def test_a_missing_tool_fails_the_test_naming_how_ci_installs_it(monkeypatch):
    monkeypatch.setattr(ci.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match=r"kubectl is not installed; the suite needs it: the machine "
                       r"image's kubectl, else the one `make kube-bin` builds .*, as \.ci/run installs it"):  # fmt: skip
        ci.required_tool("kubectl")
