"""The job backend and the controller's decisions, through the real kubernetes client against the API emulator.

Storage progress here comes from a small stand-in scan (a set of finished shards) so each decision can be set up
directly; the end-to-end tests run the real worker and progress scan.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest

from batchgen.core import layout
from batchgen.core.errors import ClusterError, IncompleteRunError, TransientClusterError
from batchgen.core.layout import shard_id
from batchgen.core.progress import RunProgress, ShardProgress, scan_run
from batchgen.launch.k8s import names
from batchgen.launch.k8s.controller import RunController, cancel_run, describe_jobs, format_jobs, make_groups
from batchgen.launch.k8s.pytorchjob import render_pytorchjob
from batchgen.launch.k8s.settings import LaunchSettings
from batchgen.storage import open_storage
from tests._runs import all_items, plan_run, tiny_run_config

RUN = "clips-00aa11bb22cc"
SETTINGS = LaunchSettings(output="s3://bucket/out", namespace="batch", gpus_per_node=1)


@dataclass
class Plan:
    run_id: str = RUN
    shards: list[str] = field(default_factory=lambda: [shard_id(i) for i in range(5)])
    config: None = None


def scan_of(finished: set[str], plan: Plan):
    """A scan whose shards of one item each are finished as given (of all shards, or of the subset asked for)."""

    def scan(storage, plan_, shards=None) -> RunProgress:
        chosen = plan.shards if shards is None else shards
        return RunProgress(RUN, {s: ShardProgress(s, 1, done_ids={"x"} if s in finished else set()) for s in chosen})

    return scan


def set_state(kube, name: str, state: str) -> None:
    backend = kube.backend()
    backend.api.patch_namespaced_custom_object_status(
        "kubeflow.org", "v1", kube.namespace, "pytorchjobs", name,
        {"status": {"conditions": [{"type": "Created", "status": "True"}, {"type": state, "status": "True", "reason": f"PyTorchJob{state}"}]}},
    )  # fmt: skip


def job(attempt: int = 1, shards=(0,)) -> dict:
    return render_pytorchjob(RUN, [shard_id(i) for i in shards], SETTINGS, attempt)


# -- backend: error translation -------------------------------------------------------------------------------


def test_create_is_201_then_409_adopts_the_existing_job(kube):
    backend = kube.backend()
    first, created = backend.create(job())
    again, created_again = backend.create(job())
    assert (created, created_again) == (True, False)
    assert again.uid == first.uid and kube.emulator.create_count == {first.name: 1}
    assert ("get", "pytorchjobs") in kube.emulator.controller_calls()  # adoption reads the winner's job


@pytest.mark.parametrize(
    "setup, call, error, message",
    [
        (lambda e: e.deny.add(("create", "pytorchjobs")), lambda b: b.create(job()), ClusterError,
         "may not 'create' resource 'pytorchjobs' in API group 'kubeflow.org' in namespace 'batch'"),
        (lambda e: e.deny.add(("list", "pytorchjobs")), lambda b: b.list(""), ClusterError, "grant the verb 'list'"),
        (lambda e: e.deny.add(("delete", "pytorchjobs")), lambda b: b.delete("x"), ClusterError, "may not 'delete'"),
        (lambda e: setattr(e, "crd_installed", False), lambda b: b.create(job()), ClusterError,
         r"PyTorchJob API \(kubeflow.org/v1\) not installed"),
        (lambda e: setattr(e, "crd_installed", False), lambda b: b.get("x"), ClusterError, "not installed"),
        (lambda e: None, lambda b: b.create({**job(), "spec": {**job()["spec"], "nprocPerNode": 8}}), ClusterError,
         "rejected .* spec.nprocPerNode: 8 is not of type 'string'"),
        (lambda e: e.fail_next(*[503] * 3), lambda b: b.list(""), TransientClusterError, "still failing after 3 attempts: HTTP 503"),
    ],
    ids=["403-create", "403-list", "403-delete", "404-crd-create", "404-crd-get", "422", "5xx-exhausted"],
)  # fmt: skip
def test_api_errors_are_translated(kube, setup, call, error, message):
    setup(kube.emulator)
    with pytest.raises(error, match=message) as raised:
        call(kube.backend(attempts=3, max_wait_s=0.05))
    assert raised.type is error


def test_transient_errors_are_retried(kube):
    backend = kube.backend(attempts=4, max_wait_s=0.05)
    kube.emulator.fail_next(500, 503, 502)
    created, was_created = backend.create(job())
    assert was_created and backend.get(created.name).uid == created.uid


def test_get_and_delete_of_a_missing_job(kube):
    backend = kube.backend()
    assert backend.get("absent") is None and backend.delete("absent") is False


def test_list_honours_the_label_selector(kube):
    backend = kube.backend()
    backend.create(job())
    backend.create(render_pytorchjob("other-run-0123", [shard_id(0)], SETTINGS))
    jobs, version = backend.list(names.run_selector(RUN))
    assert [j.name for j in jobs] == [names.job_name(RUN, 0, 0, 1)] and int(version) > 0


def test_watch_sees_changes_and_recovers_from_410_gone(kube, caplog):
    backend = kube.backend()
    created, _ = backend.create(job())
    _, version = backend.list(names.run_selector(RUN))
    threading.Timer(0.3, set_state, (kube, created.name, "Succeeded")).start()
    event = next(iter(backend.watch(names.run_selector(RUN), version, 5)))
    assert (event.type, event.job.state) == ("MODIFIED", "Succeeded")

    kube.emulator.compact()  # the version we hold is now too old
    with caplog.at_level(logging.INFO, logger="batchgen.k8s.backend"):
        assert [e.type for e in backend.watch(names.run_selector(RUN), version, 5)] == ["RESYNC"]
    # Answered by the 410 (a timed-out watch resyncs too, logging "interrupted"): one expiry, nothing else.
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        f"watch expired (410 Gone) at resourceVersion {version}"
    ]
    _, fresh = backend.list(names.run_selector(RUN))
    threading.Timer(0.3, set_state, (kube, created.name, "Failed")).start()
    assert next(iter(backend.watch(names.run_selector(RUN), fresh, 5))).job.state == "Failed"


# -- controller decisions -------------------------------------------------------------------------------------


def controller(kube, finished=(), **kwargs) -> RunController:
    plan = Plan()
    options = {"max_jobs": 2, "shards_per_job": 2, "max_attempts": 2, **kwargs}
    return RunController(kube.backend(), None, plan, SETTINGS, scan=scan_of(set(finished), plan), **options)


def test_groups_are_a_pure_function_of_the_plan():
    groups = make_groups([shard_id(i) for i in range(5)], 2)
    assert [g.key for g in groups] == [(0, 1), (2, 3), (4, 4)]


def test_creates_at_most_max_jobs_and_skips_finished_groups(kube):
    result = controller(kube, finished={shard_id(0), shard_id(1)}).reconcile()
    assert result.created == [names.job_name(RUN, 2, 3, 1), names.job_name(RUN, 4, 4, 1)]
    assert [g.status for g in result.groups] == ["done", "running", "running"]
    # a second controller (or a restarted one) creates nothing and adopts nothing new
    again = controller(kube, finished={shard_id(0), shard_id(1)}).reconcile()
    assert again.created == [] and again.count("running") == 2
    assert kube.emulator.create_count == {n: 1 for n in result.created}


def test_max_jobs_counts_jobs_still_holding_pods(kube):
    kube.emulator.gc_delay_s = 5.0  # the deletion must outlast a reconcile pass on a loaded machine
    result = controller(kube).reconcile()
    assert result.created == [names.job_name(RUN, 0, 1, 1), names.job_name(RUN, 2, 3, 1)]
    # group 0-1 is finished in storage, so its job is deleted, but its pods are still going: no third job
    assert controller(kube, finished={shard_id(0), shard_id(1)}).reconcile().created == []
    assert kube.backend().get(names.job_name(RUN, 0, 1, 1)).deleting
    kube.emulator.wait_for_deletions()
    assert controller(kube, finished={shard_id(0), shard_id(1)}).reconcile().created == [names.job_name(RUN, 4, 4, 1)]


def test_failed_job_is_relaunched_for_its_unfinished_shards_then_given_up(kube):
    backend = kube.backend()
    controller(kube, max_jobs=1).reconcile()
    set_state(kube, names.job_name(RUN, 0, 1, 1), "Failed")
    result = controller(kube, finished={shard_id(0)}, max_jobs=1).reconcile()
    relaunch = names.job_name(RUN, 0, 1, 2)
    assert result.created == [relaunch]
    relaunched = backend.get(relaunch)
    assert relaunched.shards == [shard_id(1)] and relaunched.group == (0, 1) and relaunched.attempt == 2
    command = relaunched.raw["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--shards") + 1] == "1:2"
    set_state(kube, relaunch, "Failed")
    final = controller(kube, finished={shard_id(0)}, max_jobs=1).reconcile()
    assert final.groups[0].status == "gave-up"
    assert final.created == [names.job_name(RUN, 2, 3, 1)]  # the slot it held goes to the next group


def test_run_gives_up_with_incomplete_run_error(kube, tmp_path):
    from batchgen.storage import open_storage

    ctl = controller(kube, max_jobs=1, max_attempts=1)
    ctl.plan.shards = [shard_id(0)]
    ctl.groups = make_groups(ctl.plan.shards, 1)
    ctl.reconcile()
    set_state(kube, names.job_name(RUN, 0, 0, 1), "Failed")
    ctl.storage = open_storage(str(tmp_path))
    with pytest.raises(
        IncompleteRunError, match=r"not done after 1 attempt\(s\) of job\(s\) clips-00aa11bb22cc-0-0-a1"
    ):
        ctl.run(wait=True, finalize=lambda storage, plan: False)


def test_cancel_and_describe(kube):
    controller(kube).reconcile()
    set_state(kube, names.job_name(RUN, 0, 1, 1), "Running")
    other, _ = kube.backend().create(render_pytorchjob("other-run-0123", [shard_id(0)], SETTINGS))
    rows = describe_jobs(kube.backend(), RUN)
    assert [(r["name"], r["state"], r["shards"]) for r in rows] == [
        (names.job_name(RUN, 0, 1, 1), "Running", "shard-000000,shard-000001"),
        (names.job_name(RUN, 2, 3, 1), "Pending", "shard-000002,shard-000003"),
    ]
    assert format_jobs(rows).splitlines()[0].split() == ["JOB", "ATTEMPT", "STATE", "PODS", "SHARDS", "REASON"]
    assert sorted(cancel_run(kube.backend(), RUN)) == sorted(r["name"] for r in rows)
    # Foreground deletion: the jobs stay, terminating, until their pods are gone.
    assert all(
        j["metadata"].get("deletionTimestamp") for j in kube.emulator.jobs() if j["metadata"]["name"] != other.name
    )
    kube.emulator.wait_for_deletions()
    assert [j["metadata"]["name"] for j in kube.emulator.jobs()] == [other.name]


def set_status(kube, name: str, status: dict) -> None:
    kube.backend().api.patch_namespaced_custom_object_status(
        "kubeflow.org", "v1", kube.namespace, "pytorchjobs", name, {"status": status}
    )


def restarting(failed: int = 1) -> dict:
    return {
        "conditions": [{"type": "Restarting", "status": "True"}, {"type": "Running", "status": "False"}],
        "replicaStatuses": {"Master": {"failed": failed}},
    }


RUNNING = {
    "conditions": [{"type": "Restarting", "status": "False"}, {"type": "Running", "status": "True"}],
    "replicaStatuses": {"Master": {"active": 1, "failed": 0}},
}
# A Worker recreated while the Master keeps the job Running: only replicaStatuses shows it.
WORKER_RECREATED = {
    "conditions": [{"type": "Running", "status": "True"}],
    "replicaStatuses": {"Master": {"active": 1}, "Worker": {"failed": 1}},
}


def test_a_job_whose_pods_restart_past_the_backoff_limit_is_stopped_and_recorded(kube):
    ctl = controller(kube, max_jobs=1, shards_per_job=5)
    ctl.settings = SETTINGS.replace(backoff_limit=2)
    (name,) = ctl.reconcile().created
    for status in (restarting(), RUNNING, WORKER_RECREATED, RUNNING):
        set_status(kube, name, status)
        ctl.reconcile()
    assert ctl.restarts.restarts(kube.backend().get(name)) == 2
    assert names.ENDED_ANNOTATION not in kube.backend().get(name).annotations  # at the limit, not past it
    set_status(kube, name, restarting())  # the third restart
    ctl.reconcile()
    stopped = kube.backend().get(name)
    assert "pods restarted 3 times, more than the backoff limit 2" in stopped.annotations[names.ENDED_ANNOTATION]
    assert stopped.raw["spec"]["runPolicy"]["activeDeadlineSeconds"] == 1  # the operator fails it and frees the pods
    patches = [r for r in kube.emulator.requests if r[0] == "PATCH" and "/status" not in r[1]]
    ctl.reconcile()
    assert [r for r in kube.emulator.requests if r[0] == "PATCH" and "/status" not in r[1]] == patches  # once
    set_status(kube, name, {"conditions": [{"type": "Failed", "status": "True", "message": "deadline"}]})
    assert ctl.reconcile().created == [names.job_name(RUN, 0, 4, 2)]  # the stop counts as a failed attempt
    assert "pods restarted 3 times" in kube.backend().get(name).reason()


def test_restarts_seen_only_by_the_watch_are_counted(kube):
    ctl = controller(kube, max_jobs=1, shards_per_job=5, resync_s=1)
    (name,) = ctl.reconcile().created
    threading.Timer(0.3, lambda: [set_status(kube, name, s) for s in (restarting(), RUNNING) * 2]).start()
    deadline = time.monotonic() + 10
    while ctl.restarts.restarts(kube.backend().get(name)) < 2 and time.monotonic() < deadline:
        ctl._wait_for_change()
    assert ctl.restarts.restarts(kube.backend().get(name)) == 2  # a listing now shows Running only


def test_the_restart_count_survives_a_controller_restart(kube):
    """The count is recorded on the job, so a new controller goes on from it: two restarts seen by the first
    controller and one by the second stop the job past a limit of 2 (in memory alone the second would start at 0
    and let the job run on to its deadline)."""
    first = controller(kube, max_jobs=1, shards_per_job=5)
    first.settings = SETTINGS.replace(backoff_limit=2)
    (name,) = first.reconcile().created
    for status in (restarting(), RUNNING, WORKER_RECREATED):
        set_status(kube, name, status)
        first.reconcile()
    assert kube.backend().get(name).annotations[names.RESTARTS_ANNOTATION] == "2"
    second = controller(kube, max_jobs=1, shards_per_job=5)
    second.settings = first.settings
    second.reconcile()  # first sight: WORKER_RECREATED's failed pod was the first controller's, not counted again
    assert second.restarts.restarts(kube.backend().get(name)) == 2
    assert names.ENDED_ANNOTATION not in kube.backend().get(name).annotations
    set_status(kube, name, restarting(failed=2))
    second.reconcile()
    stopped = kube.backend().get(name)
    assert "pods restarted 3 times" in stopped.annotations[names.ENDED_ANNOTATION]
    assert stopped.annotations[names.RESTARTS_ANNOTATION] == "3"


def test_a_mangled_restart_count_counts_from_the_status(kube):
    ctl = controller(kube, max_jobs=1, shards_per_job=5)
    (name,) = ctl.reconcile().created
    kube.backend().annotate(name, {names.RESTARTS_ANNOTATION: "many"})
    set_status(kube, name, restarting())
    ctl = controller(kube, max_jobs=1, shards_per_job=5)
    ctl.reconcile()
    assert kube.backend().get(name).annotations[names.RESTARTS_ANNOTATION] == "1"


def test_patching_a_job_deleted_meanwhile_is_not_an_error(kube, caplog):
    backend = kube.backend()
    gone, _ = backend.create(job())
    backend.delete(gone.name)
    kube.emulator.wait_for_deletions()
    with caplog.at_level(logging.INFO, logger="batchgen.k8s.backend"):
        backend.annotate(gone.name, {names.RESTARTS_ANNOTATION: "1"})
        backend.end(gone.name, "test")
    assert f"{gone.name} is gone; not patching it" in caplog.text
    assert backend.get(gone.name) is None


# -- a real API server's behaviour ------------------------------------------------------------------------------


def _post(kube, body: dict, query: str = "") -> tuple[int, dict, list[str]]:
    """A create with a bare HTTP client, to see what the server answers without the controller's choices."""
    request = urllib.request.Request(
        f"{kube.emulator.url}/apis/kubeflow.org/v1/namespaces/{kube.namespace}/pytorchjobs{query}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer emulator-token"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.load(response), response.headers.get_all("Warning") or []
    except urllib.error.HTTPError as e:
        return e.code, json.load(e), []


def test_unknown_fields_are_refused_by_the_controller_and_dropped_by_a_server_left_to_its_default(kube):
    misspelled = job()
    misspelled["spec"]["runPolicy"]["backofLimit"] = 2
    with pytest.raises(
        ClusterError, match=r'rejected .*strict decoding error: unknown field "spec.runPolicy.backofLimit"'
    ):
        kube.backend().create(misspelled)
    assert kube.emulator.jobs() == []
    # Without fieldValidation the server warns and drops the field; with Ignore it drops it silently.
    code, created, warnings = _post(kube, misspelled)
    assert code == 201 and "backofLimit" not in created["spec"]["runPolicy"]
    assert warnings == ['299 - "unknown field \\"spec.runPolicy.backofLimit\\""']
    other = {**misspelled, "metadata": {**misspelled["metadata"], "name": "ignored-0-0-a1"}}
    code, created, warnings = _post(kube, other, "?fieldValidation=Ignore")
    assert (code, warnings) == (201, []) and "backofLimit" not in created["spec"]["runPolicy"]


def test_lists_are_paged_and_an_expired_continue_token_lists_again(kube, monkeypatch):
    from batchgen.launch.k8s import client as backend_module

    monkeypatch.setattr(backend_module, "LIST_PAGE", 2)
    backend = kube.backend()
    for i in range(5):
        backend.create(job(shards=(i,)))
    jobs, version = backend.list(names.run_selector(RUN))
    assert [j.name for j in jobs] == [names.job_name(RUN, i, i, 1) for i in range(5)]
    pages = [path for method, path in kube.emulator.requests if method == "GET" and "limit=2" in path]
    assert len(pages) == 3 and sum("continue=" in p for p in pages) == 2

    pages_seen = []
    list_page = backend.api.list_namespaced_custom_object

    def compacting_after_the_first_page(*args, **kwargs):
        pages_seen.append(kwargs.get("_continue"))
        result = list_page(*args, **kwargs)
        if len(pages_seen) == 1:
            # A write, then etcd compaction: the token just handed out is now too old, 410 on the next page.
            backend.create(render_pytorchjob("other-run-0123", [shard_id(0)], SETTINGS))
            kube.emulator.compact()
        return result

    monkeypatch.setattr(backend.api, "list_namespaced_custom_object", compacting_after_the_first_page)
    jobs, _ = backend.list(names.run_selector(RUN))
    # page 1, page 2 refused with 410, then from the start again: three pages
    assert len(jobs) == 5 and pages_seen[0] is None and pages_seen[1] and pages_seen[2] is None
    assert len(pages_seen) == 5


def test_429_waits_for_retry_after(kube):
    backend = kube.backend(attempts=3, max_wait_s=0.05)
    kube.emulator.throttle(1, retry_after_s=1)
    started = time.monotonic()
    assert backend.list("") == ([], backend.list("")[1])
    assert time.monotonic() - started >= 1.0  # the server's Retry-After, not the 0.05 s backoff


def test_namespace_comes_from_the_kubeconfig_context(kube, tmp_path):
    from batchgen.launch.k8s.client import context_namespace

    assert context_namespace(str(kube.kubeconfig)) == "batch"
    bare = kube.emulator.write_kubeconfig(tmp_path / "bare", namespace=None)
    assert context_namespace(str(bare)) == "default"
    with pytest.raises(ClusterError, match="no context 'elsewhere'"):
        context_namespace(str(kube.kubeconfig), "elsewhere")


def test_jobs_of_done_groups_are_deleted_once(kube):
    ctl = controller(kube, max_jobs=3)
    first, second, third = ctl.reconcile().created
    ctl._scan = scan_of({shard_id(0), shard_id(1), shard_id(2), shard_id(3)}, ctl.plan)
    set_state(kube, first, "Succeeded")  # the second is done in storage too, its pods only exiting
    ctl.reconcile()
    deletes = [path for method, path in kube.emulator.requests if method == "DELETE"]
    assert [p.rsplit("/", 1)[-1].split("?")[0] for p in deletes] == [first, second]
    ctl.reconcile()  # terminating: not deleted again
    assert [path for method, path in kube.emulator.requests if method == "DELETE"] == deletes
    kube.emulator.wait_for_deletions()
    assert [j["metadata"]["name"] for j in kube.emulator.jobs()] == [third]


# -- storage work per pass, against a plan on moto S3 ---------------------------------------------------------


@pytest.fixture
def s3_run(s3_uri, tmp_path, tiny_config, monkeypatch):
    """Ten shards of one item on S3, listed two keys a page so that a listing's cost shows how many keys it read."""
    monkeypatch.setattr("batchgen.storage.s3.LIST_PAGE_SIZE", 2)
    monkeypatch.setattr("batchgen.core.progress.LIST_PAGE", 2)
    storage = open_storage(s3_uri)
    plan = plan_run(storage, tmp_path, 10, tiny_run_config(tiny_config, shard_size=1))
    return storage, plan, {shard: item_id for item_id, (shard, _) in all_items(storage, plan).items()}


def recording(scans: list):
    def scan(storage, plan, shards=None):
        scans.append(None if shards is None else list(shards))
        return scan_run(storage, plan, shards)

    return scan


def finish_running_jobs(kube, storage, plan, item_of) -> None:
    """What the cluster does between passes: each running job writes its shards' sidecars and stats, succeeds."""
    for running in [j for j in kube.backend().list(names.run_selector(plan.run_id))[0] if not j.finished]:
        for shard in running.shards:
            storage.put_bytes(layout.sidecar_key(plan.run_id, shard, item_of[shard]), b"{}")
            storage.put_bytes(layout.stats_key(plan.run_id, shard), b"{}")
        set_state(kube, running.name, "Succeeded")


def test_storage_requests_per_pass_do_not_grow_with_finished_groups(kube, s3_run):
    storage, plan, item_of = s3_run
    scans: list = []
    settings = LaunchSettings(output=storage.uri, namespace="batch", gpus_per_node=1)
    ctl = RunController(kube.backend(), storage, plan, settings, max_jobs=2, max_attempts=1, scan=recording(scans))
    requests, done = [], []
    while True:
        before = storage.request_count
        state = ctl.reconcile()
        requests.append(storage.request_count - before)
        done.append(state.count("done"))
        if state.settled:
            break
        finish_running_jobs(kube, storage, plan, item_of)
    assert done == [0, 2, 4, 6, 8, 10]
    partial = requests[1:]
    # stats/, meta/ and errors/ of the unfinished shards' key range: one page each, however many groups are done
    assert partial == [3] * len(partial), requests
    assert scans[0] is None and all(shards is not None for shards in scans[1:])  # one full scan, on the first pass
    before = storage.request_count
    scan_run(storage, plan)  # what every pass cost before: the whole run
    assert storage.request_count - before > 3 + 2 * 3  # 10 sidecars and 10 stats at 2 keys a page


def test_a_full_scan_precedes_finalising_and_catches_a_removed_sidecar(kube, s3_run):
    storage, plan, item_of = s3_run
    scans: list = []
    settings = LaunchSettings(output=storage.uri, namespace="batch", gpus_per_node=1)
    ctl = RunController(kube.backend(), storage, plan, settings, max_jobs=10, max_attempts=2, scan=recording(scans))
    ctl.reconcile()
    finish_running_jobs(kube, storage, plan, item_of)
    # verify --repair removes a sidecar of a shard the controller saw finished; the next pass finds it settled
    ctl.reconcile()
    # That pass deleted the finished groups' jobs; once they are gone a relaunch starts again at attempt 1.
    kube.emulator.wait_for_deletions()
    repaired = plan.shards[3]
    storage.delete(layout.sidecar_key(plan.run_id, repaired, item_of[repaired]))
    finalized = []
    state = ctl.run(wait=False, finalize=lambda storage_, plan_: finalized.append(list(scans)) or True)
    assert scans[-2:] == [[], None]  # nothing left to scan on remembered progress, then the whole run from storage
    assert finalized == [] and [g.status for g in state.groups if g.pending] == ["running"]
    assert state.created == [names.job_name(plan.run_id, 3, 3, 1)]

    finish_running_jobs(kube, storage, plan, item_of)
    assert ctl.run(wait=True, finalize=lambda storage_, plan_: finalized.append(list(scans)) or True).settled
    assert len(finalized) == 1 and finalized[0][-1] is None  # the pass before finalising scanned the whole run
