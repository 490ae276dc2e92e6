"""Names and labels of cluster objects: pure functions of (run, shard range, attempt).

A retried submit, a restarted controller and a second controller all compute the same name for the same job,
so the API server's 409 on create is what prevents duplicates.
"""

from __future__ import annotations

import hashlib
import re

from batchgen.core.layout import shard_index

# The training operator names pods and their headless Services "<job>-worker-<i>"; a Service name is a
# DNS-1035 label of at most 63 characters, so the job name leaves room for "-worker-" plus 7 digits.
MAX_JOB_NAME = 48
MAX_LABEL_VALUE = 63

LABEL_PREFIX = "batchgen.io/"
RUN_LABEL = LABEL_PREFIX + "run-id"
SHARD_FIRST_LABEL = LABEL_PREFIX + "shard-first"
SHARD_LAST_LABEL = LABEL_PREFIX + "shard-last"
ATTEMPT_LABEL = LABEL_PREFIX + "attempt"
RUN_ANNOTATION = LABEL_PREFIX + "run-id"
SHARDS_ANNOTATION = LABEL_PREFIX + "shards"
OUTPUT_ANNOTATION = LABEL_PREFIX + "output"
ENDED_ANNOTATION = LABEL_PREFIX + "ended"
"""Set by the controller on a job it stopped itself (too many pod restarts): why."""
RESTARTS_ANNOTATION = LABEL_PREFIX + "restarts"
"""Pod recreations the controller has counted on the job, so that a restarted controller goes on from there."""
MANAGED_BY = {"app.kubernetes.io/name": "batchgen", "app.kubernetes.io/managed-by": "batchgen"}

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _digest(*parts: object, length: int = 8) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:length]


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug


def _index(shard: str | int) -> int:
    return shard if isinstance(shard, int) else shard_index(shard)


def is_dns_label(name: str, max_length: int = 63) -> bool:
    """A DNS-1035 label (what Services need; stricter than DNS-1123 in that it starts with a letter)."""
    return len(name) <= max_length and bool(_DNS_LABEL.match(name))


def is_label_value(value: str) -> bool:
    return len(value) <= MAX_LABEL_VALUE and bool(_LABEL_VALUE.match(value))


def job_name(run_id: str, first_shard: str | int, last_shard: str | int, attempt: int) -> str:
    """``<run>-<first>-<last>-a<attempt>``, at most 48 characters (see MAX_JOB_NAME).

    Shards are ids ("shard-000003") or indices. When the run id has to be cut, a hash of the full inputs is
    appended so two long run ids sharing a prefix still get different names.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    first, last = _index(first_shard), _index(last_shard)
    if first > last:
        raise ValueError(f"shard range {first}..{last} is reversed")
    run = _slug(run_id) or "run"
    if not run[0].isalpha():
        run = "bg-" + run
    suffix = f"-{first}-{last}-a{attempt}"
    name = run + suffix
    if len(name) <= MAX_JOB_NAME:
        return name
    suffix = f"{suffix}-{_digest(run_id, first, last, attempt)}"
    return run[: MAX_JOB_NAME - len(suffix)].rstrip("-") + suffix


def label_value(text: str) -> str:
    """``text`` if it is a valid label value, else a cut-down form with a hash suffix (deterministic)."""
    if is_label_value(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    if len(cleaned) <= MAX_LABEL_VALUE and cleaned == text:
        return cleaned
    suffix = "-" + _digest(text)
    return cleaned[: MAX_LABEL_VALUE - len(suffix)].rstrip("-_.") + suffix


def run_selector(run_id: str) -> str:
    """The label selector that finds every job of a run."""
    return f"{RUN_LABEL}={label_value(run_id)}"


def job_labels(run_id: str, first_shard: str | int, last_shard: str | int, attempt: int) -> dict[str, str]:
    return {
        **MANAGED_BY,
        "app.kubernetes.io/component": "worker",
        RUN_LABEL: label_value(run_id),
        SHARD_FIRST_LABEL: str(_index(first_shard)),
        SHARD_LAST_LABEL: str(_index(last_shard)),
        ATTEMPT_LABEL: str(attempt),
    }
