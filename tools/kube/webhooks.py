"""JobSet and the Kubeflow Trainer as local processes: their CRDs, webhook configurations and ClusterTrainingRuntimes
come from the very module versions `make kube-bin` built (the unpacked module zip), rendered with the built
kubectl's kustomize; only what a Deployment would have supplied is changed here:
- the webhook configurations call https://127.0.0.1:PORT/<path> with our CA in caBundle instead of a Service,
  as envtest's WebhookInstallOptions (controller-runtime pkg/envtest/webhook.go) and the Trainer's own
  test/integration/framework do;
- certificate rotation is off, and our serving certificate is where controller-runtime's webhook server looks
  (webhook.certDir for JobSet; $TMPDIR/k8s-webhook-server/serving-certs, its default, for the Trainer);
- leader election and metrics are off.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tools.kube import kubebin
from tools.kube.pki import CertPair, Pki

WEBHOOK_KINDS = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
APPLY = ("apply", "--server-side", "--field-manager=batchgen-kube-up")
Kubectl = Callable[..., subprocess.CompletedProcess]


def _install_serving_cert(cert_dir: Path, cert: CertPair) -> None:
    cert_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(cert.cert, cert_dir / "tls.crt")
    shutil.copy(cert.key, cert_dir / "tls.key")


def wait_established(kubectl: Kubectl, crds: list[str], timeout_s: float = 60) -> None:
    """Polls instead of `kubectl wait`, which errors out when it reads a CRD before its status has conditions."""
    established = "jsonpath={.status.conditions[?(@.type=='Established')].status}"
    deadline = time.monotonic() + timeout_s
    for crd in crds:
        while kubectl("get", crd, "-o", established, check=False).stdout.strip() != "True":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{crd} not Established after {timeout_s:.0f} s")
            time.sleep(0.2)


def url_webhooks(rendered: str, port: int, ca: Path, name_prefix: str) -> list[dict]:
    """The rendered webhook configurations with each Service reference turned into a loopback URL."""
    ca_bundle = base64.b64encode(ca.read_bytes()).decode()
    configs = [doc for doc in yaml.safe_load_all(rendered) if doc and doc.get("kind") in WEBHOOK_KINDS]
    for config in configs:
        if not config["metadata"]["name"].startswith(name_prefix):
            config["metadata"]["name"] = name_prefix + config["metadata"]["name"]
        for hook in config["webhooks"]:
            path = hook["clientConfig"]["service"].get("path", "/")
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}
    return configs


@dataclass(frozen=True)
class Operator:
    name: str  # process and folder name
    binary: str
    component: str  # kubebin component whose module holds the manifests
    crds: str  # path in the module: a file (applied with -f) or a kustomization (-k)
    webhooks: str  # kustomization of the webhook configurations
    name_prefix: str  # what the project's own default overlay prefixes the configurations' names with
    after_webhooks: tuple[str, ...] = ()  # kustomizations applied once the webhooks answer (validated objects)

    def module(self) -> Path:
        module, version = kubebin.component(self.component).module_and_version()
        return kubebin.module_dir(module, version)

    def apply_crds(self, kubectl: Kubectl) -> None:
        path = self.module() / self.crds
        source = ["-k", str(path)] if path.is_dir() else ["-f", str(path)]
        names = kubectl(*APPLY, *source, "-o", "name")
        wait_established(kubectl, names.stdout.split())

    def tmpdir(self, folder: Path) -> Path:
        path = folder / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_config(self, folder: Path, port: int, health_port: int, cert: CertPair) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if self.name == "jobset":
            cert_dir = folder / "certs"
            config = {
                "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
                "kind": "Configuration",
                "leaderElection": {"leaderElect": False},
                "internalCertManagement": {"enable": False},
                "webhook": {"port": port, "host": "127.0.0.1", "certDir": str(cert_dir)},
                "metrics": {"bindAddress": "0"},
                "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
            }
        else:
            cert_dir = self.tmpdir(folder) / "k8s-webhook-server" / "serving-certs"
            config = {
                "apiVersion": "config.trainer.kubeflow.org/v1alpha1",
                "kind": "Configuration",
                "leaderElection": {"leaderElect": False},
                "certManagement": {"enable": False},
                "webhook": {"port": port, "host": "127.0.0.1"},
                "metrics": {"bindAddress": "0"},
                "health": {
                    "healthProbeBindAddress": f"127.0.0.1:{health_port}",
                    "readinessEndpointName": "readyz",
                    "livenessEndpointName": "healthz",
                },
            }
        _install_serving_cert(cert_dir, cert)
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def apply_webhooks(self, kubectl: Kubectl, port: int, ca: Path, folder: Path) -> None:
        rendered = kubectl("kustomize", str(self.module() / self.webhooks)).stdout
        configs = url_webhooks(rendered, port, ca, self.name_prefix)
        path = folder / "webhooks.yaml"
        path.write_text(yaml.safe_dump_all(configs, sort_keys=False))
        kubectl(*APPLY, "-f", str(path))

    def apply_after_webhooks(self, kubectl: Kubectl) -> None:
        for kustomization in self.after_webhooks:
            kubectl(*APPLY, "-k", str(self.module() / kustomization))


def operators() -> list[Operator]:
    return [
        Operator(
            name="jobset",
            binary="jobset",
            component="jobset",
            crds="config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml",
            webhooks="config/components/webhook",
            name_prefix="jobset-",
        ),
        Operator(
            name="trainer",
            binary="trainer-controller-manager",
            component="trainer",
            crds="manifests/base/crds",
            webhooks="manifests/base/webhook",
            name_prefix="",  # its kustomization already names them (validator.trainer.kubeflow.org, ...)
            after_webhooks=("manifests/base/runtimes",),
        ),
    ]


def apply_pytorchjob_crd(kubectl: Kubectl) -> None:
    """The v1 training operator's PyTorchJob CRD, from its module, so the server validates PyTorchJobs even where
    the operator itself did not build (kubebin records why)."""
    module, version = kubebin.component("training-operator").module_and_version()
    crd = kubebin.module_dir(module, version) / "manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
    kubectl(*APPLY, "-f", str(crd))
    wait_established(kubectl, ["crd/pytorchjobs.kubeflow.org"])


TRAINING_OPERATOR_NAMESPACE = "kubeflow"  # the operator's default (pkg/cert/cert.go, MY_POD_NAMESPACE unset)
TRAINING_OPERATOR_SERVICE = "training-operator"  # --webhook-service-name's default
TRAINING_OPERATOR_SECRET = "training-operator-webhook-cert"
TRAINING_OPERATOR_CA = "training-operator-ca"  # pkg/cert/cert.go caName
# Its cert rotator (open-policy-agent/cert-controller) cannot be turned off and reads the kubelet-mounted Secret
# from this fixed folder (pkg/cert/cert.go); operator_launcher gives each operator its own copy of it.
TRAINING_OPERATOR_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")


def operator_launcher(cert_dir: Path, fixed_dir: Path = TRAINING_OPERATOR_CERT_DIR) -> list[str]:
    """As root, a private mount namespace binds ``cert_dir`` over the fixed folder an operator reads (``fixed_dir``),
    as the kubelet mounts the Secret into the pod, so control planes side by side do not share it. Elsewhere the
    fixed folder is used directly: one such operator per machine at a time."""
    fixed_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("unshare"):
        for source in cert_dir.iterdir():
            shutil.copy(source, fixed_dir / source.name)
        return []
    bind = f'mount --bind {cert_dir} {fixed_dir} && exec "$0" "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", bind]


def prepare_training_operator(kubectl: Kubectl, folder: Path, port: int) -> Path:
    """What its Deployment would provide: the Secret its rotator keeps (a CA of the name the rotator expects and
    certificates it finds valid, so it keeps them), the same files where the kubelet would mount them, and the
    PyTorchJob webhook at a loopback URL."""
    dns_name = f"{TRAINING_OPERATOR_SERVICE}.{TRAINING_OPERATOR_NAMESPACE}.svc"
    pki = Pki(folder / "pki", ca_name=TRAINING_OPERATOR_CA, rsa_pkcs1=True)
    cert = pki.serving("training-operator", (dns_name,))
    files = {"ca.crt": pki.ca, "ca.key": pki.ca_key, "tls.crt": cert.cert, "tls.key": cert.key}
    cert_dir = folder / "serving-certs"
    cert_dir.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        shutil.copy(source, cert_dir / name)
    kubectl("create", "namespace", TRAINING_OPERATOR_NAMESPACE)
    secret = ["create", "secret", "generic", TRAINING_OPERATOR_SECRET, "-n", TRAINING_OPERATOR_NAMESPACE]
    kubectl(*secret, *(f"--from-file={name}={source}" for name, source in files.items()))
    module, version = kubebin.component("training-operator").module_and_version()
    rendered = kubectl("kustomize", str(kubebin.module_dir(module, version) / "manifests/base/webhook")).stdout
    configs = url_webhooks(rendered, port, pki.ca, "")
    for config in configs:  # only PyTorchJob is enabled (--enable-scheme): the other kinds' paths would not answer
        config["webhooks"] = [hook for hook in config["webhooks"] if "pytorchjob" in hook["clientConfig"]["url"]]
    path = folder / "webhooks.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(configs, sort_keys=False))
    kubectl(*APPLY, "-f", str(path))
    return cert_dir
