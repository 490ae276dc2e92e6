"""RBAC as the API server evaluates it: the chart's controller ServiceAccount, bound only to the chart's Role and
authenticated by a real ServiceAccount token, can do exactly what `batchgen submit` (run with the chart's own
arguments) does, and a Role short of one verb makes submit fail with exit 7 naming that verb."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.errors import EXIT_CLUSTER, EXIT_TERMINATED
from tests.k8s_manifests import by_kind, controller_pod, load_all
from tests.realk8s.conftest import ROOT, skip_module_unless_available
from tests.realk8s.test_server_side import CHART, helm

skip_module_unless_available()

Triple = tuple[str, str, str]  # (API group, resource, verb)
BUCKET = "rbac-runs"
# Granted but not reached here: patch stops a job whose pods keep restarting (no pod runs here), and get reads back
# a job after a 409 on create, which only two controllers racing on one name produce (a rerun adopts by list).
NOT_REACHED_HERE = {("trainer.kubeflow.org", "trainjobs", "patch"), ("trainer.kubeflow.org", "trainjobs", "get")}


def chart_objects(plane, namespace: str, release: str) -> list[dict]:
    rendered = helm(
        plane, "template", release, str(CHART), "--namespace", namespace,
        "--set", f"run.manifest=s3://{BUCKET}/prompts.parquet", "--set", f"run.output=s3://{BUCKET}/out",
        "--set", "model.pvc.claimName=mochi-weights", "--set", "trainer.apiVersion=v2.3", "--set", "launcher=trainjob",
        "--set", "run.maxJobs=2", "--set", "crdCheck.enabled=false",
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    return load_all(rendered.stdout)


def role_triples(role: dict) -> set[Triple]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [""])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }


class Controller:
    """The chart's RBAC objects and TrainingRuntime applied in ``namespace``; a kubeconfig holding a token of its
    ServiceAccount; the chart Job's `batchgen submit` arguments with the ConfigMap's files written locally."""

    def __init__(self, plane, namespace: str, folder: Path):
        self.plane, self.namespace, self.folder = plane, namespace, folder
        self.objects = chart_objects(plane, namespace, "gen")
        kinds = ("ServiceAccount", "Role", "RoleBinding", "TrainingRuntime", "ConfigMap")
        keep = [o for o in self.objects if o["kind"] in kinds]
        plane.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(keep))
        (self.role,) = by_kind(self.objects, "Role")
        account = controller_pod(self.objects)["serviceAccountName"]
        self.user = f"system:serviceaccount:{namespace}:{account}"
        self.kubeconfig = self.token_kubeconfig(account)

    def token_kubeconfig(self, account: str) -> Path:
        token = self.plane.kubectl("create", "token", account, "-n", self.namespace, "--duration=1h").stdout.strip()
        config = yaml.safe_load(self.plane.kubeconfig.read_text())
        config["users"] = [{"name": "controller", "user": {"token": token}}]
        config["contexts"][0]["context"] = {"cluster": "local", "user": "controller", "namespace": self.namespace}
        path = self.folder / f"{account}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def submit_command(self, output: str) -> list[str]:
        (container,) = controller_pod(self.objects)["containers"]
        mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
        (config_map,) = by_kind(self.objects, "ConfigMap")
        for name, text in config_map["data"].items():
            (self.folder / name).write_text(text)
        args = [
            a.replace("$(POD_NAMESPACE)", self.namespace).replace(mount, str(self.folder)) for a in container["args"]
        ]
        args[args.index("--output") + 1] = output
        return [sys.executable, "-m", "batchgen", *args, "--kubeconfig", str(self.kubeconfig)]

    def rules_review(self, kubeconfig: Path) -> set[Triple]:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
                  "spec": {"namespace": self.namespace}}  # fmt: skip
        result = subprocess.run(
            [
                str(self.plane.bin / "kubectl"),
                f"--kubeconfig={kubeconfig}",
                "create",
                "--validate=false",
                "-f",
                "-",
                "-o",
                "json",
            ],
            input=json.dumps(review),
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        rules = json.loads(result.stdout)["status"]["resourceRules"]
        return role_triples({"rules": rules})


@pytest.fixture
def controller(control_plane, namespace, tmp_path) -> Controller:
    return Controller(control_plane, namespace, tmp_path)


@pytest.fixture
def s3_env(control_plane) -> dict[str, str]:
    import boto3

    env = {**os.environ, "AWS_ENDPOINT_URL_S3": control_plane.s3_endpoint, "AWS_ACCESS_KEY_ID": "moto",
           "AWS_SECRET_ACCESS_KEY": "moto", "AWS_DEFAULT_REGION": "us-east-1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    client = boto3.client("s3", endpoint_url=control_plane.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="moto", aws_secret_access_key="moto")  # fmt: skip
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
        table = pa.table({"id": [f"clip-{i}" for i in range(8)], "prompt": [f"a fox {i}" for i in range(8)]})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        client.put_object(Bucket=BUCKET, Key="prompts.parquet", Body=sink.getvalue().to_pybytes())
    return env


def audited(audit_log: Path, user: str) -> list[dict]:
    events = [json.loads(line) for line in audit_log.read_text().splitlines() if line.strip()]
    return [e for e in events if e["user"]["username"] == user and e.get("stage") == "ResponseComplete"]


def triples_of(events: list[dict]) -> set[Triple]:
    return {
        (e["objectRef"].get("apiGroup", ""), e["objectRef"]["resource"], e["verb"])
        for e in events
        if e.get("objectRef", {}).get("resource") and e["objectRef"]["resource"] != "selfsubjectrulesreviews"
    }


def run_submit_until_it_watches(controller: Controller, output: str, env: dict, audit_log: Path):
    """`submit --wait` never ends here (no node runs the pods): stop it by SIGTERM once it watches its jobs."""
    watches = len([e for e in audited(audit_log, controller.user) if e["verb"] == "watch"])
    command = [*controller.submit_command(output), "--resync-seconds", "2"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len([e for e in audited(audit_log, controller.user) if e["verb"] == "watch"]) == watches:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "submit never watched its TrainJobs"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_rules_review_and_a_real_submit_match_the_chart_role(control_plane, controller, s3_env):
    role = role_triples(controller.role)
    # What every authenticated identity may do anyway (discovery, self-reviews), seen through an unbound account.
    baseline = controller.rules_review(controller.token_kubeconfig("default"))
    assert controller.rules_review(controller.kubeconfig) - baseline == role
    output = f"s3://{BUCKET}/out-{uuid.uuid4().hex[:6]}"
    # Twice, as a restarted controller pod would: the second adopts the job the first created.
    for _ in range(2):
        submitted = run_submit_until_it_watches(controller, output, s3_env, control_plane.audit_log)
        # Ended by the signal (a pod's container reports that as 128 + 15 = EXIT_TERMINATED).
        assert submitted.returncode in (-signal.SIGTERM, EXIT_TERMINATED), submitted.stderr[-3000:]
    assert control_plane.kubectl("get", "trainjobs", "-n", controller.namespace, "-o", "name").stdout.split()
    run_id = next(
        o.split("/", 1)[1].rsplit("-", 3)[0]
        for o in control_plane.kubectl("get", "trainjobs", "-n", controller.namespace, "-o", "name").stdout.split()
    )
    cancel = subprocess.run(
        [sys.executable, "-m", "batchgen", "cancel", run_id, "--namespace", controller.namespace,
         "--kubeconfig", str(controller.kubeconfig)],
        env=s3_env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert cancel.returncode == 0, cancel.stderr
    events = audited(control_plane.audit_log, controller.user)
    assert [e for e in events if e["responseStatus"]["code"] == 403] == []
    used = triples_of(events)
    assert used <= role, used - role
    assert role - used == NOT_REACHED_HERE


@pytest.mark.parametrize(
    ("resource", "verb"), [("trainjobs", "create"), ("trainingruntimes", "get"), ("trainjobs", "list")]
)
def test_submit_without_one_verb_fails_with_exit_7_naming_it(control_plane, controller, s3_env, resource, verb):
    rules = [
        {**rule, "verbs": [v for v in rule["verbs"] if not (resource in rule["resources"] and v == verb)]}
        for rule in controller.role["rules"]
    ]
    role = {**controller.role, "rules": [rule for rule in rules if rule["verbs"]]}
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-n", controller.namespace, "-f", "-",
                          stdin=yaml.safe_dump(role))  # fmt: skip
    command = controller.submit_command(f"s3://{BUCKET}/out-{uuid.uuid4().hex[:6]}")
    result = subprocess.run(command, env=s3_env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == EXIT_CLUSTER, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert f'cannot {verb} resource "{resource}"' in last, last
