"""The node agent's parts that need no API server: $(VAR) expansion, env resolution, argv, phase and conditions,
mount order, /etc/hosts, and a pod worker driven by a host that records statuses instead of patching them."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.kube.node_env import (
    ContainerConfigError,
    EnvSources,
    Image,
    container_argv,
    expand,
    image_from_dockerfile,
    master_service_env,
    resolve_env,
    run_console_scripts_from_checkout,
)
from tools.kube.node_pod import PodWorker, exit_code, grace_period
from tools.kube.node_status import ContainerRecord, PodView, get_phase, pod_status
from tools.kube.node_volumes import Mount, decode_data, dns_names, hosts_file, order_mounts

REPO = Path(__file__).resolve().parents[1]

# kubernetes third_party/forked/golang/expansion/expand_test.go doExpansionTest: (input, expected).
EXPANSION_CASES = [
    ("$(VAR_A)", "A"),
    ("$(VAR_A)-$(VAR_A)", "A-A"),
    ("$(VAR_A)-1", "A-1"),
    ("___$(VAR_B)___", "___B___"),
    ("___$(VAR_C)", "___C"),
    ("$(VAR_A)_$(VAR_B)_$(VAR_C)", "A_B_C"),
    ("$$(VAR_B)_$(VAR_A)", "$(VAR_B)_A"),
    ("$$(VAR_A)_$$(VAR_B)", "$(VAR_A)_$(VAR_B)"),
    ("f000-$$VAR_A", "f000-$VAR_A"),
    ("foo\\$(VAR_C)bar", "foo\\Cbar"),
    ("foo\\\\$(VAR_C)bar", "foo\\\\Cbar"),
    ("foo\\\\\\\\$(VAR_A)bar", "foo\\\\\\\\Abar"),
    ("$(VAR_A$(VAR_B))", "$(VAR_A$(VAR_B))"),
    ("$(VAR_A$(VAR_B)", "$(VAR_A$(VAR_B)"),
    ("$(VAR_REF)", "$(VAR_A)"),
    ("%%$(VAR_REF)--$(VAR_REF)%%", "%%$(VAR_A)--$(VAR_A)%%"),
    ("foo$(VAR_EMPTY)bar", "foobar"),
    ("foo$(VAR_Awhoops!", "foo$(VAR_Awhoops!"),
    ("f00__(VAR_A)__", "f00__(VAR_A)__"),
    ("$?_boo_$!", "$?_boo_$!"),
    ("$VAR_A", "$VAR_A"),
    ("$(VAR_DNE)", "$(VAR_DNE)"),
    ("$$$$$$(BIG_MONEY)", "$$$(BIG_MONEY)"),
    ("$$$$$$(VAR_A)", "$$$(VAR_A)"),
    ("$$$$$$$(GOOD_ODDS)", "$$$$(GOOD_ODDS)"),
    ("$$$$$$$(VAR_A)", "$$$A"),
    ("$VAR_A)", "$VAR_A)"),
    ("${VAR_A}", "${VAR_A}"),
    ("$(VAR_B)_______$(A", "B_______$(A"),
    ("$(VAR_C)_______$(", "C_______$("),
    ("$(VAR_A)foobarzab$", "Afoobarzab$"),
    ("foo-\\$(VAR_A", "foo-\\$(VAR_A"),
    ("--$($($($($--", "--$($($($($--"),
    ("$($($($($--foo$(", "$($($($($--foo$("),
    ("foo0--$($($($(", "foo0--$($($($("),
    ("$(foo$$var)", "$(foo$$var)"),
    ("\n", "\n"),
]


@pytest.mark.parametrize("text, expected", EXPANSION_CASES)
def test_expand_as_the_kubelet(text, expected):
    single = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": ""}
    assert expand(text, single) == expected
    # TestMappingDual: the same answers with the variables split over two contexts
    assert (
        expand(text, {"VAR_A": "A", "VAR_EMPTY": ""}, {"VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)"}) == expected
    )


def _pod(container: dict, **spec) -> dict:
    return {
        "metadata": {
            "name": "job-0-abc",
            "namespace": "team",
            "uid": "1234-uid",
            "labels": {"b": "2", "a": 'q"uote'},
            "annotations": {"batch.kubernetes.io/job-completion-index": "3"},
        },
        "spec": {"nodeName": "node-a", "serviceAccountName": "runner", "containers": [container], **spec},
        "status": {"phase": "Pending"},
    }


def _sources(config_maps=None, secrets=None) -> EnvSources:
    config_maps, secrets = config_maps or {}, secrets or {}
    return EnvSources(
        config_map=config_maps.get,
        secret=secrets.get,
        pod_ip="127.0.0.1",
        host_ip="127.0.0.2",
        allocatable={"cpu": "16", "memory": "64Gi"},
        service_env=master_service_env("127.0.0.1", 6443),
    )


def test_env_every_source_in_the_kubelets_order():
    container = {
        "name": "main",
        "resources": {"limits": {"cpu": "1500m", "memory": "2Gi"}, "requests": {"memory": "1Gi"}},
        "envFrom": [
            {"configMapRef": {"name": "settings"}, "prefix": "CFG_"},
            {"secretRef": {"name": "creds"}},
            {"configMapRef": {"name": "absent", "optional": True}},
        ],
        "env": [
            {"name": "PLAIN", "value": "x-$(CFG_MODE)-$(KUBERNETES_SERVICE_PORT)-$(LATER)"},
            {"name": "LATER", "value": "later"},
            {"name": "USER", "value": "overrides-envFrom"},
            {"name": "KEY", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "MODE"}}},
            {"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "PASSWORD"}}},
            {"name": "SKIPPED", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope", "optional": True}}},
            {"name": "INDEX", "valueFrom": {"fieldRef": {"fieldPath": _INDEX_PATH}}},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {"name": "LABELS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}},
            {"name": "LABEL_B", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['b']"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "0"}}},
            {"name": "CPU_MILLI", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
            {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}}},
            {"name": "KUBERNETES_SERVICE_HOST", "value": "set-by-pod"},
        ],
    }
    env = resolve_env(
        _pod(container),
        container,
        _sources({"settings": {"MODE": "fast", "LEVEL": "2"}}, {"creds": {"PASSWORD": "s3cret", "USER": "u"}}),
    )
    assert env["CFG_MODE"] == "fast" and env["CFG_LEVEL"] == "2" and "MODE" not in env
    assert env["PLAIN"] == "x-fast-6443-$(LATER)"  # a later variable is not yet defined
    assert env["USER"] == "overrides-envFrom" and env["PASS"] == "s3cret" and env["KEY"] == "fast"
    assert "SKIPPED" not in env
    assert (env["INDEX"], env["NAME"], env["NS"], env["UID"]) == ("3", "job-0-abc", "team", "1234-uid")
    assert env["LABELS"] == 'a="q\\"uote"\nb="2"' and env["LABEL_B"] == "2"
    assert (env["NODE"], env["SA"], env["POD_IP"], env["HOST_IP"]) == ("node-a", "runner", "127.0.0.1", "127.0.0.2")
    assert (env["CPU_LIMIT"], env["CPU_MILLI"], env["MEM_MI"]) == ("2", "1500", "1024")
    assert env["KUBERNETES_SERVICE_HOST"] == "set-by-pod"
    assert env["KUBERNETES_SERVICE_PORT"] == "6443" and env["KUBERNETES_PORT"] == "tcp://127.0.0.1:6443"


_INDEX_PATH = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_env_limits_default_to_node_allocatable():
    container = {
        "name": "main",
        "env": [{"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Gi"}}}],
    }
    assert resolve_env(_pod(container), container, _sources())["MEM"] == "64"


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "X", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}, "secret team/gone not found"),
        ({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "k"}}}, "couldn't find key k"),
        ({"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nope"}}}, "unsupported fieldRef"),
    ],
)
def test_env_missing_source_is_a_config_error(entry, message):
    container = {"name": "main", "env": [entry]}
    with pytest.raises(ContainerConfigError, match=message):
        resolve_env(_pod(container), container, _sources({"settings": {"MODE": "fast"}}))


def test_argv_from_command_args_and_the_projects_image():
    image = image_from_dockerfile(REPO / "Dockerfile", {})
    assert (image.entrypoint, image.cmd, image.workdir) == (["batchgen"], ["--help"], "/tmp")
    env = {"RUN": "r1"}
    assert container_argv({"name": "c", "command": ["python", "-c"], "args": ["$(RUN)"]}, env, image) == [
        "python",
        "-c",
        "r1",
    ]
    assert container_argv({"name": "c", "args": ["submit", "$(RUN)"]}, env, image) == ["batchgen", "submit", "r1"]
    assert container_argv({"name": "c"}, env, image) == ["batchgen", "--help"]
    with pytest.raises(ContainerConfigError, match="no command"):
        container_argv({"name": "c"}, env, Image())


def test_the_projects_console_script_runs_the_checkouts_entry_point(tmp_path):
    image = run_console_scripts_from_checkout(
        image_from_dockerfile(REPO / "Dockerfile", {}), REPO / "pyproject.toml", sys.executable
    )
    argv = container_argv({"name": "c", "args": ["--version"]}, {}, image)
    assert argv[:2] == [sys.executable, "-c"] and argv[3:] == ["--version"]
    done = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("batchgen "), done.stdout + done.stderr
    other = Image(entrypoint=["python"], cmd=["-V"])
    assert run_console_scripts_from_checkout(other, REPO / "pyproject.toml", sys.executable) is other


def test_decode_data_reads_binary_and_secret_values():
    assert decode_data({"data": {"a": "x"}, "binaryData": {"b": base64.b64encode(b"\0").decode()}}, secret=False) == {
        "a": b"x",
        "b": b"\0",
    }
    assert decode_data({"data": {"p": base64.b64encode(b"pw").decode()}}, secret=True) == {"p": b"pw"}


# -- phase and conditions ---------------------------------------------------------------------------------------


def _record(name, state="terminated", code=0, init=False) -> ContainerRecord:
    record = ContainerRecord(name, "img", init=init)
    if state != "waiting":
        record.start("id")
    if state == "terminated":
        record.terminate(code)
    return record


@pytest.mark.parametrize(
    "policy, init_code, main, phase",
    [
        ("Never", 1, None, "Failed"),
        ("OnFailure", 1, None, "Pending"),
        ("Never", 0, ("running", 0), "Running"),
        ("Never", 0, ("terminated", 0), "Succeeded"),
        ("Never", 0, ("terminated", 2), "Failed"),
        ("OnFailure", 0, ("terminated", 2), "Running"),
        ("Always", 0, ("terminated", 0), "Running"),
        ("Never", 0, ("waiting", 0), "Pending"),
    ],
)
def test_phase_as_getPhase(policy, init_code, main, phase):
    spec = {"restartPolicy": policy, "initContainers": [{"name": "i"}], "containers": [{"name": "m"}]}
    init = {"i": _record("i", code=init_code, init=True)}
    regular = {"m": _record("m", *main)} if main else {}
    assert get_phase(spec, init, regular, terminal=False) == phase


def test_terminal_pod_is_failed_unless_every_container_succeeded():
    spec = {"restartPolicy": "Always", "containers": [{"name": "m"}]}
    assert get_phase(spec, {}, {"m": _record("m", code=143)}, terminal=True) == "Failed"
    assert get_phase(spec, {}, {"m": _record("m", code=0)}, terminal=True) == "Succeeded"


def test_restart_keeps_the_last_state_and_counts():
    record = _record("m", code=3)
    record.restart("id-2")
    status = record.api_status()
    assert status["restartCount"] == 1 and "running" in status["state"]
    assert status["lastState"]["terminated"]["exitCode"] == 3 and status["lastState"]["terminated"]["reason"] == "Error"


def test_status_conditions_keep_transition_times_and_foreign_conditions():
    spec = {"restartPolicy": "Never", "containers": [{"name": "m"}, {"name": "n"}]}
    foreign = {"type": "DisruptionTarget", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    old_ready = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:01Z"}
    view = PodView(spec, [foreign, old_ready], [], "127.0.0.1", "127.0.0.1", "t0", sandbox_ready=True, terminal=False)
    status = pod_status(view, [], [_record("m", "running"), _record("n", "waiting")])
    by_type = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Pending" and status["podIP"] == "127.0.0.1"
    assert by_type["DisruptionTarget"] == foreign
    assert by_type["PodScheduled"]["lastTransitionTime"] == "2026-01-01T00:00:01Z"
    assert by_type["ContainersReady"]["message"] == "containers with unready status: [n]"
    assert by_type["Ready"]["reason"] == "ContainersNotReady"
    assert [c["type"] for c in status["conditions"]][1:] == [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]


# -- mounts and names -------------------------------------------------------------------------------------------


def test_mounts_never_hide_a_source_and_go_shallow_first():
    root = Path("/tmp/agent-root")
    mounts = [
        Mount(root / "pods/p/volumes/cfg", "/etc/batchgen", True),
        Mount(root / "pods/p/volumes/scratch", "/tmp", False),
        Mount(root / "pods/p/volumes/data", "/data/deep/er", False),
        Mount(Path("/srv/data"), "/data", False),
    ]
    order = [m.target for m in order_mounts(mounts)]
    assert order.index("/tmp") > order.index("/etc/batchgen") and order.index("/tmp") > order.index("/data/deep/er")
    assert order.index("/data") < order.index("/data/deep/er")


def test_mounts_that_hide_each_other_are_refused():
    with pytest.raises(ContainerConfigError, match="hide each other"):
        order_mounts([Mount(Path("/a/x"), "/b", False), Mount(Path("/b/y"), "/a", False)])


def test_hosts_file_resolves_services_and_pod_subdomains_to_loopback():
    peers = [
        {"metadata": {"name": "tj-node-0-0-xyz"}, "spec": {"hostname": "tj-node-0-0", "subdomain": "tj"}},
        {"metadata": {"name": "plain"}, "spec": {}},
    ]
    names = dns_names("team", ["tj", "job-master-0"], peers)
    assert "tj-node-0-0.tj" in names and "job-master-0" in names and "tj.team.svc.cluster.local" in names
    pod = {
        "metadata": {"name": "me", "namespace": "team"},
        "spec": {"hostAliases": [{"ip": "10.0.0.9", "hostnames": ["db"]}]},
    }
    text = hosts_file(pod, "127.0.0.1", names)
    assert "127.0.0.1\tme\n" in text and "10.0.0.9\tdb\n" in text and "127.0.0.1\ttj-node-0-0.tj\n" in text
    assert text.startswith("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n")


def test_grace_period_and_exit_codes():
    pod = {"metadata": {}, "spec": {"terminationGracePeriodSeconds": 0}}
    assert grace_period(pod) == 2  # kuberuntime's minimum
    assert grace_period({"metadata": {"deletionGracePeriodSeconds": 7}, "spec": {}}) == 7
    assert grace_period({"metadata": {}, "spec": {}}) == 30
    assert (exit_code(-signal.SIGKILL), exit_code(-signal.SIGTERM), exit_code(3)) == (137, 143, 3)


# -- a pod worker against a recording host (real processes, no API server) --------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (private mount namespaces)"
)


class RecordingHost:
    """The agent side of a pod worker, recording instead of calling the API server."""

    def __init__(self, root: Path, no_run_s: float | None = None):
        self.root, self.no_run_s = root, no_run_s
        self.image = Image(workdir="/", env={"PATH": os.environ["PATH"]})
        self.host_ip = self.pod_ip = "127.0.0.1"
        self.allocatable = {"cpu": "4", "memory": "8Gi"}
        self.statuses: list[dict] = []
        self.deleted: list[str] = []
        self.secrets: dict[str, dict[str, str]] = {}

    def publish(self, pod, status):
        self.statuses.append(status)

    def delete(self, pod):
        self.deleted.append(pod["metadata"]["name"])

    def env_sources(self, pod):
        return _sources(secrets=self.secrets)

    def volume_api(self, pod):
        return None  # these pods have only emptyDir volumes

    def dns_names(self, namespace):
        return ["peer-0.svc-x"]


def _shell_pod(script: str, policy="Never", init=None, grace=None, volumes=None) -> dict:
    container = {
        "name": "main",
        "command": ["sh", "-c", script],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch-vol"}],
    }
    spec = {"restartPolicy": policy, "containers": [container], "volumes": [{"name": "scratch", "emptyDir": {}}]}
    if init:
        spec["initContainers"] = [{"name": "setup", "command": ["sh", "-c", init]}]
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"metadata": {"name": "p", "namespace": "ns", "uid": f"u{time.monotonic_ns()}"}, "spec": spec}


def _run(host: RecordingHost, pod: dict, timeout=30) -> dict:
    worker = PodWorker(pod, host).start()
    assert worker.done.wait(timeout), "the pod did not finish"
    return host.statuses[-1]


@needs_root
def test_worker_exit_code_reaches_the_terminated_state(tmp_path):
    host = RecordingHost(tmp_path)
    final = _run(host, _shell_pod("echo hi > /scratch-vol/f && getent hosts peer-0.svc-x && hostname && exit 7"))
    assert final["phase"] == "Failed"
    terminated = final["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (7, "Error")
    assert [s["phase"] for s in host.statuses][:1] == ["Pending"] and "Running" in [s["phase"] for s in host.statuses]
    log = next((tmp_path / "logs").glob("*/main/0.log")).read_text()
    assert log.splitlines() == ["127.0.0.1       peer-0.svc-x", "p"]  # the pod's name is its hostname
    assert next((tmp_path / "pods").glob("*/volumes/scratch/f")).read_text() == "hi\n"


@needs_root
def test_worker_init_failure_fails_the_pod_with_its_code(tmp_path):
    final = _run(RecordingHost(tmp_path), _shell_pod("exit 0", init="exit 4"))
    assert final["phase"] == "Failed"
    assert final["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 4
    assert final["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}


@needs_root
def test_worker_restarts_on_failure_in_place(tmp_path):
    once = tmp_path / "once"
    final = _run(RecordingHost(tmp_path), _shell_pod(f"[ -e {once} ] && exit 0; touch {once}; exit 5", "OnFailure"))
    status = final["containerStatuses"][0]
    assert final["phase"] == "Succeeded" and status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 5 and status["state"]["terminated"]["exitCode"] == 0


@needs_root
def test_worker_start_error_for_a_missing_executable(tmp_path):
    pod = _shell_pod("unused")
    pod["spec"]["containers"][0]["command"] = ["no-such-binary-here"]
    terminated = _run(RecordingHost(tmp_path), pod)["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (128, "StartError")
    assert "executable file not found" in terminated["message"]


@needs_root
def test_worker_deletion_sigterm_then_sigkill_after_grace(tmp_path):
    marks = tmp_path / "marks"
    script = f"trap 'echo TERM >> {marks}' TERM; echo up >> {marks}; while :; do sleep 0.1; done"
    host = RecordingHost(tmp_path)
    pod = _shell_pod(script, grace=3)
    worker = PodWorker(pod, host).start()
    deadline = time.monotonic() + 20
    while not (marks.exists() and "up" in marks.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    began = time.monotonic()
    worker.update({**pod, "metadata": {**pod["metadata"], "deletionTimestamp": "now", "deletionGracePeriodSeconds": 3}})
    assert worker.done.wait(20)
    assert time.monotonic() - began >= 3
    assert marks.read_text().splitlines() == ["up", "TERM"]
    terminated = host.statuses[-1]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 137 and host.statuses[-1]["phase"] == "Failed" and host.deleted == ["p"]


def test_no_run_pods_succeed_after_the_delay(tmp_path):
    host = RecordingHost(tmp_path, no_run_s=0.3)
    pod = _shell_pod("never runs", init="never runs either")
    final = _run(host, pod)
    assert final["phase"] == "Succeeded"
    assert final["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert not (tmp_path / "logs").exists()


@needs_root
def test_worker_waits_for_a_missing_secret_then_starts(tmp_path):
    host = RecordingHost(tmp_path)
    pod = _shell_pod('test "$PASS" = late')
    pod["spec"]["containers"][0]["env"] = [{"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
    worker = PodWorker(pod, host).start()
    deadline = time.monotonic() + 10
    while not any(_waiting_reason(s) == "CreateContainerConfigError" for s in host.statuses):
        assert time.monotonic() < deadline, host.statuses
        time.sleep(0.1)
    host.secrets["s"] = {"k": "late"}
    assert worker.done.wait(30)
    assert host.statuses[-1]["phase"] == "Succeeded"


def _waiting_reason(status: dict) -> str | None:
    return status["containerStatuses"][0]["state"].get("waiting", {}).get("reason")


def test_cli_refuses_a_missing_kubeconfig(tmp_path):
    agent = REPO / "tools" / "kube" / "node_agent.py"
    argv = [
        sys.executable,
        str(agent),
        "--kubeconfig",
        str(tmp_path / "nope"),
        "--node-name",
        "n",
        "--root",
        str(tmp_path),
    ]
    done = subprocess.run(argv + ["--no-run", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"node_agent: --kubeconfig {tmp_path / 'nope'}: no such file"
