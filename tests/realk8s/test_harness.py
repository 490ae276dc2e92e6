"""The harness itself: `make kube-up`'s command prints export lines that reach a working cluster and `make kube-down`
stops every process by its PID; the webhooks it wires answer (a denial that only the webhook can give)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.realk8s.conftest import ROOT, skip_module_unless_available
from tools.kube import kubebin

skip_module_unless_available()

CONTROLPLANE = ROOT / "tools" / "kube" / "controlplane.py"


def test_up_prints_exports_that_work_and_down_stops_every_process(tmp_path):
    folder = tmp_path / "plane"
    up = subprocess.run(
        [sys.executable, str(CONTROLPLANE), "up", "--dir", str(folder), "--nodes", "0"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
    assert set(exports) == {"KUBECONFIG", "PATH", "AWS_ENDPOINT_URL_S3"}
    assert "control plane ready in" in up.stderr.splitlines()[-1]
    pids = [int(p.read_text().split('"pid": ')[1].split(",")[0]) for p in folder.glob("*/pid.json")]
    try:
        env = {**os.environ, "KUBECONFIG": exports["KUBECONFIG"], "PATH": exports["PATH"]}
        version = subprocess.run(["kubectl", "version"], env=env, capture_output=True, text=True, check=True)
        assert f"Server Version: {kubebin.version_of('kubernetes')}" in version.stdout
        helm = subprocess.run(["helm", "list", "-A"], env=env, capture_output=True, text=True, check=False)
        assert helm.returncode == 0, helm.stderr
        again = subprocess.run([sys.executable, str(CONTROLPLANE), "up", "--dir", str(folder)], capture_output=True,
                               text=True, check=False)  # fmt: skip
        assert again.returncode == 1 and "make kube-down" in again.stderr
    finally:
        down = subprocess.run([sys.executable, str(CONTROLPLANE), "down", "--dir", str(folder)], capture_output=True,
                              text=True, check=False)  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert len(pids) >= 8, pids  # etcd, apiserver, controller-manager, scheduler, moto, JobSet, Trainer, operator
    assert [pid for pid in pids if running(pid)] == [], down.stderr


def running(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it (its command line is empty then)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return bool(cmdline.read())
    except FileNotFoundError:
        return False


def test_webhooks_answer(control_plane, namespace):
    """Denials that no schema gives: the Trainer's webhook looks the runtime up, JobSet's checks the names."""
    trainjob = f"""apiVersion: trainer.kubeflow.org/v1alpha1
kind: TrainJob
metadata: {{name: no-runtime, namespace: {namespace}}}
spec:
  runtimeRef: {{name: missing, apiGroup: trainer.kubeflow.org, kind: TrainingRuntime}}
"""
    refused = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", stdin=trainjob, check=False)
    assert 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request' in refused.stderr
    jobset = f"""apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata: {{name: bad-target, namespace: {namespace}}}
spec:
  successPolicy: {{operator: All, targetReplicatedJobs: [nope]}}
  replicatedJobs:
    - name: node
      template:
        spec:
          template:
            spec:
              restartPolicy: Never
              containers: [{{name: c, image: x}}]
"""
    refused = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", stdin=jobset, check=False)
    # The webhook answers with an Invalid status; the text is its own (pkg/webhooks/jobset_webhook.go).
    assert "invalid replicatedJob name 'nope' does not appear in .spec.ReplicatedJobs" in refused.stderr, refused.stderr
