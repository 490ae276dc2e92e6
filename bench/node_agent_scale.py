"""How many pods one node agent carries through a real kube-apiserver: `--no-run` pods (nothing runs; each pod
still goes Pending -> Running -> Succeeded with every status patch a kubelet would write).

Starts the real control plane from `make kube-bin`'s cache (tools/kube/controlplane.py, what `make kube-up` and
tests/realk8s start) with one agent; per repeat, a fresh namespace gets --pods pods bound to the node at once. Figures
(medians over --repeats): seconds from the first create to the last Succeeded, pods per second, and the agent's
CPU seconds per pod (utime + stime from /proc). Writes bench/results/node-agent-scale.json.

Usage: python bench/node_agent_scale.py [--pods 200] [--repeats 3] [--no-run 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.kube import controlplane  # noqa: E402
from tools.kube.node_agent import KubeApi  # noqa: E402

NODE = "bench-node"
RESULTS = ROOT / "bench" / "results" / "node-agent-scale.json"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(admin: KubeApi, agent_pid: int, namespace: str, pods: int) -> dict:
    admin.request("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    base = f"/api/v1/namespaces/{namespace}"
    while admin.get(f"{base}/serviceaccounts/default") is None:  # the ServiceAccount admission plugin needs it
        time.sleep(0.1)
    container = {"name": "main", "image": "x", "command": ["true"]}
    spec = {
        "nodeName": NODE,
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "containers": [container],
    }
    cpu_before, began = cpu_seconds(agent_pid), time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: admin.request("POST", f"{base}/pods", {"metadata": {"name": f"p{i}"}, "spec": spec}),
                range(pods),
            )
        )
    created = time.monotonic() - began
    while True:
        phases = [p.get("status", {}).get("phase") for p in admin.request("GET", f"{base}/pods")["items"]]
        if phases.count("Succeeded") == pods:
            break
        if not Path(f"/proc/{agent_pid}").exists():
            raise SystemExit("the agent exited")
        time.sleep(0.2)
    total = time.monotonic() - began
    return {"create_s": created, "all_succeeded_s": total, "pods_per_s": pods / total,
            "agent_cpu_s_per_pod": (cpu_seconds(agent_pid) - cpu_before) / pods}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-run", type=float, default=0.0, help="seconds each container 'runs'")
    args = parser.parse_args()
    missing = [
        name
        for comp in controlplane.kubebin.COMPONENTS
        if comp.required
        for name in controlplane.kubebin.missing_binaries(comp)
    ]
    if missing:
        print(f"node_agent_scale: not built ({', '.join(missing)}): run `make kube-bin`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="agent-scale-") as folder:
        plane = controlplane.ControlPlane(Path(folder) / "plane", nodes=0)
        plane.start()
        try:
            agent_pid = plane.add_node(NODE, "--no-run", str(args.no_run)).running_pid()
            plane.wait_nodes_ready()
            admin = KubeApi(plane.kubeconfig)
            rounds = [one_round(admin, agent_pid, f"scale-{i}", args.pods) for i in range(args.repeats)]
        finally:
            plane.stop()
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    result = {
        "pods": args.pods, "repeats": args.repeats, "no_run_s": args.no_run, "median": medians, "rounds": rounds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0],
                    "kube_bin": controlplane.kubebin.bin_dir().parent.name},
    }  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.pods} pods through one node agent (--no-run {args.no_run}), median of {args.repeats}:")
    print(f"  create {medians['create_s']:.1f} s, all Succeeded {medians['all_succeeded_s']:.1f} s, "
          f"{medians['pods_per_s']:.1f} pods/s, agent CPU {medians['agent_cpu_s_per_pod'] * 1000:.1f} ms/pod")  # fmt: skip
    print(f"  -> {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
