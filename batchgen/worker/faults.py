"""Test hook: ``BATCHGEN_FAULT="<point>:<target>"`` makes the worker process SIGKILL itself (a real kill -9) at
``generate`` (an item was generated, nothing of it written), ``after_video`` (video written, sidecar not) or
``during_stats`` (every item committed, stats not written). The target is an item id (a shard id for
``during_stats``) or ``*`` for the first occasion. Crash-safety tests use it; it has no other purpose.
"""

from __future__ import annotations

import logging
import os
import signal

from batchgen.core.errors import InputError

log = logging.getLogger("batchgen.worker")

FAULT_ENV = "BATCHGEN_FAULT"
FAULT_POINTS = ("generate", "after_video", "during_stats")


def fault(point: str, target: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want_point, _, want_target = spec.partition(":")
    if want_point not in FAULT_POINTS:
        raise InputError(f"{FAULT_ENV}={spec!r}: point must be one of {', '.join(FAULT_POINTS)}")
    if want_point == point and want_target in ("*", target):
        log.warning("%s=%s: killing this process (pid %d) with SIGKILL", FAULT_ENV, spec, os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
