"""The run controller: shards -> jobs (TrainJobs or PyTorchJobs, whichever the backend launches), watched and relaunched until every shard is done.

State lives in two places and nowhere else: which items are done comes from storage (``scan_run``), which jobs
exist comes from the API server (by label). The controller keeps nothing in memory that a restart would need, so
``batchgen submit`` can be killed and rerun, or run twice at once, and converge on the same jobs:

- shards are grouped into jobs by a pure function of the plan (``shards_per_job`` consecutive shards), and a
  group's job for attempt N has a fixed name (``names.job_name``), so two controllers creating it collide on 409
  and both adopt the one that won;
- a group whose shards are all finished in storage gets no new job, whatever the cluster says;
- a group whose latest job failed (or succeeded with shards still unfinished, e.g. items that failed
  permanently) is relaunched as attempt N+1 for its unfinished shards only, up to ``max_attempts``;
- at most ``max_jobs`` jobs run at once;
- a group's jobs are deleted once storage shows all its shards finished (a pod still running then is only
  exiting): the run's record is in storage, and each pass lists only the jobs of groups still in progress or
  given up, however many groups are done;
- a job whose pods restart more than ``settings.backoff_limit`` times is stopped (``backend.end``), so it ends
  as Failed and counts as an attempt. The v1 operator recreates a pod that exited >= 128 (or failed in an init
  container) without counting it against ``backoffLimit``, so without this such a job would retry until its
  ``activeDeadlineSeconds``. Restarts are counted from what the job's status shows (see ``RestartCounter``)
  and recorded on the job (``names.RESTARTS_ANNOTATION``), so a restarted controller goes on from that count.

Storage work per pass follows the shards still in progress, not the finished ones: the first pass scans the whole
run, later passes scan only the shards not yet seen finished (``scan_run`` with a subset) and reuse the progress
remembered for the others. Remembering is safe within one controller process because a shard's sidecars only
appear: the only thing that removes one is ``batchgen verify --repair``, which finalises the run itself. Even so,
a pass that finds the run settled is repeated with a full scan before the run is finalised, so a sidecar removed
meanwhile gets its group relaunched rather than left out. A restarted controller starts with a full scan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batchgen.core import metrics
from batchgen.core.errors import IncompleteRunError
from batchgen.core.layout import shard_index
from batchgen.launch.k8s import names
from batchgen.launch.k8s.client import JobBackend, JobInfo
from batchgen.launch.k8s.settings import LaunchSettings
from batchgen.storage.base import Storage

log = logging.getLogger("batchgen.k8s.controller")


@dataclass(frozen=True)
class Group:
    """Consecutive shards that one job (and its relaunches) covers."""

    shards: tuple[str, ...]

    @property
    def key(self) -> tuple[int, int]:
        return shard_index(self.shards[0]), shard_index(self.shards[-1])

    @property
    def range(self) -> tuple[str, str]:
        return self.shards[0], self.shards[-1]


@dataclass
class GroupState:
    group: Group
    pending: list[str]
    latest: JobInfo | None
    status: str
    """done | running | launch | gave-up"""


@dataclass
class Reconciled:
    """One reconciliation pass: what it found and what it did."""

    groups: list[GroupState] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    done_items: int = 0
    total_items: int = 0
    failed_items: int = 0
    full_scan: bool = False
    """Progress came from a scan of the whole run (not partly from shards remembered as finished)."""

    def count(self, status: str) -> int:
        return sum(1 for g in self.groups if g.status == status)

    @property
    def settled(self) -> bool:
        """Nothing is running and nothing more will be launched."""
        return all(g.status in ("done", "gave-up") for g in self.groups)

    def summary(self) -> str:
        return (
            f"items {self.done_items}/{self.total_items} done; jobs: {self.count('running')} running, "
            f"{self.count('launch')} waiting, {self.count('done')} groups done, {self.count('gave-up')} gave up"
        )


@dataclass
class _Seen:
    restarting: bool = False
    failed_pods: int = 0
    restarts: int = 0


class RestartCounter:
    """Pod recreations of each job, counted from its status as the controller sees it change.

    The v1 operator exposes no restart count. Each recreation shows either as the Restarting condition turning
    True (ReconcilePods sets it when it deletes a retryable pod) or, when another replica keeps the job Running
    in the same status update, as ``replicaStatuses.*.failed`` rising (the deleted pod is still counted failed in
    that update and gone by the next). training-operator pkg/controller.v1/common/pod.go, ReconcilePods.

    A job first seen with a recorded count (``names.RESTARTS_ANNOTATION``, written by an earlier controller)
    starts from it, and what its status shows then is taken as already counted: a controller killed between
    seeing a restart and recording it loses that one, but none is counted twice.
    """

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}

    def observe(self, job: JobInfo) -> int:
        restarting, failed = job.state == "Restarting", job.failed_pods
        if job.uid not in self._seen and (recorded := recorded_restarts(job)):
            self._seen[job.uid] = _Seen(restarting, failed, recorded)
            log.info("job %s: going on from the %d pod restart(s) recorded on it", job.name, recorded)
        seen = self._seen.setdefault(job.uid, _Seen())
        if not job.finished and ((restarting and not seen.restarting) or failed > seen.failed_pods):
            seen.restarts += 1
        seen.restarting, seen.failed_pods = restarting, failed
        return seen.restarts

    def restarts(self, job: JobInfo) -> int:
        seen = self._seen.get(job.uid)
        return seen.restarts if seen else 0


def recorded_restarts(job: JobInfo) -> int:
    """The restart count recorded on the job by a controller (0 if none, or if the annotation was mangled)."""
    value = job.annotations.get(names.RESTARTS_ANNOTATION, "0")
    return int(value) if value.isdigit() else 0


def make_groups(shards: list[str], shards_per_job: int) -> list[Group]:
    if shards_per_job < 1:
        raise ValueError(f"shards_per_job must be >= 1, got {shards_per_job}")
    return [Group(tuple(shards[i : i + shards_per_job])) for i in range(0, len(shards), shards_per_job)]


class RunController:
    def __init__(
        self,
        backend: JobBackend,
        storage: Storage,
        plan: Any,
        settings: LaunchSettings,
        *,
        max_jobs: int = 4,
        shards_per_job: int = 1,
        max_attempts: int = 3,
        resync_s: int = 30,
        scan: Callable[..., Any] | None = None,
    ):
        from batchgen.core.progress import scan_run

        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.backend = backend
        self.storage = storage
        self.plan = plan
        self.settings = settings
        self.max_jobs = max_jobs
        self.max_attempts = max_attempts
        self.resync_s = resync_s
        self.groups = make_groups(list(plan.shards), shards_per_job)
        self.selector = names.run_selector(plan.run_id)
        self._scan = scan or scan_run
        self._finished: dict[str, Any] = {}
        """Progress of the shards seen finished (every item has its sidecar), from earlier passes."""
        self._scanned_fully = False
        self._resource_version = ""
        self.restarts = RestartCounter()

    def _jobs_by_group(self) -> dict[tuple[int, int], list[JobInfo]]:
        jobs, self._resource_version = self.backend.list(self.selector)
        by_group: dict[tuple[int, int], list[JobInfo]] = {}
        for job in jobs:
            # The selector's label value may be a hashed form of the run id: the annotation is exact.
            if job.annotations.get(names.RUN_ANNOTATION, self.plan.run_id) != self.plan.run_id or job.group is None:
                continue
            by_group.setdefault(job.group, []).append(job)
            self._count_restarts(job)
        for group_jobs in by_group.values():
            group_jobs.sort(key=lambda j: j.attempt)
        return by_group

    def _progress(self, full: bool) -> Any:
        """The run's progress: a full scan, or a scan of the shards not seen finished plus the remembered ones."""
        if full:
            progress = self._scan(self.storage, self.plan)
            self._scanned_fully = True
        else:
            unfinished = [s for s in self.plan.shards if s not in self._finished]
            progress = self._scan(self.storage, self.plan, unfinished)
            progress.shards = {s: self._finished.get(s) or progress.shards[s] for s in self.plan.shards}
        self._finished = {name: shard for name, shard in progress.shards.items() if shard.finished}
        return progress

    def reconcile(self, *, full: bool = False) -> Reconciled:
        """Compare storage with the cluster once and create the jobs that are missing (at most max_jobs running).

        The first pass, and one with ``full``, scans the whole run; the others only the shards not seen finished.
        """
        full = full or not self._scanned_fully
        progress = self._progress(full)
        finished = progress.finished_shards
        by_group = self._jobs_by_group()
        result = Reconciled(
            done_items=progress.done, total_items=progress.total, failed_items=progress.failed, full_scan=full
        )
        for group in self.groups:
            pending = [s for s in group.shards if s not in finished]
            jobs = by_group.get(group.key, [])
            latest = jobs[-1] if jobs else None
            if not pending:
                status = "done"
                self._delete(jobs)
            elif latest is not None and not latest.finished:
                status = "running"
            elif latest is not None and latest.attempt >= self.max_attempts:
                status = "gave-up"
            else:
                status = "launch"
            result.groups.append(GroupState(group, pending, latest, status))
        for state in result.groups:
            if state.status == "running" and state.latest is not None:
                self._end_if_restarting_too_often(state.latest)
        # A job whose shards are already finished in storage may still hold its pods for a moment (the Master
        # writes the last stats, then exits; a deleted job's pods take a while to go): it counts against max_jobs
        # until it finished or is gone.
        live = sum(1 for g in result.groups if g.latest is not None and not g.latest.finished)
        slots = self.max_jobs - live
        for state in result.groups:
            if state.status != "launch" or slots <= 0:
                continue
            attempt = state.latest.attempt + 1 if state.latest else 1
            if state.latest is not None:
                log.warning(
                    "job %s %s (%s); relaunching shards %s as attempt %d",
                    state.latest.name, state.latest.state.lower(), state.latest.reason() or "no reason given",
                    ",".join(state.pending), attempt,
                )  # fmt: skip
            manifest = self.backend.render(self.plan, state.pending, self.settings, attempt, group=state.group.range)
            job, created = self.backend.create(manifest)
            (result.created if created else result.adopted).append(job.name)
            if created:
                log.info("created job %s for shards %s", job.name, ",".join(state.pending))
            state.latest, slots = job, slots - 1
            state.status = "running" if not job.finished else "launch"
        return result

    def _delete(self, jobs: list[JobInfo]) -> None:
        for job in jobs:
            if not job.deleting:
                log.info("job %s (%s): its shards are done, deleting it", job.name, job.state.lower())
                self.backend.delete(job.name)

    def _count_restarts(self, job: JobInfo) -> None:
        count = self.restarts.observe(job)
        if count > recorded_restarts(job) and not job.deleting:
            # A watch event older than the last patch may ask again: the same value, patched twice, is harmless.
            self.backend.annotate(job.name, {names.RESTARTS_ANNOTATION: str(count)})

    def _over_restart_limit(self, job: JobInfo) -> bool:
        return self.restarts.restarts(job) > self.settings.backoff_limit and not job.finished

    def _end_if_restarting_too_often(self, job: JobInfo) -> None:
        if not self._over_restart_limit(job) or names.ENDED_ANNOTATION in job.annotations:
            return
        why = (
            f"batchgen stopped the job: its pods restarted {self.restarts.restarts(job)} times, more than the "
            f"backoff limit {self.settings.backoff_limit}"
        )
        log.warning("job %s: %s", job.name, why)
        self.backend.end(job.name, why)

    def run(
        self,
        *,
        wait: bool,
        deadline_s: float | None = None,
        finalize: Callable[[Storage, Any], bool] | None = None,
    ) -> Reconciled:
        """Reconcile; with ``wait``, keep reconciling on every job change until settled, then finalize.

        Returns the last pass. Raises IncompleteRunError when groups gave up and items are missing.
        """
        if finalize is None:
            from batchgen.dataset.index import finalize_run

            finalize = finalize_run

        started = time.monotonic()
        while True:
            state = self.reconcile()
            if state.settled and not state.full_scan:
                # Settled on remembered progress: confirm from storage before finalising (see the module's doc).
                state = self.reconcile(full=True)
            metrics.controller_pass(state)
            log.info("%s: %s", self.plan.run_id, state.summary())
            if state.settled:
                break
            if not wait:
                return state
            if deadline_s is not None and time.monotonic() - started > deadline_s:
                return state
            self._wait_for_change()
        complete = finalize(self.storage, self.plan)
        if complete:
            log.info("run %s complete: index and success marker written", self.plan.run_id)
            return state
        gave_up = [g for g in state.groups if g.status == "gave-up"]
        raise IncompleteRunError(
            f"run {self.plan.run_id}: {state.total_items - state.done_items} item(s) not done after "
            f"{self.max_attempts} attempt(s) of job(s) {', '.join(g.latest.name for g in gave_up if g.latest)}; "
            "the index lists what was done; rerun submit with a higher --max-attempts to retry"
        )

    def _wait_for_change(self) -> None:
        """Block until a job of the run changes (or resync_s passes: storage progress has no events)."""
        for event in self.backend.watch(self.selector, self._resource_version, self.resync_s):
            if event.type == "RESYNC" or event.job is None:
                return
            # Every status change is counted, including restarts that a later listing would no longer show.
            self._count_restarts(event.job)
            if event.job.finished or event.type == "DELETED" or self._over_restart_limit(event.job):
                return


def cancel_run(backend: JobBackend, run_id: str) -> list[str]:
    """Delete every job of the run (the operator then deletes their pods). Returns the deleted names."""
    jobs, _ = backend.list(names.run_selector(run_id))
    deleted = []
    for job in jobs:
        if job.annotations.get(names.RUN_ANNOTATION, run_id) != run_id:
            continue
        if backend.delete(job.name):
            deleted.append(job.name)
    return deleted


def describe_jobs(backend: JobBackend, run_id: str) -> list[dict[str, Any]]:
    """One row per job of the run, for ``batchgen status --namespace``: name, attempt, shards, state, reason."""
    jobs, _ = backend.list(names.run_selector(run_id))
    rows = []
    for job in sorted(jobs, key=lambda j: (j.group or (0, 0), j.attempt)):
        if job.annotations.get(names.RUN_ANNOTATION, run_id) != run_id:
            continue
        rows.append(
            {
                "name": job.name,
                "attempt": job.attempt,
                "shards": ",".join(job.shards),
                "state": job.state,
                "reason": job.reason(),
                "active_pods": job.active_pods,
            }
        )
    return rows


def format_jobs(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no jobs"
    header = ("JOB", "ATTEMPT", "STATE", "PODS", "SHARDS", "REASON")
    table = [header] + [
        (r["name"], str(r["attempt"]), r["state"], str(r["active_pods"]), r["shards"], r["reason"]) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table)
