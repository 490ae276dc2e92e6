"""A real Kubernetes control plane on loopback, from the binaries `make kube-bin` builds (tools/kube/kubebin.py).

    python tools/kube/controlplane.py up [--dir D] [--nodes N]   # prints export lines (`make kube-up`)
    python tools/kube/controlplane.py down [--dir D]             # `make kube-down`

etcd, kube-apiserver (our certificates, Node+RBAC authorization, ServiceAccount tokens, the default admission
plugins with NodeRestriction added, a Metadata audit log), kube-controller-manager, kube-scheduler, the JobSet
controller and the Kubeflow Trainer controller manager (their CRDs, webhooks and ClusterTrainingRuntimes read
from the built modules themselves), a moto S3 server, and the node agents (tools/kube/node_agent.py, the one
stand-in: it plays the kubelet). tests/realk8s/conftest.py starts the same ControlPlane.

The flags follow controller-runtime's envtest (pkg/internal/testing/controlplane/apiserver.go, etcd.go) with the
admission plugins it turns off turned back on, and kwok's kwokctl for the controller-manager and scheduler
(pkg/kwokctl/components/kube_controller_manager.go, kube_scheduler.go).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import ssl
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools.kube` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.kube import kubebin, kueue, pki, webhooks  # noqa: E402
from tools.kube.processes import Process, StartupError, free_port, http_ok, tls_context, tls_listening  # noqa: E402

DEFAULT_DIR = Path(os.environ.get("BATCHGEN_KUBE_DIR", Path.home() / ".cache" / "batchgen" / "kube-up"))
NODE_AGENT = Path(__file__).resolve().parent / "node_agent.py"
NODE_CAPACITY = ("--cpu", "16", "--memory", "64Gi", "--gpus", "4")  # `make kube-up`'s nodes: room for a 2 x 2 run
# Every controller batchgen's jobs and the next issue's lifecycle tests lean on; nothing for Services or volumes
# beyond binding a PVC to a PersistentVolume.
CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "ttl-after-finished-controller",
    "pod-garbage-collector-controller",
    # Removes the node.kubernetes.io/not-ready taint (TaintNodesByCondition admission puts it on every new Node)
    # once the node agent reports Ready, and marks a node whose agent stopped heartbeating NotReady.
    "node-lifecycle-controller",
    "clusterrole-aggregation-controller",
    "persistentvolume-binder-controller",
)
# Who names are looked up with (node agents' --dns-kubeconfig): a node may list only its own pods, cluster DNS may
# list them all. The rules are CoreDNS's ClusterRole (coredns/deployment kubernetes/coredns.yaml.sed), read-only.
DNS_USER = "batchgen:node-dns"
DNS_RULES = [
    {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
]
AUDIT_POLICY = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": [{"level": "Metadata"}]}
STATE_FILE = "state.json"


class ControlPlane:
    """Starts the components in dependency order under ``root`` (one folder each) and stops them in reverse."""

    def __init__(self, root: Path, nodes: int = 1, with_kueue: bool = False):
        self.root = root
        self.nodes = nodes
        self.with_kueue = with_kueue
        self.bin = kubebin.bin_dir()
        self.started: list[Process] = []
        self.ports: dict[str, int] = {}
        self.node_names: list[str] = []

    # -- the pieces -------------------------------------------------------------------------------------------
    def _proc(self, name: str, argv: list[str], env: dict[str, str] | None = None, launcher: list[str] = ()) -> Process:
        process = Process(name, self.root / name).start(argv, env, launcher)
        self.started.append(process)
        return process

    def _binary(self, name: str) -> str:
        path = self.bin / name
        if not path.exists():
            raise StartupError(f"{path} is missing: run `make kube-bin` first")
        return str(path)

    def _certificates(self) -> None:
        self.pki = pki.Pki(self.root / "pki")
        self.api_cert = self.pki.api_server()
        self.sa_keys = self.pki.service_account_keys()
        self.webhook_cert = self.pki.serving("webhooks")
        self.ports["apiserver"] = free_port()
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"
        identities = {
            "admin": ("batchgen-admin", "system:masters"),
            "controller-manager": ("system:kube-controller-manager", None),
            "scheduler": ("system:kube-scheduler", None),
        }
        self.kubeconfigs = {
            stem: pki.write_kubeconfig(
                self.root / f"{stem}.kubeconfig", self.server, self.pki.ca, self.pki.client(stem, user, group), user
            )
            for stem, (user, group) in identities.items()
        }
        self.kubeconfig = self.kubeconfigs["admin"]

    def _etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.ports["etcd"] = client
        folder = self.root / "etcd"
        process = self._proc(
            "etcd",
            [
                self._binary("etcd"),
                f"--data-dir={folder / 'data'}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync=true",  # test data: envtest's choice, several times faster on a shared disk
            ],
        )
        process.wait_until(lambda: http_ok(f"http://127.0.0.1:{client}/health"), "health")

    def _apiserver(self) -> None:
        folder = self.root / "kube-apiserver"
        folder.mkdir(parents=True, exist_ok=True)
        policy = folder / "audit-policy.json"
        policy.write_text(json.dumps(AUDIT_POLICY))
        self.audit_log = folder / "audit.log"
        port = self.ports["apiserver"]
        process = self._proc(
            "kube-apiserver",
            [
                self._binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # The `kubernetes` Service's Endpoints may not hold a loopback address; node agents give pods
                # KUBERNETES_SERVICE_HOST=127.0.0.1 themselves.
                "--endpoint-reconciler-type=none",
                f"--secure-port={port}",
                f"--cert-dir={folder / 'certs'}",
                f"--tls-cert-file={self.api_cert.cert}",
                f"--tls-private-key-file={self.api_cert.key}",
                f"--client-ca-file={self.pki.ca}",
                "--authorization-mode=Node,RBAC",
                # The defaults (NamespaceLifecycle, LimitRanger, ServiceAccount, PodSecurity, the admission
                # webhooks, ...) stay on; NodeRestriction keeps each node agent to its own Node and pods.
                "--enable-admission-plugins=NodeRestriction",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={self.sa_keys.cert}",
                f"--service-account-signing-key-file={self.sa_keys.key}",
                f"--service-cluster-ip-range={pki.SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
            ],
        )
        admin = tls_context(self.pki.ca, *self._admin_pair())
        process.wait_until(lambda: http_ok(f"{self.server}/readyz", admin), "/readyz", timeout_s=180)

    def _admin_pair(self) -> tuple[Path, Path]:
        return self.pki.dir / "admin.crt", self.pki.dir / "admin.key"

    def _controller_manager_and_scheduler(self) -> list[tuple[Process, int]]:
        cm_port, sched_port = free_port(), free_port()
        cm = self._proc(
            "kube-controller-manager",
            [
                self._binary("kube-controller-manager"),
                f"--kubeconfig={self.kubeconfigs['controller-manager']}",
                f"--authentication-kubeconfig={self.kubeconfigs['controller-manager']}",
                f"--authorization-kubeconfig={self.kubeconfigs['controller-manager']}",
                "--leader-elect=false",
                f"--controllers={','.join(CONTROLLERS)}",
                # Each controller acts as its own ServiceAccount, bound by the API server's bootstrap RBAC.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.sa_keys.key}",
                f"--root-ca-file={self.pki.ca}",
                "--bind-address=127.0.0.1",
                f"--secure-port={cm_port}",
            ],
        )
        scheduler = self._proc(
            "kube-scheduler",
            [
                self._binary("kube-scheduler"),
                f"--kubeconfig={self.kubeconfigs['scheduler']}",
                f"--authentication-kubeconfig={self.kubeconfigs['scheduler']}",
                f"--authorization-kubeconfig={self.kubeconfigs['scheduler']}",
                "--leader-elect=false",
                "--v=2",  # one line per binding or scheduling failure
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
            ],
        )
        return [(cm, cm_port), (scheduler, sched_port)]

    def _moto(self) -> None:
        port = free_port()
        self.s3_endpoint = f"http://127.0.0.1:{port}"
        moto = str(Path(sys.executable).parent / "moto_server")
        process = self._proc("moto-s3", [moto, "-H", "127.0.0.1", "-p", str(port)])
        process.wait_until(lambda: http_ok(f"{self.s3_endpoint}/"), "an answer on /")

    def _operators(self) -> None:
        """JobSet first: the TrainJob controller creates JobSets, and JobSet's pod webhook fails closed."""
        for operator in webhooks.operators():
            operator.apply_crds(self.kubectl)
            port, health = free_port(), free_port()
            folder = self.root / operator.name
            config = operator.write_config(folder, port, health, self.webhook_cert)
            process = self._proc(
                operator.name,
                [self._binary(operator.binary), f"--config={config}", f"--kubeconfig={self.kubeconfig}"],
                env={"TMPDIR": str(operator.tmpdir(folder))},
            )
            process.wait_until(lambda h=health: http_ok(f"http://127.0.0.1:{h}/readyz"), "/readyz")
            process.wait_until(lambda p=port: tls_listening(p, self.pki.ca), "webhook TLS")
            operator.apply_webhooks(self.kubectl, port, self.pki.ca, folder)
            operator.apply_after_webhooks(self.kubectl)

    def _training_operator(self) -> None:
        """Optional (it may not have built: kubebin records why). PyTorchJob only, as batchgen uses it."""
        if not (self.bin / "training-operator.v1").exists():
            print("kube-up: training-operator.v1 not built: PyTorchJobs are validated, not run", file=sys.stderr)
            return
        port, health = free_port(), free_port()
        folder = self.root / "training-operator"
        cert_dir = webhooks.prepare_training_operator(self.kubectl, folder, port)
        process = self._proc(
            "training-operator",
            [
                self._binary("training-operator.v1"),
                "--enable-scheme=pytorchjob",
                f"--webhook-server-port={port}",
                "--metrics-bind-address=0",
                f"--health-probe-bind-address=127.0.0.1:{health}",
            ],
            env={"KUBECONFIG": str(self.kubeconfig)},
            launcher=webhooks.operator_launcher(cert_dir),
        )
        process.wait_until(lambda: http_ok(f"http://127.0.0.1:{health}/readyz"), "/readyz")

    def start_kueue(self) -> Process:
        """Kueue's manager with the TrainJob integration (tools/kube/kueue.py says what stands in for its
        Deployment). Not part of ``start``: its TrainJob webhook changes every TrainJob created while it runs."""
        port, health = free_port(), free_port()
        folder = self.root / kueue.NAME
        folder.mkdir(parents=True, exist_ok=True)
        kueue.apply_crds(self.kubectl, port, self.pki.ca)
        config = kueue.write_config(folder, port, health, self.webhook_cert)
        process = self._proc(
            kueue.NAME,
            [self._binary("kueue"), f"--config={config}", f"--kubeconfig={self.kubeconfig}"],
            launcher=webhooks.operator_launcher(folder / "certs", kueue.METRICS_CERT_DIR),
        )
        process.wait_until(lambda: http_ok(f"http://127.0.0.1:{health}/readyz"), "/readyz")
        process.wait_until(lambda: tls_listening(port, self.pki.ca), "webhook TLS")
        self.kueue_webhooks = kueue.apply_webhooks(self.kubectl, port, self.pki.ca, folder)
        return process

    def stop_kueue(self) -> None:
        """Its webhooks first (they fail closed), then the manager; its CRDs and objects stay."""
        kueue.remove_webhooks(self.kubectl, getattr(self, "kueue_webhooks", []))
        self.kueue_webhooks = []
        process = next((p for p in self.started if p.name == kueue.NAME), None)
        if process is not None:
            process.stop()
            self.started.remove(process)

    def _dns_identity(self) -> None:
        role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole"}
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": DNS_USER},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": DNS_USER}],
        }
        objects = [
            {**role, "metadata": {"name": DNS_USER}, "rules": DNS_RULES},
            {**binding, "metadata": {"name": DNS_USER}},
        ]
        self.kubectl(
            "apply",
            "--server-side",
            "--field-manager=batchgen-kube-up",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
        )
        self.kubeconfigs["dns"] = pki.write_kubeconfig(
            self.root / "dns.kubeconfig", self.server, self.pki.ca, self.pki.client("dns", DNS_USER), DNS_USER
        )

    def node_kubeconfig(self, name: str) -> Path:
        """The kubelet's identity for Node ``name``: user system:node:<name> in group system:nodes."""
        user = f"system:node:{name}"
        client_cert = self.pki.client(name, user, "system:nodes")
        return pki.write_kubeconfig(self.root / f"{name}.kubeconfig", self.server, self.pki.ca, client_cert, user)

    def add_node(self, name: str, *agent_args: str) -> Process:
        """Starts a node agent for Node ``name`` (extra flags: --cpu, --gpus, --no-run, ...); the checkout is its
        PYTHONPATH, so the pods it runs import this batchgen, whatever the virtualenv's install points at."""
        if not NODE_AGENT.exists():
            raise StartupError(f"{NODE_AGENT} is missing")
        argv = [sys.executable, str(NODE_AGENT), "--kubeconfig", str(self.node_kubeconfig(name)), "--node-name", name]
        argv += ["--dns-kubeconfig", str(self.kubeconfigs["dns"]), "--root", str(self.root / name / "root")]
        process = self._proc(name, [*argv, *agent_args], env={"PYTHONPATH": str(NODE_AGENT.parents[2])})
        self.node_names.append(name)
        return process

    def remove_node(self, name: str) -> None:
        """Stops its agent (its pods get SIGTERM) and deletes the Node, so nothing is scheduled there again."""
        process = next(p for p in self.started if p.name == name)
        process.stop(grace_s=30)
        self.started.remove(process)
        self.node_names.remove(name)
        self.kubectl("delete", "node", name, "--wait=false", check=False)

    def _node_schedulable(self, name: str) -> bool:
        answer = self.kubectl("get", "node", name, "-o", "json", check=False)
        if answer.returncode != 0:
            return False
        node = json.loads(answer.stdout)
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        return ready and not node["spec"].get("taints")

    def wait_nodes_ready(self, timeout_s: float = 90) -> None:
        """Ready, and the not-ready taint removed by the node lifecycle controller: the scheduler may bind there."""
        for name in self.node_names:
            process = next(p for p in self.started if p.name == name)
            process.wait_until(lambda n=name: self._node_schedulable(n), "Ready untainted node", timeout_s=timeout_s)

    def _default_service_account(self) -> None:
        """The serviceaccount controller creates `default` in each namespace: the sign that controllers run."""
        cm = next(p for p in self.started if p.name == "kube-controller-manager")
        cm.wait_until(
            lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
            "ServiceAccount default/default",
        )

    # -- public ------------------------------------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None):
        import subprocess

        result = subprocess.run(
            [self._binary("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise StartupError(f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def start(self) -> float:
        """Starts everything, returns the seconds it took; on any failure stops what it started, then raises."""
        started_at = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._certificates()
            self._etcd()
            self._apiserver()
            for process, port in self._controller_manager_and_scheduler():
                insecure = ssl._create_unverified_context()  # their self-signed serving certs, loopback only
                process.wait_until(lambda p=port, c=insecure: http_ok(f"https://127.0.0.1:{p}/healthz", c), "/healthz")
            self._moto()
            self._operators()
            webhooks.apply_pytorchjob_crd(self.kubectl)
            self._training_operator()
            if self.with_kueue:
                self.start_kueue()
            self._dns_identity()
            for index in range(self.nodes):
                self.add_node(f"batchgen-node-{index}", *NODE_CAPACITY)
            self.wait_nodes_ready()
            self._default_service_account()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started_at
        self._write_state()
        return self.startup_s

    def _write_state(self) -> None:
        state = {
            "processes": [p.name for p in self.started],
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "bin": str(self.bin),
            "s3_endpoint": self.s3_endpoint,
            "audit_log": str(self.audit_log),
            "ca": str(self.pki.ca),
            "nodes": self.node_names,
            "startup_s": round(self.startup_s, 1),
        }
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

    def env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin}:{os.environ.get('PATH', '')}",
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
        }

    def stop(self) -> None:
        for process in reversed(self.started):
            process.stop()
        self.started = []


def stop_recorded(root: Path) -> list[str]:
    """`make kube-down`: stops, newest first, every process the state file (or a half-finished start) names."""
    state_file = root / STATE_FILE
    names = json.loads(state_file.read_text())["processes"] if state_file.exists() else []
    names += sorted(p.parent.name for p in root.glob("*/pid.json") if p.parent.name not in names)
    stopped = []
    for name in reversed(names):
        process = Process(name, root / name)
        if process.running_pid() is not None:
            stopped.append(name)
        process.stop()
    state_file.unlink(missing_ok=True)
    return stopped


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="controlplane.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state and data folders (default {DEFAULT_DIR})")
    parser.add_argument("--nodes", type=int, default=2, help="node agents to start (default 2)")
    parser.add_argument("--kueue", action="store_true", help="also start Kueue's manager (TrainJob integration)")
    args = parser.parse_args(argv)
    if args.command == "down":
        stopped = stop_recorded(args.dir)
        print(f"kube-down: stopped {', '.join(stopped) or 'nothing (none running)'}", file=sys.stderr)
        return 0
    if (args.dir / STATE_FILE).exists():
        print(f"kube-up: {args.dir / STATE_FILE} exists: run `make kube-down` first", file=sys.stderr)
        return 1
    plane = ControlPlane(args.dir, nodes=args.nodes, with_kueue=args.kueue)
    try:
        seconds = plane.start()
    except StartupError as err:
        print(f"kube-up: {err}", file=sys.stderr)
        return 1
    print(
        f"kube-up: control plane ready in {seconds:.1f} s (logs under {args.dir}); stop it with make kube-down",
        file=sys.stderr,
    )
    for name, value in plane.env().items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
