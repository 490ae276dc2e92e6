"""A pod's volumes as folders under the agent's root, and the mounts that put them at the paths the pod asks for.

Each container process starts in its own private mount namespace (``unshare --mount --propagation private``) and
bind-mounts the folders there, so absolute paths such as /var/run/secrets/kubernetes.io/serviceaccount work and
nothing leaks to the host's mount table. Mount points that do not exist yet are created on the host as empty
folders (a container runtime would create them in the image's root filesystem).
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from tools.kube.node_env import ContainerConfigError, field_ref_value, resource_field_value

CLUSTER_DOMAIN = "cluster.local"
EMPTY_DIR_MODE = 0o777  # pkg/volume/emptydir/empty_dir.go: perm 0777 for the default medium
DEFAULT_FILE_MODE = 0o644  # defaultMode 420 for configMap, secret, downwardAPI and projected volumes
START_FAILED = 128  # the exit code containerd reports for a container that could not start (StartError)


class VolumeError(Exception):
    """The volume cannot be set up yet; the kubelet keeps the pod in ContainerCreating and retries."""


class VolumeAPI(Protocol):
    """The API objects volumes are made from (namespaced to the pod)."""

    def config_map(self, name: str) -> Mapping[str, bytes] | None: ...

    def secret(self, name: str) -> Mapping[str, bytes] | None: ...

    def claim_path(self, claim: str) -> Path: ...

    def token(self, pod: Mapping[str, Any], audience: str | None, expiration_s: int) -> str: ...


@dataclass(frozen=True)
class Volume:
    path: Path
    read_only: bool


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


def decode_data(obj: Mapping[str, Any], *, secret: bool) -> dict[str, bytes]:
    """A ConfigMap's data and binaryData, or a Secret's data, as bytes (the API sends binary as base64)."""
    if secret:
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


# -- volume contents: pkg/volume/{emptydir,configmap,secret,projected,downwardapi}, pkg/volume/util/atomic_writer.go


def prepare_volumes(pod: Mapping[str, Any], pod_dir: Path, api: VolumeAPI, allocatable: Mapping[str, str]) -> dict:
    """Every volume of the pod as a folder (PVC and hostPath: the folder they name). Raises VolumeError while a
    source is missing, as the kubelet waits for it."""
    volumes: dict[str, Volume] = {}
    for spec in pod["spec"].get("volumes") or []:
        name = spec["name"]
        target = pod_dir / "volumes" / name
        if "emptyDir" in spec:
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(EMPTY_DIR_MODE)
            volumes[name] = Volume(target, read_only=False)
        elif "persistentVolumeClaim" in spec:
            claim = spec["persistentVolumeClaim"]
            volumes[name] = Volume(api.claim_path(claim["claimName"]), read_only=bool(claim.get("readOnly")))
        elif "hostPath" in spec:
            volumes[name] = Volume(Path(spec["hostPath"]["path"]), read_only=False)
        else:
            files = _projection_files(pod, spec, api, allocatable)
            _write_files(target, files)
            volumes[name] = Volume(target, read_only=True)  # these plugins always mount read-only
    return volumes


def _projection_files(pod: Mapping[str, Any], spec: Mapping[str, Any], api: VolumeAPI, allocatable) -> dict:
    """relative path -> (content, mode) for configMap, secret, downwardAPI and projected volumes."""
    if "projected" in spec:
        mode = spec["projected"].get("defaultMode", DEFAULT_FILE_MODE)
        files: dict[str, tuple[bytes, int]] = {}
        for source in spec["projected"].get("sources") or []:
            files.update(_source_files(pod, source, api, allocatable, mode))
        return files
    for kind in ("configMap", "secret", "downwardAPI"):
        if kind in spec:
            mode = spec[kind].get("defaultMode", DEFAULT_FILE_MODE)
            return _source_files(pod, {kind: spec[kind]}, api, allocatable, mode)
    raise ContainerConfigError(f"volume {spec['name']!r}: unsupported type {sorted(k for k in spec if k != 'name')}")


def _source_files(pod, source: Mapping[str, Any], api: VolumeAPI, allocatable, mode: int) -> dict:
    if "serviceAccountToken" in source:
        token = source["serviceAccountToken"]
        value = api.token(pod, token.get("audience"), int(token.get("expirationSeconds", 3600)))
        return {token["path"]: (value.encode(), mode)}
    if "downwardAPI" in source:
        return {
            item["path"]: (_downward_value(pod, item, allocatable), item.get("mode", mode))
            for item in source["downwardAPI"].get("items") or []
        }
    kind = "configMap" if "configMap" in source else "secret" if "secret" in source else None
    if kind is None:
        raise ContainerConfigError(f"unsupported projected volume source {sorted(source)}")
    ref = source[kind]
    name = ref.get("name") or ref.get("secretName")
    data = api.config_map(name) if kind == "configMap" else api.secret(name)
    if data is None:
        if ref.get("optional"):
            return {}
        raise VolumeError(f"{kind} {pod['metadata']['namespace']}/{name} not found")
    return _key_files(kind, name, data, ref, mode)


def _key_files(kind: str, name: str, data: Mapping[str, bytes], ref: Mapping[str, Any], mode: int) -> dict:
    items = ref.get("items")
    if not items:
        return {key: (value, mode) for key, value in data.items()}
    files = {}
    for item in items:
        if item["key"] not in data:
            if ref.get("optional"):
                continue
            raise VolumeError(f"{kind} {name}: no key {item['key']!r}")
        files[item["path"]] = (data[item["key"]], item.get("mode", mode))
    return files


def _downward_value(pod: Mapping[str, Any], item: Mapping[str, Any], allocatable) -> bytes:
    if item.get("fieldRef"):
        return field_ref_value(pod, item["fieldRef"]["fieldPath"], "", "").encode()
    ref = item["resourceFieldRef"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == ref["containerName"])
    return resource_field_value(pod, container, ref, allocatable).encode()


def _write_files(target: Path, files: Mapping[str, tuple[bytes, int]]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for relative, (content, mode) in files.items():
        path = target / _safe_relative(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)


def _safe_relative(path: str) -> PurePosixPath:
    """pkg/volume/util/atomic_writer.go validatePath: relative, no '..' element."""
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ContainerConfigError(f"invalid volume file path {path!r}")
    return relative


# -- mounts: pkg/kubelet/kubelet_pods.go makeMounts ----------------------------------------------------------


def container_mounts(container: Mapping[str, Any], volumes: Mapping[str, Volume], hosts_file: Path) -> list[Mount]:
    """The container's volumeMounts (subPath inside the volume, created if absent) plus the pod's /etc/hosts
    unless the container mounts its own."""
    mounts = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise ContainerConfigError(f"cannot find volume {mount['name']!r} to mount into {container['name']!r}")
        source = volume.path
        if mount.get("subPath"):
            source = volume.path / _safe_relative(mount["subPath"])
            if not source.exists():
                source.mkdir(parents=True)
        mounts.append(Mount(source, mount["mountPath"], volume.read_only or bool(mount.get("readOnly"))))
    if all(m.target != "/etc/hosts" for m in mounts):
        mounts.append(Mount(hosts_file, "/etc/hosts", read_only=False))
    return order_mounts(mounts)


def _under(path: str | Path, folder: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(folder) or PurePosixPath(folder) in PurePosixPath(path).parents


def order_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    """Shallow targets first (a runtime sorts mounts by depth), except that a mount whose target would hide
    another mount's source (say an emptyDir on /tmp over a root under /tmp) waits until that source is mounted."""
    pending = sorted(mounts, key=lambda m: len(PurePosixPath(m.target).parts))
    ordered: list[Mount] = []
    while pending:
        ready = next((m for m in pending if not any(n is not m and _under(n.source, m.target) for n in pending)), None)
        if ready is None:
            raise ContainerConfigError(f"volume mounts hide each other's sources: {[m.target for m in pending]}")
        ordered.append(ready)
        pending.remove(ready)
    return ordered


def mount_script(mounts: Sequence[Mount], workdir: str, hostname: str) -> str:
    """The sh program that runs in the new mount (and UTS) namespace, then execs the container's argv ("$@") with stdin on
    /dev/null. Its stdin is the start marker, opened for writing by the agent before any mount can hide the file;
    a setup failure exits START_FAILED with the marker empty."""
    lines = [f"hostname {shlex.quote(hostname)} || fail 'hostname {hostname}'"]  # in its own UTS namespace
    for mount in mounts:
        source, target = shlex.quote(str(mount.source)), shlex.quote(mount.target)
        make = f"mkdir -p {target}" if mount.source.is_dir() else f"mkdir -p $(dirname {target}) && touch {target}"
        lines.append(f"{{ {make} && mount --bind {source} {target}; }} || fail 'mount {mount.target}'")
        if mount.read_only:
            lines.append(f"mount -o remount,bind,ro {target} || fail 'read-only {mount.target}'")
    quoted = shlex.quote(workdir)
    lines.append(f"{{ mkdir -p {quoted} && cd {quoted}; }} || fail 'workingDir {workdir}'")
    lines.append('command -v -- "$1" > /dev/null || fail "exec: \\"$1\\": executable file not found in \\$PATH"')
    lines.append("echo started >&0 && exec 0< /dev/null")
    lines.append('exec "$@"')
    fail = f'fail() {{ echo "node-agent: $1" >&2; exit {START_FAILED}; }}'
    return "\n".join([fail, *lines])


# -- names: pkg/kubelet/kubelet_pods.go managedHostsFileContent, plus the names cluster DNS would serve -----------


def dns_names(namespace: str, services: Sequence[str], pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """The names a pod in `namespace` could look up: each Service, and each pod's hostname.subdomain (how the
    Trainer's PET_MASTER_ADDR and PyTorchJob's <job>-master-0 are formed), short and qualified."""
    names = []
    for service in sorted(services):
        names += [service, f"{service}.{namespace}", f"{service}.{namespace}.svc"]
        names.append(f"{service}.{namespace}.svc.{CLUSTER_DOMAIN}")
    for pod in pods:
        spec = pod.get("spec") or {}
        if spec.get("subdomain"):
            host = f"{spec.get('hostname') or pod['metadata']['name']}.{spec['subdomain']}"
            names += [
                host,
                f"{host}.{namespace}",
                f"{host}.{namespace}.svc",
                f"{host}.{namespace}.svc.{CLUSTER_DOMAIN}",
            ]
    return sorted(set(names))


def hosts_file(pod: Mapping[str, Any], pod_ip: str, names: Sequence[str]) -> str:
    """The kubelet's managed /etc/hosts, and a loopback line for `names` (no cluster DNS here: every pod of this
    node listens on the loopback)."""
    spec, namespace = pod["spec"], pod["metadata"]["namespace"]
    hostname = spec.get("hostname") or pod["metadata"]["name"]
    lines = [
        "# Kubernetes-managed hosts file.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::0\tip6-mcastprefix",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
    ]
    if spec.get("subdomain"):
        lines.append(f"{pod_ip}\t{hostname}.{spec['subdomain']}.{namespace}.svc.{CLUSTER_DOMAIN}\t{hostname}")
    else:
        lines.append(f"{pod_ip}\t{hostname}")
    aliases = spec.get("hostAliases") or []
    if aliases:
        lines += ["", "# Entries added by HostAliases."]
        lines += [f"{a['ip']}\t" + "\t".join(a.get("hostnames") or []) for a in aliases]
    if names:
        lines += ["", "# Entries added by the node agent in place of cluster DNS."]
        lines += [f"127.0.0.1\t{name}" for name in names]
    return "\n".join(lines) + "\n"
