"""Command-line flags for ``LaunchSettings`` (shared by ``batchgen render`` and ``batchgen submit``).

Precedence: built-in defaults < ``--values FILE`` (YAML, keys are LaunchSettings field names) < flags given.
Flags are generated from the dataclass so they cannot drift from it; mappings (affinity, tolerations) are only
settable from the values file, where YAML can express them.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from batchgen.core.config import ParallelConfig, flag_specs
from batchgen.core.errors import ConfigError
from batchgen.launch.k8s.settings import LaunchSettings

# family: from the plan's config, or --family (a generation flag) when rendering a run id.
_VALUES_ONLY = {"tolerations", "affinity", "node_selector", "image_pull_secrets", "output", "family"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(field_type: object) -> type:
    # A string: the settings module postpones its annotations (from __future__ import annotations).
    return {"int": int, "float": float, "bool": bool}.get(str(field_type).split(" |")[0], str)


def _add_flag(group: argparse._ArgumentGroup, flag: str, key: str, kind: type, doc: str) -> None:
    if kind is bool:  # a switch: absent leaves the values file's setting
        group.add_argument(flag, dest=f"launch_{key}", action="store_const", const=True, help=doc)
    else:
        group.add_argument(flag, dest=f"launch_{key}", type=kind, default=None, metavar=key.upper(), help=doc)


def add_launch_arguments(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("Kubernetes launch settings (also settable in --values FILE)")
    group.add_argument(
        "--values", metavar="FILE", default=None, help="YAML file of launch settings (field names as keys)"
    )
    for f in fields(LaunchSettings):
        if f.name in _VALUES_ONLY or f.name in skip or f.name == "parallel":
            continue
        default = None if f.default is MISSING else f.default
        doc = f.metadata.get("help") or f"default {default!r}"
        _add_flag(group, _flag(f.name), f.name, _kind(f.type), doc)
    for flag, key, kind, doc in flag_specs(ParallelConfig):
        if key not in skip:
            _add_flag(group, flag, key, kind, doc + " (else the plan's)")
    group.add_argument(
        "--node-selector", dest="launch_node_selector", action="append", default=None, metavar="KEY=VALUE",
        help="node selector entry (repeatable)",
    )  # fmt: skip
    group.add_argument(
        "--image-pull-secret", dest="launch_image_pull_secrets", action="append", default=None, metavar="NAME",
        help="docker-registry Secret name (repeatable)",
    )  # fmt: skip


def load_values(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: values file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of launch settings")
    return data


def settings_from_args(args: argparse.Namespace, **fixed: Any) -> LaunchSettings:
    """Defaults < --values < flags < ``fixed`` (what the command itself knows, e.g. the output URI, or the family
    of the run's plan, which a values file may repeat but not contradict)."""
    source = args.values or "command line"
    values: dict[str, Any] = load_values(args.values) if args.values else {}
    for name in [f.name for f in fields(LaunchSettings)] + [f.name for f in fields(ParallelConfig)]:
        given = getattr(args, f"launch_{name}", None)
        if given is None:
            continue
        if name == "node_selector":
            pairs = {}
            for entry in given:
                key, sep, value = entry.partition("=")
                if not sep or not key:
                    raise ConfigError(f"--node-selector {entry!r}: expected KEY=VALUE")
                pairs[key] = value
            given = {**values.get("node_selector", {}), **pairs}
        values[name] = given
    family = fixed.get("family")
    if family is not None and values.get("family", family) != family:
        raise ConfigError(f"{source}: family {values['family']!r} differs from the run's model family {family!r}")
    values.update({k: v for k, v in fixed.items() if v is not None})
    return LaunchSettings.from_dict(values, source=str(source))
