"""The local control plane's certificates and kubeconfigs: one CA signs the API server's and the webhooks' serving
certificates and every client certificate; a separate RSA key signs ServiceAccount tokens.

Identities follow kubeadm's (`cmd/kubeadm/app/phases/certs`, `.../kubeconfig`): the admin is in
`system:masters`, the controller-manager and the scheduler are `system:kube-controller-manager` and
`system:kube-scheduler` (the API server's bootstrap RBAC binds those names), and each node is
`system:node:<name>` in `system:nodes`, which the Node authorizer recognises.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Loopback plus the in-cluster names a pod's client uses for the API server (kubernetes.default.svc and the
# first address of --service-cluster-ip-range).
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
API_SERVER_SANS = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
# More than the 90 days ahead that the training operator's cert rotator (open-policy-agent/cert-controller) looks:
# with less it replaces our CA with its own and its webhook stops matching the certificate on disk.
LIFETIME = datetime.timedelta(days=365)
CA_KEY_USAGE = dict.fromkeys(
    ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "encipher_only", "decipher_only"),
    False,
) | {"digital_signature": True, "key_cert_sign": True, "crl_sign": True}


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _key(rsa_pkcs1: bool):
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_pkcs1
        else ec.generate_private_key(ec.SECP256R1())
    )


def _write_key(key, path: Path) -> None:
    # RSA keys as PKCS#1 ("RSA PRIVATE KEY"): cert-controller reads a CA key only in that form.
    form = serialization.PrivateFormat.TraditionalOpenSSL if isinstance(key, rsa.RSAPrivateKey) else None
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, form or serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


class Pki:
    """Writes its files under ``directory``; every method returns the paths it wrote."""

    def __init__(self, directory: Path, ca_name: str = "batchgen-local-ca", rsa_pkcs1: bool = False):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._rsa_pkcs1 = rsa_pkcs1
        self._ca_key = _key(rsa_pkcs1)
        now = datetime.datetime.now(datetime.timezone.utc)
        self._ca_cert = (
            self._builder(_name(ca_name), now)
            .issuer_name(_name(ca_name))
            .public_key(self._ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(**CA_KEY_USAGE), critical=True)
            # A CA valid for its own name: what cert-controller's rotator checks before it keeps a given CA.
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(ca_name)]), critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = self.dir / "ca.crt"
        self.ca.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        self.ca_key = self.dir / "ca.key"
        _write_key(self._ca_key, self.ca_key)

    @staticmethod
    def _builder(subject: x509.Name, now: datetime.datetime) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + LIFETIME)
        )

    def _issue(self, stem: str, subject: x509.Name, usage, sans: list[x509.GeneralName] | None = None) -> CertPair:
        key = _key(self._rsa_pkcs1)
        builder = (
            self._builder(subject, datetime.datetime.now(datetime.timezone.utc))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        pair = CertPair(self.dir / f"{stem}.crt", self.dir / f"{stem}.key")
        pair.cert.write_bytes(builder.sign(self._ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        _write_key(key, pair.key)
        return pair

    def serving(self, stem: str, dns_names: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ()) -> CertPair:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", *ips)]
        return self._issue(stem, _name(stem), ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def api_server(self) -> CertPair:
        first_service_ip = str(next(ipaddress.ip_network(SERVICE_CLUSTER_IP_RANGE).hosts()))
        return self.serving("kube-apiserver", API_SERVER_SANS, (first_service_ip,))

    def client(self, stem: str, user: str, group: str | None = None) -> CertPair:
        return self._issue(stem, _name(user, group), ExtendedKeyUsageOID.CLIENT_AUTH)

    def service_account_keys(self) -> CertPair:
        """RSA: the API server signs ServiceAccount tokens with it (RS256, what every client expects)."""
        key = _key(rsa_pkcs1=True)
        pair = CertPair(self.dir / "sa.pub", self.dir / "sa.key")
        _write_key(key, pair.key)
        pair.cert.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        return pair


def write_kubeconfig(path: Path, server: str, ca: Path, client: CertPair, user: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user, "namespace": "default"}}],
        "current-context": "local",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
