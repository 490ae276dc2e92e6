"""The node agent: the one stand-in left in the real control plane. It does a kubelet's job for one Node.

    python tools/kube/node_agent.py --kubeconfig PATH --node-name NAME --root DIR \\
        [--cpu 16 --memory 64Gi --gpus 8] [--no-run SECONDS] [--shutdown-grace SECONDS]

- registers the Node (cpu, memory, pods, nvidia.com/gpu), keeps it Ready and renews its Lease
  (kubernetes pkg/kubelet/kubelet_node_status.go, pkg/kubelet/nodestatus/setters.go,
  staging/src/k8s.io/component-helpers/apimachinery/lease/controller.go);
- watches the pods bound to it (pkg/kubelet/config/apiserver.go: a field selector on spec.nodeName) and runs each
  one's init containers, then its containers, as local process groups (tools/kube/node_pod.py) with the
  environment, volumes and /etc/hosts a kubelet would give them (node_env.py, node_volumes.py);
- writes pods/status as the kubelet's status manager does (pkg/kubelet/status/status_manager.go: a patch carrying
  metadata.uid, so a re-created pod of the same name is never patched) and, once a deleted pod's processes are
  gone, deletes it with gracePeriodSeconds=0 (status_manager.go canBeDeleted/Delete).

No image is pulled: a container runs with the project's virtualenv first on PATH, and the project Dockerfile's
ENTRYPOINT, CMD and WORKDIR stand in for the image's. Logs are kept under --root/logs/<ns>_<pod>_<uid>/<container>/
<restart>.log; `kubectl logs` does not work (there is no kubelet server to proxy to).
--no-run S: run nothing; every container "runs" S seconds and exits 0 (for scale benchmarks).
SIGTERM: the pods' processes are terminated (each pod's grace period, capped by --shutdown-grace), then it exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as a script: make `tools.kube` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tools.kube.node_env import (
    EnvSources,
    image_from_dockerfile,
    master_service_env,
    run_console_scripts_from_checkout,
)
from tools.kube.node_pod import MINIMUM_GRACE_S, PodWorker, grace_period
from tools.kube.node_status import now
from tools.kube.node_volumes import VolumeError, decode_data, dns_names

log = logging.getLogger("node_agent")

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40  # kubelet's nodeLeaseDurationSeconds
LEASE_RENEW_S = 10  # lease controller: renew every quarter of the duration
NODE_STATUS_REPORT_S = 60  # the kubelet re-posts an unchanged status every nodeStatusReportFrequency
WATCH_TIMEOUT_S = 60
MAX_PODS = "110"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_USAGE = 2
POOL_SIZE = 32
STATUS_ATTEMPTS = 3


class KubeApi:
    """JSON in, JSON out over the kubernetes client's configured connection (kubeconfig auth and TLS)."""

    def __init__(self, kubeconfig: Path):
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = POOL_SIZE  # one pod worker thread per pod publishes at once
        self.client = client.ApiClient(configuration)
        url = urlsplit(configuration.host)
        self.host, self.port = url.hostname or LOOPBACK, url.port or 443

    def _call(self, method: str, path: str, body=None, query=None, content_type=None, timeout=(5, 30)):
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        request = self.client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        return self.client.call_api(*request, _request_timeout=timeout)

    def request(self, method: str, path: str, body=None, query=None, content_type=None) -> Any:
        response = self._call(method, path, body, query, content_type)
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason, body=data.decode(errors="replace"))
        return json.loads(data) if data else None

    def get(self, path: str, query=None) -> Any | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path, query=query)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def merge_patch(self, path: str, body: Mapping[str, Any]) -> Any:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def watch(self, path: str, query: Mapping[str, str]) -> Iterator[dict]:
        """The events of one watch request (ends when the server closes it, after WATCH_TIMEOUT_S)."""
        query = {**query, "watch": "true", "timeoutSeconds": str(WATCH_TIMEOUT_S), "allowWatchBookmarks": "true"}
        response = self._call("GET", path, query=query, timeout=(5, WATCH_TIMEOUT_S + 30))
        if response.status != 200:
            raise ApiException(status=response.status, reason=response.reason, body=response.read().decode())
        buffer = b""
        try:
            for chunk in response.response.stream(65536, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                yield from (json.loads(line) for line in lines if line.strip())
        finally:
            response.response.release_conn()


def micro_time() -> str:
    """metav1.MicroTime, as a Lease's renewTime needs it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def machine_facts() -> dict[str, str]:
    """nodestatus/setters.go MachineInfo and VersionInfo, from this machine."""

    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return ""

    os_release = dict(line.split("=", 1) for line in read("/etc/os-release").splitlines() if "=" in line)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return {
        "machineID": read("/etc/machine-id"),
        "systemUUID": read("/sys/class/dmi/id/product_uuid"),
        "bootID": read("/proc/sys/kernel/random/boot_id"),
        "kernelVersion": platform.release(),
        "osImage": os_release.get("PRETTY_NAME", "").strip('"'),
        "containerRuntimeVersion": "node-agent://0",
        "operatingSystem": "linux",
        "architecture": arch,
    }


class PodVolumes:
    """The API objects a pod's volumes are made from (node_volumes.VolumeAPI)."""

    def __init__(self, agent: NodeAgent, pod: Mapping[str, Any]):
        self.agent, self.api = agent, agent.api
        self.namespace = pod["metadata"]["namespace"]
        self.base = f"/api/v1/namespaces/{self.namespace}"

    def config_map(self, name: str) -> dict[str, bytes] | None:
        obj = self.api.get(f"{self.base}/configmaps/{name}")
        return None if obj is None else decode_data(obj, secret=False)

    def secret(self, name: str) -> dict[str, bytes] | None:
        obj = self.api.get(f"{self.base}/secrets/{name}")
        return None if obj is None else decode_data(obj, secret=True)

    def claim_path(self, claim: str) -> Path:
        """A claim bound to a hostPath or local PersistentVolume is that folder. An unbound claim gets a folder
        under --root/claims (standing in for a provisioner, which this control plane has none of)."""
        pvc = self.api.get(f"{self.base}/persistentvolumeclaims/{claim}")
        if pvc is None:
            raise VolumeError(f"persistentvolumeclaim {self.namespace}/{claim} not found")
        volume_name = (pvc.get("spec") or {}).get("volumeName")
        if not volume_name:
            folder = self.agent.root / "claims" / self.namespace / claim
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        pv = self.api.get(f"/api/v1/persistentvolumes/{volume_name}") or {}
        source = (pv.get("spec") or {}).get("hostPath") or (pv.get("spec") or {}).get("local")
        if not source:
            raise VolumeError(f"persistentvolume {volume_name}: only hostPath and local volumes can be mounted here")
        return Path(source["path"])

    def token(self, pod: Mapping[str, Any], audience: str | None, expiration_s: int) -> str:
        """A TokenRequest bound to the pod, as the kubelet's token manager makes one (pkg/kubelet/token)."""
        account = pod["spec"].get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": expiration_s,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                },
            },
        }
        try:
            answer = self.api.request("POST", f"{self.base}/serviceaccounts/{account}/token", body)
        except ApiException as e:
            raise VolumeError(f"token for serviceaccount {self.namespace}/{account}: {e.status} {e.reason}") from e
        return answer["status"]["token"]


class NodeAgent:
    def __init__(self, api: KubeApi, args: argparse.Namespace, dns_api: KubeApi | None = None):
        self.api = api
        self.dns_api = dns_api or api
        self.node_name: str = args.node_name
        self.root: Path = args.root.resolve()
        self.no_run_s: float | None = args.no_run
        self.shutdown_grace: int = args.shutdown_grace
        self.host_ip = self.pod_ip = LOOPBACK
        self.allocatable = {"cpu": args.cpu, "memory": args.memory, "pods": MAX_PODS}
        if args.gpus:
            self.allocatable["nvidia.com/gpu"] = str(args.gpus)
        dockerfile_image = image_from_dockerfile(REPO / "Dockerfile", image_env())
        self.image = run_console_scripts_from_checkout(dockerfile_image, REPO / "pyproject.toml", sys.executable)
        self.service_env = master_service_env(api.host, api.port)
        self.workers: dict[str, PodWorker] = {}
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._last_status: dict[str, dict] = {}
        self._conditions: list[dict] = []
        self.version = ""
        self._warned_dns = False

    # -- the node: kubelet_node_status.go registerWithAPIServer, nodestatus/setters.go, lease controller -------

    def node_status(self) -> dict[str, Any]:
        stamp = now()
        before = {c["type"]: c for c in self._conditions}
        wanted = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ]
        self._conditions = [
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": before.get(kind, {}).get("lastTransitionTime", stamp),
            }
            for kind, status, reason, message in wanted
        ]
        return {
            "capacity": dict(self.allocatable),
            "allocatable": dict(self.allocatable),
            "conditions": self._conditions,
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {**machine_facts(), "kubeletVersion": self.version, "kubeProxyVersion": ""},
        }

    def register(self) -> dict:
        self.version = self.api.request("GET", "/version")["gitVersion"]  # so version-skew checks pass
        arch = machine_facts()["architecture"]
        labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux", "kubernetes.io/arch": arch}
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            self.api.request("POST", "/api/v1/nodes", node)
        except ApiException as e:
            if e.status != 409:
                raise
            self.api.merge_patch(f"/api/v1/nodes/{self.node_name}", {"metadata": {"labels": labels}})
        registered = self.api.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()})
        try:
            self._renew_lease(registered["metadata"]["uid"])
        except ApiException as e:  # the heartbeat tries again
            log.warning("lease: %s %s", e.status, e.reason)
        log.info("node %s registered (%s)", self.node_name, ", ".join(f"{k}={v}" for k, v in self.allocatable.items()))
        return registered

    def _renew_lease(self, node_uid: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_DURATION_S, "renewTime": micro_time()}
        try:
            self.api.merge_patch(f"{path}/{self.node_name}", {"spec": spec})
        except ApiException as e:
            if e.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": node_uid}
            meta = {"name": self.node_name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]}
            self.api.request(
                "POST", path, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}
            )

    def heartbeat(self, node_uid: str) -> None:
        last_report = time.monotonic()
        while not self.stop.wait(LEASE_RENEW_S):
            try:
                self._renew_lease(node_uid)
                if time.monotonic() - last_report >= NODE_STATUS_REPORT_S:
                    self.api.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()})
                    last_report = time.monotonic()
            except (ApiException, urllib3.exceptions.HTTPError) as e:
                log.warning("heartbeat: %s", e)

    # -- pods: pkg/kubelet/config/apiserver.go (watch), kubelet.go HandlePodAdditions/Updates/Removes ---------

    def watch_pods(self) -> None:
        query = {"fieldSelector": f"spec.nodeName={self.node_name}"}
        while not self.stop.is_set():
            try:
                listed = self.api.request("GET", "/api/v1/pods", query=query)
                present = {pod["metadata"]["uid"] for pod in listed["items"]}
                for pod in listed["items"]:
                    self.sync(pod)
                for uid in set(self.workers) - present:
                    self.removed(uid)
                self._follow(query, listed["metadata"]["resourceVersion"])
            except Exception:  # the watch must outlive any one bad answer: log it, list again
                log.exception("pod watch failed; listing again")
                self.stop.wait(1)

    def _follow(self, query: Mapping[str, str], version: str) -> None:
        """Watch from `version` until the server answers 410 Gone (then the caller lists again) or we stop."""
        while not self.stop.is_set():
            for event in self.api.watch("/api/v1/pods", {**query, "resourceVersion": version}):
                obj = event["object"]
                if event["type"] == "ERROR":
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = obj["metadata"]["resourceVersion"]
                if event["type"] in ("ADDED", "MODIFIED"):
                    self.sync(obj)
                elif event["type"] == "DELETED":
                    self.removed(obj["metadata"]["uid"])
                if self.stop.is_set():
                    return

    def sync(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            worker = self.workers.get(uid)
            if worker is not None and not worker.done.is_set():
                worker.update(pod)
                return
            if pod["metadata"].get("deletionTimestamp"):
                if self.stop.is_set():
                    return
                self.delete(pod)  # nothing of it runs here (any more)
                return
            if worker is not None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return
            if self.stop.is_set():
                return
            self.workers[uid] = PodWorker(pod, self).start()

    def removed(self, uid: str) -> None:
        """The object is gone (deleted with grace 0 by us or forcibly by someone): stop what still runs."""
        with self._lock:
            worker = self.workers.pop(uid, None)
            self._last_status.pop(uid, None)
        if worker is not None and not worker.done.is_set():
            worker.terminate(MINIMUM_GRACE_S)

    # -- what pod workers call ----------------------------------------------------------------------------------

    def publish(self, pod: Mapping[str, Any], status: dict) -> None:
        """A merge patch of pods/status, retried a few times as the status manager retries its sync."""
        meta = pod["metadata"]
        if self._last_status.get(meta["uid"]) == status:
            return
        body = {"metadata": {"uid": meta["uid"]}, "status": status}
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
        for attempt in range(STATUS_ATTEMPTS):
            try:
                self.api.merge_patch(path, body)
                self._last_status[meta["uid"]] = status
                return
            except ApiException as e:
                if e.status in (404, 409):
                    log.info(
                        "pod %s/%s: status not written (%s): the pod is gone", meta["namespace"], meta["name"], e.status
                    )
                    return
                error: Exception = e
            except urllib3.exceptions.HTTPError as e:
                error = e
            time.sleep(0.5 * (attempt + 1))
        log.warning("pod %s/%s: status not written: %s", meta["namespace"], meta["name"], error)

    def delete(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
            log.info("pod %s/%s deleted", meta["namespace"], meta["name"])
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    def env_sources(self, pod: Mapping[str, Any]) -> EnvSources:
        volumes = PodVolumes(self, pod)

        def as_text(data: Mapping[str, bytes] | None) -> dict[str, str] | None:
            return None if data is None else {k: v.decode(errors="replace") for k, v in data.items()}

        return EnvSources(
            config_map=lambda name: as_text(volumes.config_map(name)),
            secret=lambda name: as_text(volumes.secret(name)),
            pod_ip=self.pod_ip,
            host_ip=self.host_ip,
            allocatable=self.allocatable,
            service_env=self.service_env,
        )

    def volume_api(self, pod: Mapping[str, Any]) -> PodVolumes:
        return PodVolumes(self, pod)

    def dns_names(self, namespace: str) -> list[str]:
        """The names cluster DNS would serve in `namespace`, read with the DNS identity (--dns-kubeconfig): a node
        may list Services but, under the Node authorizer, only its own pods; then peers are this node's pods."""
        base = f"/api/v1/namespaces/{namespace}"
        services = [s["metadata"]["name"] for s in self.dns_api.request("GET", f"{base}/services")["items"]]
        try:
            pods = self.dns_api.request("GET", f"{base}/pods")["items"]
        except ApiException as e:
            if e.status != 403:
                raise
            if not self._warned_dns:
                log.warning("this identity may not list pods: only this node's pods' names resolve (--dns-kubeconfig)")
                self._warned_dns = True
            with self._lock:
                pods = [w.pod for w in self.workers.values() if w.pod["metadata"]["namespace"] == namespace]
        return dns_names(namespace, services, pods)

    # -- shutdown -------------------------------------------------------------------------------------------

    def shut_down(self) -> None:
        """Terminate every pod still running (each one's grace period, capped by --shutdown-grace), as the
        kubelet's graceful node shutdown does (pkg/kubelet/nodeshutdown)."""
        with self._lock:
            running = [w for w in self.workers.values() if not w.done.is_set()]
        for worker in running:
            worker.terminate(min(self.shutdown_grace, grace_period(worker.pod)))
        for worker in running:
            worker.join(self.shutdown_grace + 10)


def image_env() -> dict[str, str]:
    """The stand-in image's environment: this virtualenv's bin first on PATH (its python and batchgen), HOME, and
    PYTHONPATH when the agent has one (tests point it at a checkout)."""
    env = {"PATH": f"{Path(sys.executable).parent}:{DEFAULT_PATH}", "HOME": "/root"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--root", type=Path, required=True, help="pod folders, volumes and container logs")
    parser.add_argument("--cpu", default="16", help="cpu capacity (a quantity)")
    parser.add_argument("--memory", default="64Gi", help="memory capacity (a quantity)")
    parser.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu capacity")
    parser.add_argument(
        "--no-run", type=float, default=None, metavar="SECONDS", help="run nothing; exit 0 after SECONDS"
    )
    parser.add_argument(
        "--dns-kubeconfig",
        type=Path,
        help="identity that names are looked up with, as cluster DNS has one (lists Services and pods); "
        "default: --kubeconfig",
    )
    parser.add_argument("--shutdown-grace", type=int, default=10, help="cap on grace periods when the agent stops")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node-agent %(levelname)s %(message)s")
    if args.no_run is None and (os.geteuid() != 0 or shutil.which("unshare") is None):
        print(
            "node_agent: running containers needs root and unshare (a private mount namespace per pod)", file=sys.stderr
        )
        return EXIT_USAGE
    for option, path in (("--kubeconfig", args.kubeconfig), ("--dns-kubeconfig", args.dns_kubeconfig)):
        if path is not None and not path.is_file():
            print(f"node_agent: {option} {path}: no such file", file=sys.stderr)
            return EXIT_USAGE
    agent = NodeAgent(KubeApi(args.kubeconfig), args, KubeApi(args.dns_kubeconfig) if args.dns_kubeconfig else None)
    agent.root.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
    node = agent.register()
    threading.Thread(target=agent.heartbeat, args=(node["metadata"]["uid"],), daemon=True).start()
    threading.Thread(target=agent.watch_pods, name="pod watch", daemon=True).start()
    agent.stop.wait()
    log.info("stopping: terminating pods")
    agent.shut_down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
