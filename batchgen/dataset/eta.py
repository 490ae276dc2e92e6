"""Rate and time left of a run (and of each of its jobs), from when its sidecars were written.

One listing of the run's ``meta/`` gives every committed item's last-modified time (no read per item). The rate
is the items committed in a recent window divided by the window (or by the time since the first commit, when
the run is younger than the window); the ETA is pending items over that rate. A run that committed nothing in
the window has no ETA: it is stalled, finished or not started.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from batchgen.core import layout

DEFAULT_WINDOW_S = 900.0


@dataclass(frozen=True)
class Rate:
    committed: int
    """Items committed within the window."""
    span_s: float
    """Seconds the rate is measured over."""
    pending: int

    @property
    def items_per_hour(self) -> float:
        return 3600 * self.committed / self.span_s if self.span_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.pending == 0:
            return 0.0
        return 3600 * self.pending / self.items_per_hour if self.items_per_hour > 0 else None

    def to_dict(self) -> dict:
        eta = self.eta_s
        return {
            "committed_in_window": self.committed,
            "window_s": round(self.span_s, 1),
            "items_per_hour": round(self.items_per_hour, 2),
            "eta_s": None if eta is None else round(eta, 1),
        }

    def describe(self) -> str:
        eta = self.eta_s
        if eta is not None and self.span_s <= 0:
            return "nothing left to do"
        if self.span_s <= 0:
            return "no item committed yet; no ETA"
        left = "done" if eta == 0 else "none (nothing committed in the window)" if eta is None else clock(eta)
        return f"{self.items_per_hour:.1f} items/h over the last {self.span_s / 60:.1f} min; ETA {left}"


def clock(seconds: float) -> str:
    """``H:MM:SS`` of a duration (hours unbounded)."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def commit_times(storage, run_id: str) -> dict[str, list[float]]:
    """shard -> the last-modified times of its sidecars (one listing of the run's meta/)."""
    prefix = layout.meta_prefix(run_id)
    times: dict[str, list[float]] = {}
    for info in storage.list(prefix):
        shard, _, name = info.key[len(prefix) :].partition("/")
        if name.endswith(".json") and "/" not in name and info.modified is not None:
            times.setdefault(shard, []).append(info.modified)
    return times


def recent_rate(times: list[float], pending: int, *, window_s: float = DEFAULT_WINDOW_S, now: float | None = None):
    now = time.time() if now is None else now
    recent = [t for t in times if t >= now - window_s]
    span = min(window_s, now - min(times)) if times else 0.0
    return Rate(len(recent), span, pending)


def run_rate(times: dict[str, list[float]], progress, **kwargs) -> Rate:
    return recent_rate([t for shard_times in times.values() for t in shard_times], progress.pending, **kwargs)


def shards_rate(times: dict[str, list[float]], progress, shards: list[str], **kwargs) -> Rate:
    """Rate and ETA of a job: the items of its shards."""
    pending = sum(progress.shards[s].pending for s in shards if s in progress.shards)
    return recent_rate([t for s in shards for t in times.get(s, ())], pending, **kwargs)
