"""Log formats: JSON lines with the run/shard/item context, text by default, credentials masked in both."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from batchgen.core.errors import ConfigError
from batchgen.core.logs import LOG_FORMAT_ENV, log_context, make_handler, resolve_format

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def capture(log_format: str, monkeypatch) -> tuple[logging.Logger, io.StringIO]:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    stream = io.StringIO()
    logger = logging.getLogger(f"batchgen.test.{log_format}")
    logger.handlers[:] = [make_handler(stream, log_format)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream


def test_json_lines_carry_the_context_and_never_the_secret(monkeypatch):
    logger, stream = capture("json", monkeypatch)
    logger.info("outside")
    with log_context(run_id="run-1"), log_context(shard="shard-000002"):
        with log_context(item="clip-7"):
            logger.warning("request failed: key=%s", SECRET)
        try:
            raise ValueError(f"bad credentials {SECRET}")
        except ValueError:
            logger.exception("boom")
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert set(first) == {"time", "level", "logger", "message", "rank", "local_rank"}
    assert first["time"].endswith("Z") and first["rank"] == 3 and first["local_rank"] == 1
    assert second["level"] == "WARNING" and second["logger"] == "batchgen.test.json"
    assert (second["run_id"], second["shard"], second["item"]) == ("run-1", "shard-000002", "clip-7")
    assert second["message"] == "request failed: key=***"
    assert "item" not in third and third["shard"] == "shard-000002" and "ValueError" in third["exception"]
    assert SECRET not in stream.getvalue()


def test_text_format_masks_the_secret_too(monkeypatch):
    logger, stream = capture("text", monkeypatch)
    logger.error("leaked %s", SECRET)
    assert "ERROR batchgen.test.text: leaked ***" in stream.getvalue()


def test_format_from_flag_then_environment(monkeypatch):
    monkeypatch.delenv(LOG_FORMAT_ENV, raising=False)
    assert resolve_format(None) == "text"
    monkeypatch.setenv(LOG_FORMAT_ENV, "json")
    assert resolve_format(None) == "json"
    assert resolve_format("text") == "text"
    monkeypatch.setenv(LOG_FORMAT_ENV, "xml")
    with pytest.raises(ConfigError, match="BATCHGEN_LOG_FORMAT='xml'"):
        resolve_format(None)


def test_cli_refuses_a_bad_environment_value_with_exit_2():
    env = {**os.environ, LOG_FORMAT_ENV: "yaml"}
    done = subprocess.run([sys.executable, "-m", "batchgen", "status", "/nonexistent"], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "BATCHGEN_LOG_FORMAT='yaml'" in done.stderr
