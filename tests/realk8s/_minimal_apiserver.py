"""etcd and kube-apiserver from `make kube-bin`'s cache, just enough for the node agent's tests.

A stop-gap kept apart from the harness (tools/kube/controlplane.py): the same flags (envtest's, with the Node
authorizer and NodeRestriction on), our own CA, an admin client certificate and a `system:node:<name>` one for the
agent, the controller-manager (job, serviceaccount and root-ca-cert-publisher controllers) and the scheduler.
Swap it for the harness once both branches are merged.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

CACHE = Path.home() / ".cache" / "batchgen" / "kube"
NEEDED = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# node-lifecycle-controller: it removes the node.kubernetes.io/not-ready:NoSchedule taint that the TaintNodesByCondition
# admission plugin puts on every new Node (the kubelet leaves that to it); without it the scheduler binds nothing.
CONTROLLERS = (
    "job-controller,serviceaccount-controller,root-ca-certificate-publisher-controller,node-lifecycle-controller"
)


def bin_dir() -> Path | None:
    """The newest build folder holding etcd, kube-apiserver, the controller-manager and the scheduler, or None."""
    found = [d for d in CACHE.glob("*/bin") if all((d / name).is_file() for name in NEEDED)]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pair:
    cert: Path
    key: Path


class Pki:
    """A CA, and certificates it signs, as PEM files in one folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-agent-test-ca")])
        builder = self._builder(name, name, self._ca_key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        self._ca_cert = builder.sign(self._ca_key, hashes.SHA256())
        self.ca = self._write("ca", self._ca_cert, self._ca_key).cert

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=2))
        )

    def _write(self, stem: str, cert: x509.Certificate, key) -> Pair:
        pair = Pair(self.folder / f"{stem}.crt", self.folder / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return pair

    def issue(self, stem: str, common_name: str, organization: str | None = None, server: bool = False) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        builder = self._builder(x509.Name(attributes), self._ca_cert.subject, key.public_key())
        usage = x509.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            names.append(x509.IPAddress(ipaddress.ip_address("10.0.0.1")))  # the `kubernetes` Service's ClusterIP
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return self._write(stem, builder.sign(self._ca_key, hashes.SHA256()), key)

    def service_account_keys(self) -> Pair:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pair = Pair(self.folder / "sa.pub", self.folder / "sa.key")
        pair.cert.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            )
        )
        return pair


def write_kubeconfig(path: Path, server: str, ca: Path, pair: Pair, user: str) -> Path:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {{server: "{server}", certificate-authority: "{ca}"}}
users:
- name: {user}
  user: {{client-certificate: "{pair.cert}", client-key: "{pair.key}"}}
contexts:
- name: local
  context: {{cluster: local, user: {user}}}
current-context: local
"""
    )
    return path


class MinimalApiServer:
    """etcd + kube-apiserver under `root`; `kubeconfig` is the admin's, `node_kubeconfig(name)` a node's."""

    def __init__(self, root: Path, binaries: Path):
        self.root, self.bin = root, binaries
        self.processes: list[subprocess.Popen] = []
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the process keeps it open
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def start(self) -> float:
        began = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self.pki = Pki(self.root / "pki")
        serving = self.pki.issue("apiserver", "kube-apiserver", server=True)
        accounts = self.pki.service_account_keys()
        admin = self.pki.issue("admin", "node-agent-test-admin", "system:masters")
        self.kubeconfig = write_kubeconfig(self.root / "admin.kubeconfig", self.server, self.pki.ca, admin, "admin")
        etcd_port, peer_port = free_port(), free_port()
        self._spawn("etcd", [
            str(self.bin / "etcd"), f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}", f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{peer_port}", "--unsafe-no-fsync=true",
        ])  # fmt: skip
        self._spawn("kube-apiserver", [
            str(self.bin / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--cert-dir={self.root / 'certs'}", f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}", f"--client-ca-file={self.pki.ca}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={self.server}", f"--service-account-key-file={accounts.cert}",
            f"--service-account-signing-key-file={accounts.key}", "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
        ])  # fmt: skip
        self._wait_ready(admin)
        self._controllers(accounts)
        return time.monotonic() - began

    def _controllers(self, accounts: Pair) -> None:
        """kube-controller-manager and kube-scheduler with the admin identity, as kwokctl runs them."""
        ports = free_port(), free_port()
        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1"]
        self._spawn("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"), *common, f"--secure-port={ports[0]}",
            f"--controllers={CONTROLLERS}", f"--service-account-private-key-file={accounts.key}",
            f"--root-ca-file={self.pki.ca}",
        ])  # fmt: skip
        self._spawn("kube-scheduler", [str(self.bin / "kube-scheduler"), *common, f"--secure-port={ports[1]}"])
        insecure = ssl._create_unverified_context()  # their self-signed serving certificates, on loopback
        for port in ports:
            self._wait_ok(f"https://127.0.0.1:{port}/healthz", insecure, 60)

    def _wait_ready(self, admin: Pair) -> None:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(admin.cert), str(admin.key))
        self._wait_ok(f"{self.server}/readyz", context, 180)

    def _wait_ok(self, url: str, context: ssl.SSLContext, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited {process.returncode}; see {self.root}/*.log")
            try:
                with urllib.request.urlopen(url, context=context, timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{url} not answering after {timeout_s} s; see {self.root}/*.log")

    def node_kubeconfig(self, name: str) -> Path:
        pair = self.pki.issue(name, f"system:node:{name}", "system:nodes")
        return write_kubeconfig(self.root / f"{name}.kubeconfig", self.server, self.pki.ca, pair, name)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
