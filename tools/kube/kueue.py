"""Kueue's manager (sigs.k8s.io/kueue cmd/kueue) as a local process on the harness's control plane, with what its
Deployment (config/default) would have supplied made the way the other operators' is (tools/kube/webhooks.py):
- its CRDs from the module's own kustomization (config/components/crd), whose conversion webhooks (v1beta1 <->
  v1beta2, path /convert) call https://127.0.0.1:PORT/convert with our CA instead of the webhook Service;
- its webhook configurations (config/components/webhook) the same way, keeping only the hooks of what the
  Configuration enables: Kueue's own kinds and TrainJobs. Kueue serves a no-op webhook for every other
  integration (jobframework SetupWebhook, NoopWebhook), so their hooks would only add a call to each Pod, Job
  and JobSet create;
- internal certificate management off: the webhook server reads our serving certificate from webhook.certDir,
  and the metrics server, which with it off always watches the fixed folder /etc/kueue/metrics/certs
  (cmd/kueue/main.go, metricsCertPath) even when metrics are off, gets the same pair bound over that folder;
- the visibility API server off (feature gate VisibilityOnDemand): it would need an APIService; leader election
  and metrics off.
The integration's framework name is trainer.kubeflow.org/trainjob (pkg/controller/jobs/trainjob/
trainjob_controller.go, FrameworkName). Its webhook suspends a TrainJob that carries kueue.x-k8s.io/queue-name on
create and appends Kueue's runtime patch to every TrainJob (trainjob_webhook.go Default), so the harness starts
Kueue only when asked and removes its webhooks again when it stops it.
"""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

from tools.kube import kubebin
from tools.kube.pki import CertPair
from tools.kube.webhooks import APPLY, Kubectl, _install_serving_cert, url_webhooks, wait_established

NAME = "kueue"
NAMESPACE = "kueue-system"  # the Configuration's default namespace (apis/config/v1beta2/defaults.go)
TRAINJOB_FRAMEWORK = "trainer.kubeflow.org/trainjob"
SERVED_GROUPS = {"kueue.x-k8s.io", "trainer.kubeflow.org"}
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
WEBHOOK_PREFIX = "kueue-"


def module() -> Path:
    return kubebin.module_dir(*kubebin.component("kueue").module_and_version())


def apply_crds(kubectl: Kubectl, port: int, ca: Path) -> None:
    """The CRDs with their conversion webhook at our loopback URL (Kueue serves /convert on its webhook port)."""
    ca_bundle = base64.b64encode(ca.read_bytes()).decode()
    # About 8 MB of YAML: libyaml's loader, the pure-Python one takes tens of seconds on a shared core.
    crds = list(yaml.load_all(kubectl("kustomize", str(module() / "config/components/crd")).stdout, yaml.CSafeLoader))
    for crd in crds:
        webhook = (crd["spec"].get("conversion") or {}).get("webhook")
        if webhook:
            path = webhook["clientConfig"]["service"].get("path", "/convert")
            webhook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}
    names = kubectl(*APPLY, "-f", "-", "-o", "name", stdin=yaml.dump_all(crds, Dumper=yaml.CSafeDumper))
    wait_established(kubectl, names.stdout.split())
    kubectl(*APPLY, "-f", "-", stdin=f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n")


def write_config(folder: Path, port: int, health_port: int, cert: CertPair) -> Path:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) and its serving certificates (webhook and metrics)."""
    cert_dir = folder / "certs"
    _install_serving_cert(cert_dir, cert)
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"port": port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "metrics": {"bindAddress": "0"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "integrations": {"frameworks": [TRAINJOB_FRAMEWORK]},
        "featureGates": {"VisibilityOnDemand": False},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def served(hook: dict) -> bool:
    return all(set(rule.get("apiGroups") or [""]) <= SERVED_GROUPS for rule in hook.get("rules") or [])


def apply_webhooks(kubectl: Kubectl, port: int, ca: Path, folder: Path) -> list[str]:
    """Kueue's webhook configurations at a loopback URL, only the hooks of the kinds it serves; returns their names
    (``remove_webhooks`` deletes them)."""
    rendered = kubectl("kustomize", str(module() / "config/components/webhook")).stdout
    configs = url_webhooks(rendered, port, ca, WEBHOOK_PREFIX)
    for config in configs:
        config["webhooks"] = [hook for hook in config["webhooks"] if served(hook)]
    path = folder / "webhooks.yaml"
    path.write_text(yaml.safe_dump_all(configs, sort_keys=False))
    kubectl(*APPLY, "-f", str(path))
    return [f"{config['kind'].lower()}/{config['metadata']['name']}" for config in configs]


def remove_webhooks(kubectl: Kubectl, names: list[str]) -> None:
    if names:
        kubectl("delete", *names, "--ignore-not-found", check=False)
