"""What a container runs: its environment, argv and working dir, resolved as the kubelet resolves them.

Pure functions over pod and container dicts (the API's JSON); the objects they read (ConfigMaps, Secrets) come
through callables, so the node agent passes API lookups and the unit tests pass dicts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.utils.quantity import parse_quantity

Lookup = Callable[[str], "Mapping[str, str] | None"]
"""name -> the object's data (Secret values decoded), or None when the object does not exist."""


class ContainerConfigError(Exception):
    """The container cannot be configured; the kubelet reports it as waiting, reason CreateContainerConfigError."""


# -- $(VAR) expansion: kubernetes third_party/forked/golang/expansion/expand.go ---------------------------------


def expand(text: str, *contexts: Mapping[str, str]) -> str:
    """``$(NAME)`` becomes the first context's value for NAME, or stays as written when no context has it;
    ``$$`` is an escaped ``$``; any other ``$`` is kept."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 == len(text):
            out.append(char)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close < 0:  # incomplete reference: kept, scanning resumes after "$("
                out.append("$(")
                i += 2
                continue
            name = text[i + 2 : close]
            out.append(next((c[name] for c in contexts if name in c), f"$({name})"))
            i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


# -- the image: the project's own environment stands in for it ---------------------------------------------------


@dataclass(frozen=True)
class Image:
    """What a container image would give: ENTRYPOINT, CMD, WORKDIR and ENV (here the project's virtualenv)."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)


def image_from_dockerfile(dockerfile: Path, env: dict[str, str]) -> Image:
    """ENTRYPOINT, CMD (exec form) and WORKDIR as the final stage of the project's Dockerfile leaves them."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    workdir = "/"
    for line in dockerfile.read_text().splitlines():
        match = re.match(r"\s*(FROM|ENTRYPOINT|CMD|WORKDIR)\s+(.*)$", line, re.IGNORECASE)
        if not match:
            continue
        keyword, rest = match.group(1).upper(), match.group(2).strip()
        if keyword == "FROM":  # a new stage starts from its base's settings, which we do not know
            entrypoint, cmd, workdir = [], [], "/"
        elif keyword == "WORKDIR":
            workdir = rest if rest.startswith("/") else str(Path(workdir) / rest)
        elif keyword == "ENTRYPOINT":
            entrypoint, cmd = _exec_form(rest, dockerfile), []  # Docker resets CMD when ENTRYPOINT is set
        else:
            cmd = _exec_form(rest, dockerfile)
    return Image(entrypoint=entrypoint, cmd=cmd, workdir=workdir, env=env)


def run_console_scripts_from_checkout(image: Image, pyproject: Path, python: str) -> Image:
    """The image's ENTRYPOINT, with a console script of this project ([project.scripts] in ``pyproject``) run as
    ``python -c`` calling its entry point. In a real image the script and the code are installed together; here
    the code comes from the checkout on PYTHONPATH while the virtualenv's script was generated for whichever
    checkout installed it, and a script naming an entry point this checkout lacks fails at import."""
    import tomllib

    scripts = tomllib.loads(pyproject.read_text()).get("project", {}).get("scripts", {})
    if not image.entrypoint or image.entrypoint[0] not in scripts:
        return image
    name = image.entrypoint[0]
    module, _, function = scripts[name].partition(":")
    call = f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; sys.exit({function}())"
    return Image([python, "-c", call, *image.entrypoint[1:]], image.cmd, image.workdir, image.env)


def _exec_form(text: str, dockerfile: Path) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{dockerfile}: only the exec form (a JSON list) is understood, got {text!r}")
    return value


def container_argv(container: Mapping[str, Any], env: Mapping[str, str], image: Image) -> list[str]:
    """command/args with $(VAR) expanded (kubernetes pkg/kubelet/container/helpers.go
    ExpandContainerCommandAndArgs), combined with the image as the API documents: command replaces ENTRYPOINT
    and drops CMD; args alone replace CMD."""
    command = [expand(c, env) for c in container.get("command") or []]
    args = [expand(a, env) for a in container.get("args") or []]
    if command:
        argv = command + args
    else:
        argv = list(image.entrypoint) + (args if container.get("args") else list(image.cmd))
    if not argv:
        raise ContainerConfigError(f"container {container['name']!r}: no command, and the image has no ENTRYPOINT")
    return argv


# -- the downward API: kubernetes pkg/kubelet/kubelet_pods.go podFieldSelectorRuntimeValue, pkg/fieldpath ----


def format_map(values: Mapping[str, str]) -> str:
    """pkg/fieldpath/fieldpath.go FormatMap: sorted ``key="value"`` lines (Go %q quoting)."""
    return "\n".join(f"{k}={json.dumps(values[k], ensure_ascii=False)}" for k in sorted(values))


def field_ref_value(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    subscripted = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
    if subscripted:
        return (meta.get(subscripted.group(1)) or {}).get(subscripted.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "spec.restartPolicy": spec.get("restartPolicy", ""),
        "spec.schedulerName": spec.get("schedulerName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
        "status.phase": (pod.get("status") or {}).get("phase", ""),
    }
    if path in simple:
        return simple[path]
    if path in ("metadata.annotations", "metadata.labels"):
        return format_map(meta.get(path.split(".")[1]) or {})
    raise ContainerConfigError(f"unsupported fieldRef fieldPath {path!r}")


def resource_field_value(
    pod: Mapping[str, Any], container: Mapping[str, Any], ref: Mapping[str, Any], allocatable: Mapping[str, str]
) -> str:
    """pkg/api/v1/resource ExtractContainerResourceValue: ceil(quantity / divisor); CPU in millicores. Limits
    that are not set default to the node's allocatable (kubelet defaultPodLimitsForDownwardAPI)."""
    name = ref.get("containerName") or container["name"]
    target = next((c for c in (pod["spec"].get("containers") or []) if c["name"] == name), None)
    if target is None:
        raise ContainerConfigError(f"resourceFieldRef: container {name!r} not found")
    kind, _, resource = ref["resource"].partition(".")
    if kind not in ("limits", "requests") or not resource:
        raise ContainerConfigError(f"unsupported resourceFieldRef resource {ref['resource']!r}")
    resources = target.get("resources") or {}
    quantity = (resources.get(kind) or {}).get(resource)
    if kind == "limits" and (quantity is None or parse_quantity(quantity) == 0):
        quantity = allocatable.get(resource)
    if kind == "requests" and quantity is None:  # the API defaults requests to limits
        quantity = (resources.get("limits") or {}).get(resource)
    value = parse_quantity(quantity if quantity is not None else "0")
    divisor = parse_quantity(str(ref.get("divisor") or "0")) or 1  # the API server writes an unset divisor as "0"
    if resource == "cpu":  # MilliValue: rounded up to whole millicores first
        return str(math.ceil(math.ceil(value * 1000) / math.ceil(divisor * 1000)))
    return str(math.ceil(math.ceil(value) / math.ceil(divisor)))


# -- service variables: kubernetes pkg/kubelet/envvars/envvars.go FromServices ------------------------------


def master_service_env(host: str, port: int) -> dict[str, str]:
    """The variables of the ``kubernetes`` Service in ``default`` (injected into every pod, enableServiceLinks or
    not). They point at the real API server's address instead of the Service's ClusterIP: nothing here routes
    ClusterIPs (no kube-proxy)."""
    prefix = f"KUBERNETES_PORT_{port}_TCP"
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": str(port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
        prefix: f"tcp://{host}:{port}",
        f"{prefix}_PROTO": "tcp",
        f"{prefix}_PORT": str(port),
        f"{prefix}_ADDR": host,
    }


# -- makeEnvironmentVariables: kubernetes pkg/kubelet/kubelet_pods.go --------------------------------------------


@dataclass
class EnvSources:
    """Where a container's variables come from besides the pod spec."""

    config_map: Lookup
    secret: Lookup
    pod_ip: str
    host_ip: str
    allocatable: Mapping[str, str]
    service_env: Mapping[str, str]


def resolve_env(pod: Mapping[str, Any], container: Mapping[str, Any], sources: EnvSources) -> dict[str, str]:
    """envFrom first (later sources win, prefix applied), then env in order (a value expands $(VAR) against the
    variables so far and the service variables; valueFrom resolves its source; a missing optional source skips
    the variable), then the service variables the container did not set."""
    namespace = pod["metadata"]["namespace"]
    resolved: dict[str, str] = {}
    for env_from in container.get("envFrom") or []:
        ref, kind = _env_from_ref(env_from)
        data = _lookup(sources, kind, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ContainerConfigError(f"{kind} {namespace}/{ref['name']} not found")
        prefix = env_from.get("prefix") or ""
        resolved.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        value = _env_value(pod, container, var, resolved, sources)
        if value is not None:
            resolved[var["name"]] = value
    for name, value in sources.service_env.items():
        resolved.setdefault(name, value)
    return resolved


def _env_from_ref(env_from: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if env_from.get("configMapRef"):
        return env_from["configMapRef"], "configmap"
    if env_from.get("secretRef"):
        return env_from["secretRef"], "secret"
    raise ContainerConfigError(f"envFrom entry without configMapRef or secretRef: {dict(env_from)}")


def _lookup(sources: EnvSources, kind: str, name: str) -> Mapping[str, str] | None:
    return (sources.config_map if kind == "configmap" else sources.secret)(name)


def _env_value(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    var: Mapping[str, Any],
    resolved: Mapping[str, str],
    sources: EnvSources,
) -> str | None:
    """The variable's value, or None when an optional source is missing."""
    if var.get("value"):
        return expand(var["value"], resolved, sources.service_env)
    value_from = var.get("valueFrom") or {}
    if value_from.get("fieldRef"):
        return field_ref_value(pod, value_from["fieldRef"]["fieldPath"], sources.pod_ip, sources.host_ip)
    if value_from.get("resourceFieldRef"):
        return resource_field_value(pod, container, value_from["resourceFieldRef"], sources.allocatable)
    for key, kind in (("configMapKeyRef", "configmap"), ("secretKeyRef", "secret")):
        ref = value_from.get(key)
        if ref:
            return _key_ref_value(ref, kind, pod["metadata"]["namespace"], sources)
    if value_from:
        raise ContainerConfigError(f"env {var['name']}: unsupported valueFrom {sorted(value_from)}")
    return ""


def _key_ref_value(ref: Mapping[str, Any], kind: str, namespace: str, sources: EnvSources) -> str | None:
    data = _lookup(sources, kind, ref["name"])
    label = "ConfigMap" if kind == "configmap" else "Secret"
    if data is None:
        if ref.get("optional"):
            return None
        raise ContainerConfigError(f"{label.lower()} {namespace}/{ref['name']} not found")
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ContainerConfigError(f"couldn't find key {ref['key']} in {label} {namespace}/{ref['name']}")
    return data[ref["key"]]
