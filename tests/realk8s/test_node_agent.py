"""The node agent against a real kube-apiserver (built by `make kube-bin`), under the Node authorizer with its
own `system:node:` identity: the Node and its Lease, env from every source, volumes at their paths, names on
loopback, exit codes, init failures, restarts, deletion with SIGTERM then SIGKILL, and a clean stop."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.realk8s.conftest import REQUIRED, controlplane, skip_module_unless_available
from tools.kube.node_agent import KubeApi

skip_module_unless_available()

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "tools" / "kube" / "node_agent.py"
NODE = "agent-test-node"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


@dataclass
class Cluster:
    plane: controlplane.ControlPlane
    admin: KubeApi
    agent: subprocess.Popen
    agent_root: Path
    agent_log: Path
    data_dir: Path

    def namespace(self, name: str) -> str:
        """A namespace, once the controller-manager has added `default` and `kube-root-ca.crt` to it."""
        self.admin.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        base = f"/api/v1/namespaces/{name}"
        deadline = time.monotonic() + 30
        while not (
            self.admin.get(f"{base}/serviceaccounts/default") and self.admin.get(f"{base}/configmaps/kube-root-ca.crt")
        ):
            assert time.monotonic() < deadline, f"the controller-manager did not fill namespace {name}"
            time.sleep(0.1)
        return name

    def create_pod(self, namespace: str, pod: dict) -> dict:
        pod.setdefault("spec", {}).setdefault("nodeName", NODE)
        return self.admin.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)

    def pod(self, namespace: str, name: str) -> dict | None:
        return self.admin.get(f"/api/v1/namespaces/{namespace}/pods/{name}")

    def wait_phase(self, namespace: str, name: str, phases: tuple[str, ...], timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        pod = None
        while time.monotonic() < deadline:
            pod = self.pod(namespace, name)
            if pod and pod.get("status", {}).get("phase") in phases:
                return pod
            assert self.agent.poll() is None, (
                f"the agent exited {self.agent.returncode}: {self.agent_log.read_text()[-3000:]}"
            )
            time.sleep(0.2)
        raise AssertionError(f"pod {namespace}/{name} not {phases} after {timeout_s} s: {json.dumps(pod)[:3000]}")

    def log(self, pod: dict, container: str = "main", attempt: int = 0) -> str:
        meta = pod["metadata"]
        key = f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        return (self.agent_root / "logs" / key / container / f"{attempt}.log").read_text()


@pytest.fixture(scope="module")
def cluster(control_plane, tmp_path_factory):
    if os.geteuid() != 0:
        why = "the node agent needs root (a private mount namespace per pod)"
        if os.environ.get("CI") == "true" or REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    root = tmp_path_factory.mktemp("agent")
    agent_log = root / "agent.log"
    plane = control_plane
    agent = subprocess.Popen(
        [sys.executable, str(AGENT), "--kubeconfig", str(plane.node_kubeconfig(NODE)), "--node-name", NODE]
        + ["--dns-kubeconfig", str(plane.kubeconfigs["dns"]), "--root", str(root / "agent")]
        + ["--cpu", "8", "--memory", "16Gi", "--gpus", "2", "--shutdown-grace", "3"],
        stdout=open(agent_log, "wb"),  # noqa: SIM115 - the agent keeps it
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    admin = KubeApi(plane.kubeconfig)
    data_dir = root / "pv-folder"
    data_dir.mkdir()
    try:
        yield Cluster(plane, admin, agent, root / "agent", agent_log, data_dir)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        plane.kubectl("delete", "node", NODE, "agent-no-run-node", "--ignore-not-found", check=False)


def _ready(cluster: Cluster, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        node = cluster.admin.get(f"/api/v1/nodes/{NODE}")
        conditions = {c["type"]: c["status"] for c in (node or {}).get("status", {}).get("conditions", [])}
        if conditions.get("Ready") == "True":
            return node
        assert cluster.agent.poll() is None, cluster.agent_log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"node {NODE} not Ready: {cluster.agent_log.read_text()[-3000:]}")


def test_node_registers_with_capacity_and_a_lease(cluster):
    node = _ready(cluster)
    assert node["status"]["capacity"] == {"cpu": "8", "memory": "16Gi", "pods": "110", "nvidia.com/gpu": "2"}
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == NODE
    assert node["status"]["nodeInfo"]["kubeletVersion"] == cluster.admin.request("GET", "/version")["gitVersion"]
    lease = cluster.admin.get(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{NODE}")
    assert lease["spec"]["holderIdentity"] == NODE and lease["metadata"]["ownerReferences"][0]["kind"] == "Node"


POD_SCRIPT = r"""
import json, os, pathlib, shutil, socket, sys
from kubernetes import client, config
config.load_incluster_config()  # KUBERNETES_SERVICE_HOST/PORT and the projected token, as a worker would
api = client.ApiClient()
request = api.param_serialize(
    "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
    header_params={"Content-Type": "application/json", "Accept": "application/json"},
    body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}, auth_settings=["BearerToken"])
review = json.loads(api.call_api(*request).read())
pathlib.Path("/data/written-by-pod").write_text("hello from the pod")
try:
    pathlib.Path("/etc/agent/config/new").write_text("x")
    read_only = "writable"
except OSError as e:
    read_only = e.strerror
files = {}
for folder in ("/etc/agent/config", "/etc/agent/secret", "/etc/podinfo", "/scratch", "/data", "/opt/agent-test",
               "/var/run/secrets/kubernetes.io/serviceaccount"):
    for path in sorted(pathlib.Path(folder).rglob("*")):
        if path.is_file():
            files[str(path)] = [path.read_text(), oct(path.stat().st_mode & 0o777)]
names = ["tj-node-0-0.tj", "tj-node-0-1.tj", "tj", "job-master-0", "tj-node-0-1.tj.everything.svc.cluster.local"]
print(json.dumps({
    "env": dict(os.environ), "argv": sys.argv[1:], "read_only": read_only, "cwd": os.getcwd(), "user": review["status"]["userInfo"],
    "hostname": socket.gethostname(), "files": files, "resolved": {n: socket.gethostbyname(n) for n in names}, "batchgen": shutil.which("batchgen"),
}))
"""


def _everything_objects(cluster: Cluster, namespace: str) -> None:
    """What the pod refers to: a ConfigMap, a Secret, two headless Services, a PVC bound to a hostPath PV."""
    base = f"/api/v1/namespaces/{namespace}"
    cluster.admin.request(
        "POST", f"{base}/configmaps", {"metadata": {"name": "settings"}, "data": {"MODE": "fast", "LEVEL": "2"}}
    )
    secret = {"PASSWORD": base64.b64encode(b"s3cret").decode(), "TOKEN": base64.b64encode(b"t0k").decode()}
    cluster.admin.request("POST", f"{base}/secrets", {"metadata": {"name": "creds"}, "data": secret})
    for service in ("tj", "job-master-0"):
        spec = {"clusterIP": "None", "selector": {"app": service}, "ports": [{"port": 29400}]}
        cluster.admin.request("POST", f"{base}/services", {"metadata": {"name": service}, "spec": spec})
    pv = {
        "metadata": {"name": f"{namespace}-pv"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "hostPath": {"path": str(cluster.data_dir)},
                 "claimRef": {"namespace": namespace, "name": "claim"}, "storageClassName": ""},
    }  # fmt: skip
    cluster.admin.request("POST", "/api/v1/persistentvolumes", pv)
    claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    claim.update(volumeName=f"{namespace}-pv", storageClassName="")
    cluster.admin.request("POST", f"{base}/persistentvolumeclaims", {"metadata": {"name": "claim"}, "spec": claim})
    (cluster.data_dir / "seed").write_text("seeded on the host")


def _everything_pod(cluster: Cluster, namespace: str) -> dict:
    _everything_objects(cluster, namespace)
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "INDEX", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "MODE"}}},
        {"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "PASSWORD"}}},
        {"name": "MAYBE", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
        {"name": "COMBINED", "value": "$(POD_NAME)/$(INDEX)/$(CFG_LEVEL)"},
    ]
    main = {
        "name": "main",
        "image": "ghcr.io/batchgen/batchgen:test",
        "command": ["python", "-c", POD_SCRIPT],
        "args": ["$(POD_NAME)-arg", "$$(POD_NAME)"],
        "workingDir": "/data",
        "env": env,
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}, {"secretRef": {"name": "creds"}}],
        "resources": {"limits": {"cpu": "1500m", "memory": "512Mi"}, "requests": {"cpu": "1", "memory": "256Mi"}},
        "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/agent/config"},
            {"name": "sec", "mountPath": "/etc/agent/secret"},
            {"name": "info", "mountPath": "/etc/podinfo"},
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "data", "mountPath": "/data"},
            {"name": "whole", "mountPath": "/opt/agent-test/level.txt", "subPath": "LEVEL"},
        ],
    }
    init = {"name": "setup", "image": "x", "command": ["sh", "-c", "echo init-was-here > /scratch/from-init"],
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}  # fmt: skip
    volumes = [
        {"name": "cfg", "configMap": {"name": "settings", "items": [{"key": "MODE", "path": "sub/mode.txt"}]}},
        {"name": "sec", "secret": {"secretName": "creds", "defaultMode": 0o400}},
        {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "claim"}},
        {"name": "whole", "configMap": {"name": "settings"}},
    ]
    meta = {"name": "everything", "labels": {"team": "video", "app": "tj"}, "annotations": {INDEX_ANNOTATION: "5"}}
    spec = {"restartPolicy": "Never", "hostname": "tj-node-0-0", "subdomain": "tj", "initContainers": [init],
            "containers": [main], "volumes": volumes}  # fmt: skip
    return {"metadata": meta, "spec": spec}


def test_env_volumes_token_and_names_as_the_kubelet_gives_them(cluster):
    _ready(cluster)
    ns = cluster.namespace("everything")
    peer = {"name": "main", "image": "x", "command": ["python", "-c", "import time; time.sleep(600)"]}
    cluster.create_pod(ns, {"metadata": {"name": "peer"}, "spec": {"hostname": "tj-node-0-1", "subdomain": "tj",
                                                                     "containers": [peer]}})  # fmt: skip
    cluster.wait_phase(ns, "peer", ("Running",))
    created = cluster.create_pod(ns, _everything_pod(cluster, ns))
    pod = cluster.wait_phase(ns, "everything", ("Succeeded", "Failed"))
    assert pod["status"]["phase"] == "Succeeded", cluster.log(pod)
    report = json.loads(cluster.log(pod).strip().splitlines()[-1])
    env, files, uid = report["env"], report["files"], created["metadata"]["uid"]
    assert (env["POD_NAME"], env["POD_NS"], env["POD_UID"], env["INDEX"], env["TEAM"]) == (
        "everything",
        ns,
        uid,
        "5",
        "video",
    )
    assert (env["NODE"], env["SA"], env["POD_IP"], env["HOST_IP"]) == (NODE, "default", "127.0.0.1", "127.0.0.1")
    assert (env["CPU"], env["MEM_MI"], env["MODE"], env["PASS"]) == ("2", "256", "fast", "s3cret")
    assert (env["CFG_MODE"], env["CFG_LEVEL"], env["TOKEN"], env["COMBINED"]) == ("fast", "2", "t0k", "everything/5/2")
    assert "MAYBE" not in env
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == (
        "127.0.0.1",
        str(cluster.plane.ports["apiserver"]),
    )
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert report["batchgen"] == str(Path(sys.executable).parent / "batchgen")
    assert report["argv"] == ["everything-arg", "$(POD_NAME)"] and report["cwd"] == "/data"
    assert report["hostname"] == "tj-node-0-0"
    # the projected token is a real bound token: the API server knows the pod it belongs to
    assert report["user"]["username"] == f"system:serviceaccount:{ns}:default"
    assert report["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["everything"]
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert files[f"{sa}/namespace"][0] == ns and files[f"{sa}/ca.crt"][0] == cluster.plane.pki.ca.read_text()
    assert (
        files["/etc/agent/config/sub/mode.txt"] == ["fast", "0o644"] and report["read_only"] == "Read-only file system"
    )
    assert files["/opt/agent-test/level.txt"][0] == "2"  # one key through subPath
    assert files["/etc/agent/secret/PASSWORD"] == ["s3cret", "0o400"]
    assert files["/etc/podinfo/labels"][0] == 'app="tj"\nteam="video"'
    assert files["/scratch/from-init"][0] == "init-was-here\n" and files["/data/seed"][0] == "seeded on the host"
    assert (cluster.data_dir / "written-by-pod").read_text() == "hello from the pod"
    assert set(report["resolved"].values()) == {"127.0.0.1"}
    assert not (Path(sa) / "token").exists()  # the mounts stayed in the pod's namespace
    statuses = pod["status"]
    assert statuses["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert statuses["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    conditions = {c["type"]: (c["status"], c.get("reason")) for c in statuses["conditions"]}
    assert conditions["Ready"] == ("False", "PodCompleted") and conditions["Initialized"] == ("True", "PodCompleted")


def _simple(name: str, script: str, policy: str = "Never", **spec) -> dict:
    container = {"name": "main", "image": "x", "command": ["sh", "-c", script],
                 "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}  # fmt: skip
    body = {"restartPolicy": policy, "containers": [container], "volumes": [{"name": "scratch", "emptyDir": {}}]}
    return {"metadata": {"name": name}, "spec": {**body, **spec}}


def test_exit_code_reaches_the_terminated_state(cluster):
    ns = cluster.namespace("exit-code")
    cluster.create_pod(ns, _simple("exits", "echo bye; exit 3"))
    pod = cluster.wait_phase(ns, "exits", ("Failed", "Succeeded"))
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Failed" and (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert cluster.log(pod) == "bye\n"


def test_init_failure_fails_the_pod_with_its_exit_code(cluster):
    ns = cluster.namespace("init-fails")
    init = [{"name": "setup", "image": "x", "command": ["sh", "-c", "exit 4"]}]
    cluster.create_pod(ns, _simple("init", "echo never", initContainers=init))
    pod = cluster.wait_phase(ns, "init", ("Failed", "Succeeded"))
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 4
    assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "PodInitializing"


def test_on_failure_restarts_the_container_in_place(cluster):
    ns = cluster.namespace("restarts")
    cluster.create_pod(ns, _simple("flaky", "[ -e /scratch/once ] && exit 0; touch /scratch/once; exit 5", "OnFailure"))
    pod = cluster.wait_phase(ns, "flaky", ("Succeeded", "Failed"))
    status = pod["status"]["containerStatuses"][0]
    assert pod["status"]["phase"] == "Succeeded" and status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 5 and status["state"]["terminated"]["exitCode"] == 0


def test_deletion_sigterm_then_sigkill_after_the_grace_period(cluster):
    ns = cluster.namespace("deletion")
    script = "import os, signal, sys, time\n"
    script += "signal.signal(signal.SIGTERM, lambda *_: print('TERM', flush=True))\n"
    script += "print('pid', os.getpid(), flush=True)\nwhile True: time.sleep(0.1)\n"
    spec = _simple("stubborn", "unused", terminationGracePeriodSeconds=30)
    spec["spec"]["containers"][0]["command"] = ["python", "-c", script]
    cluster.create_pod(ns, spec)
    pod = cluster.wait_phase(ns, "stubborn", ("Running",))
    while "pid" not in cluster.log(pod):
        time.sleep(0.1)
    pid = int(cluster.log(pod).split()[1])
    events: list[dict] = []
    query = {"fieldSelector": "metadata.name=stubborn", "resourceVersion": pod["metadata"]["resourceVersion"]}

    def follow():
        for event in cluster.admin.watch(f"/api/v1/namespaces/{ns}/pods", query):
            events.append(event)
            if event["type"] == "DELETED":
                return

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    began = time.monotonic()
    cluster.admin.request("DELETE", f"/api/v1/namespaces/{ns}/pods/stubborn", {"gracePeriodSeconds": 3})
    watcher.join(30)
    assert events and events[-1]["type"] == "DELETED", [e["type"] for e in events]
    assert time.monotonic() - began >= 3
    assert cluster.pod(ns, "stubborn") is None
    last = events[-1]["object"]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert last["exitCode"] == 137  # SIGKILL, after the SIGTERM it ignored
    assert "TERM" in cluster.log(pod).split()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _job(name: str, script: str, **spec) -> dict:
    container = {"name": "main", "image": "x", "command": ["sh", "-c", script]}
    template = {"spec": {"restartPolicy": "Never", "containers": [container]}}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {"template": template, **spec}}


def _job_outcome(cluster: Cluster, namespace: str, name: str, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = cluster.admin.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
        if any(
            c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in job["status"].get("conditions", [])
        ):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {namespace}/{name} did not finish: {json.dumps(job['status'])}")


def test_jobs_through_the_real_scheduler_and_job_controller(cluster):
    ns = cluster.namespace("jobs")
    base = f"/apis/batch/v1/namespaces/{ns}/jobs"
    indexed = _job(
        "indexed", 'echo "index $JOB_COMPLETION_INDEX"', completionMode="Indexed", completions=3, parallelism=3
    )
    cluster.admin.request("POST", base, indexed)
    cluster.admin.request("POST", base, _job("failing", "exit 3", backoffLimit=1))
    done = _job_outcome(cluster, ns, "indexed")
    assert done["status"]["succeeded"] == 3 and done["status"]["completedIndexes"] == "0-2"
    pods = cluster.admin.request("GET", f"/api/v1/namespaces/{ns}/pods", query={"labelSelector": "job-name=indexed"})
    assert {p["spec"]["nodeName"] for p in pods["items"]} == {NODE}  # bound by kube-scheduler
    assert sorted(cluster.log(p) for p in pods["items"]) == ["index 0\n", "index 1\n", "index 2\n"]
    failed = _job_outcome(cluster, ns, "failing")
    reasons = {c["type"]: c.get("reason") for c in failed["status"]["conditions"]}
    assert reasons["Failed"] == "BackoffLimitExceeded" and failed["status"]["failed"] == 2


def test_no_run_agent_completes_pods_without_running_them(cluster, tmp_path):
    node, root = "agent-no-run-node", tmp_path / "no-run"
    argv = [sys.executable, str(AGENT), "--kubeconfig", str(cluster.plane.node_kubeconfig(node)), "--node-name", node]
    agent = subprocess.Popen(
        argv + ["--root", str(root), "--no-run", "0.5"], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        ns = cluster.namespace("no-run")
        init = [{"name": "setup", "image": "x", "command": ["false"]}]
        for index in range(10):
            cluster.create_pod(ns, _simple(f"p{index}", "exit 1", initContainers=init, nodeName=node))
        for index in range(10):
            pod = cluster.wait_phase(ns, f"p{index}", ("Succeeded", "Failed"))
            assert pod["status"]["phase"] == "Succeeded"
            assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
        assert not (root / "logs").exists()  # nothing ran
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()


def test_agent_stops_cleanly_on_sigterm_terminating_its_pods(cluster):
    ns = cluster.namespace("shutdown")
    cluster.create_pod(ns, _simple("long", "echo up; exec sleep 600"))
    pod = cluster.wait_phase(ns, "long", ("Running",))
    began = time.monotonic()
    cluster.agent.send_signal(signal.SIGTERM)
    assert cluster.agent.wait(30) == 0, cluster.agent_log.read_text()[-3000:]
    assert time.monotonic() - began < 15
    pod = cluster.pod(ns, "long")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Failed" and terminated["exitCode"] == 143  # sleep took the SIGTERM
