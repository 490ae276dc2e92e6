"""What the harness makes of Kueue's own manifests (tools/kube/kueue.py), without an API server: the conversion
webhooks and webhook configurations point at the loopback URL with our CA, only the hooks of what Kueue serves
are kept, and the Configuration turns on the TrainJob integration with internal certificates off."""

from __future__ import annotations

import base64
import subprocess

import yaml

from tools.kube import kueue
from tools.kube.pki import CertPair

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "workloads.kueue.x-k8s.io"},
    "spec": {
        "conversion": {
            "strategy": "Webhook",
            "webhook": {"clientConfig": {"service": {"name": "kueue-webhook-service", "path": "/convert"}}},
        }
    },
}
PLAIN_CRD = {**CRD, "metadata": {"name": "resourceflavors.kueue.x-k8s.io"}, "spec": {}}


def hook(name: str, group: str, path: str) -> dict:
    rule = {"apiGroups": [group], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["x"]}
    return {"name": name, "clientConfig": {"service": {"name": "kueue-webhook-service", "path": path}}, "rules": [rule]}


WEBHOOKS = {
    "apiVersion": "admissionregistration.k8s.io/v1",
    "kind": "MutatingWebhookConfiguration",
    "metadata": {"name": "mutating-webhook-configuration"},
    "webhooks": [
        hook("mtrainjob.kb.io", "trainer.kubeflow.org", "/mutate-trainjob"),
        hook("mworkload.kb.io", "kueue.x-k8s.io", "/mutate-workload"),
        hook("mpod.kb.io", "", "/mutate--v1-pod"),
        hook("mjob.kb.io", "batch", "/mutate-batch-v1-job"),
    ],
}


class FakeKubectl:
    """Answers `kubectl kustomize` with the given documents and records what is applied."""

    def __init__(self, rendered: list[dict]):
        self.rendered = yaml.safe_dump_all(rendered)
        self.calls: list[tuple[tuple[str, ...], str | None]] = []

    def __call__(self, *args: str, check: bool = True, stdin: str | None = None):
        self.calls.append((args, stdin))
        if args[0] == "kustomize":
            out = self.rendered
        elif args[0] == "get":
            out = "True"  # Established
        else:
            out = "\n".join(
                f"customresourcedefinition/{d['metadata']['name']}" for d in yaml.safe_load_all(stdin or "")
            )
        return subprocess.CompletedProcess(args, 0, out, "")


def test_crds_convert_through_the_loopback_url_with_our_ca(tmp_path, monkeypatch):
    monkeypatch.setattr(kueue, "module", lambda: tmp_path)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"our CA")
    kubectl = FakeKubectl([CRD, PLAIN_CRD])
    kueue.apply_crds(kubectl, 9443, ca)
    applied = next(stdin for args, stdin in kubectl.calls if "-o" in args)
    crds = {d["metadata"]["name"]: d for d in yaml.safe_load_all(applied)}
    client = crds["workloads.kueue.x-k8s.io"]["spec"]["conversion"]["webhook"]["clientConfig"]
    assert client == {"url": "https://127.0.0.1:9443/convert", "caBundle": base64.b64encode(b"our CA").decode()}
    assert "conversion" not in crds["resourceflavors.kueue.x-k8s.io"]["spec"]
    assert any(f"name: {kueue.NAMESPACE}" in (stdin or "") for _, stdin in kubectl.calls)


def test_only_the_hooks_of_kueues_kinds_and_trainjobs_are_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(kueue, "module", lambda: tmp_path)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"our CA")
    names = kueue.apply_webhooks(FakeKubectl([WEBHOOKS]), 9443, ca, tmp_path)
    assert names == ["mutatingwebhookconfiguration/kueue-mutating-webhook-configuration"]
    (config,) = yaml.safe_load_all((tmp_path / "webhooks.yaml").read_text())
    hooks = {h["name"]: h["clientConfig"]["url"] for h in config["webhooks"]}
    assert hooks == {
        "mtrainjob.kb.io": "https://127.0.0.1:9443/mutate-trainjob",
        "mworkload.kb.io": "https://127.0.0.1:9443/mutate-workload",
    }


def test_configuration_enables_the_trainjob_integration_with_our_certificates(tmp_path):
    cert, key = tmp_path / "s.crt", tmp_path / "s.key"
    cert.write_text("cert")
    key.write_text("key")
    config = yaml.safe_load(kueue.write_config(tmp_path / "kueue", 9443, 8081, CertPair(cert, key)).read_text())
    assert config["integrations"] == {"frameworks": ["trainer.kubeflow.org/trainjob"]}
    assert config["internalCertManagement"] == {"enable": False}
    assert config["featureGates"] == {"VisibilityOnDemand": False}
    cert_dir = tmp_path / "kueue" / "certs"
    assert config["webhook"]["certDir"] == str(cert_dir)
    assert (cert_dir / "tls.crt").read_text() == "cert" and (cert_dir / "tls.key").read_text() == "key"
