"""Log output: plain text for people, or one JSON object per line for log stores (``--log-format json`` or
``BATCHGEN_LOG_FORMAT=json``, which the Helm chart sets).

JSON fields: ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``, and where known
``rank`` / ``local_rank`` (torchrun's RANK / LOCAL_RANK), ``run_id``, ``shard``, ``item``; ``exception`` holds a
traceback. The run, shard and item come from ``log_context`` blocks the worker opens, so every line logged
inside them carries them, whichever module logs it.

Both formats mask the values of credential variables present in the environment (``SECRET_ENV_NAMES``):
batchgen never logs them on purpose, and a library that echoes a request or an exception that quotes one must
not leak them either.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Protocol

from batchgen.core.errors import ConfigError

LOG_FORMAT_ENV = "BATCHGEN_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
SECRET_ENV_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MASK = "***"
_MIN_SECRET_CHARS = 8  # a short value would mask ordinary words

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("batchgen_log_context", default=None)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` (run_id, shard, item) to every record logged inside the block."""
    token = _context.set({**current_context(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    return dict(_context.get() or {})


def resolve_format(flag: str | None) -> str:
    """The flag if given, else the environment variable, else text."""
    value = flag or os.environ.get(LOG_FORMAT_ENV) or "text"
    if value not in LOG_FORMATS:
        source = "--log-format" if flag else LOG_FORMAT_ENV
        raise ConfigError(f"{source}={value!r}: must be one of {', '.join(LOG_FORMATS)}")
    return value


def _secrets() -> list[str]:
    values = (os.environ.get(name, "") for name in SECRET_ENV_NAMES)
    return [v for v in values if len(v) >= _MIN_SECRET_CHARS]


def mask_secrets(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def _ranks() -> dict[str, int]:
    ranks = {}
    for key, env in (("rank", "RANK"), ("local_rank", "LOCAL_RANK")):
        value = os.environ.get(env, "")
        if value.isdigit():
            ranks[key] = int(value)
    return ranks


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self.secrets = _secrets()

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record), self.secrets)


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets = _secrets()
        self.ranks = _ranks()

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, timezone.utc)
        entry: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.ranks,
            **{k: v for k, v in getattr(record, "batchgen_context", {}).items() if v is not None},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return mask_secrets(json.dumps(entry, ensure_ascii=False, default=str), self.secrets)


class _ContextFilter(logging.Filter):
    """Copies the log context onto the record when it is made (the handler may format it later)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.batchgen_context = current_context()
        return True


class TextSink(Protocol):
    """What progress output writes to: a terminal or file (``TextIO``), or a ``LogStream``."""

    def isatty(self) -> bool: ...
    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


class LogStream:
    """A text stream whose lines become log records: progress lines stay one JSON object per line."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.logger.info("%s", line)
        return len(text)

    def flush(self) -> None:
        pass


def json_logs() -> bool:
    return os.environ.get(LOG_FORMAT_ENV) == "json"


def make_handler(stream, log_format: str) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    return handler
