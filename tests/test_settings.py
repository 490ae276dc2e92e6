"""The parallel and speed settings are declared once (``ParallelConfig``'s field metadata); every other place is
derived from it. Each test walks ``fields(ParallelConfig)``, so a new setting missing from any place fails here:
the worker's flags, ``batchgen run``'s and ``render``'s flags, a values file's keys, the launch settings that reach
the workers (``resolve_parallel``, the cause of the old offload drift), the worker's argv, and the Helm chart's
values, schema and launch.yaml."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from typing import Any

import helm_python as helm
import pytest
import yaml

from batchgen.cli import build_parser
from batchgen.cli._options import config_from_args
from batchgen.core.config import ParallelConfig, RunConfig
from batchgen.launch.k8s.settings import LaunchSettings, resolve_parallel
from batchgen.worker.contract import WorkerArgs
from tests.k8s_manifests import by_kind
from tests.test_helm_chart import merged, objects_of, render
from tools import chart_schema

FIELDS = [f.name for f in fields(ParallelConfig)]


def other_value(f) -> Any:
    """A valid value of field ``f`` that is not its default."""
    choices = f.metadata["choices"]
    if choices:
        return next(c for c in reversed(choices) if c != f.default)  # the last: xfuser with per-prompt attention
    return {"bool": True, "float": 0.25, "int": 2}[str(f.type)]


CHANGED = ParallelConfig(**{f.name: other_value(f) for f in fields(ParallelConfig)})


def test_every_field_declares_its_help():
    for f in fields(ParallelConfig):
        assert f.metadata.get("help"), f"ParallelConfig.{f.name} has no help in its metadata"


@pytest.mark.parametrize("command", ["worker", "run", "render", "submit"])
def test_every_field_is_a_flag(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {option for action in sub.choices[command]._actions for option in action.option_strings}
    missing = [name for name in FIELDS if "--" + name.replace("_", "-") not in flags]
    assert missing == [], f"batchgen {command} has no flag for {missing}"


def test_worker_argv_round_trips_every_field():
    args = WorkerArgs(
        output="/out", run_id="r-0123456789ab", shards=("shard-000000",), model_dir="/m", parallel=CHANGED
    )
    parsed = build_parser().parse_args(args.argv())
    assert config_from_args(parsed).parallel == CHANGED
    default = WorkerArgs(output="/out", run_id="r", shards=("shard-000000",), model_dir="/m", parallel=ParallelConfig())
    assert config_from_args(build_parser().parse_args(default.argv())).parallel == ParallelConfig()


def test_values_file_keys_reach_the_workers_over_the_plan():
    plan = type("Plan", (), {"config": RunConfig()})()
    for f in fields(ParallelConfig):
        settings = LaunchSettings.from_dict({f.name: other_value(f)}, source="launch.yaml")
        assert getattr(resolve_parallel(settings, plan), f.name) == other_value(f), f.name
    # A launch setting at its default leaves the plan's value (e.g. the plan's offload, compile).
    planned = type("Plan", (), {"config": replace(RunConfig(), parallel=CHANGED)})()
    assert resolve_parallel(LaunchSettings(), planned) == CHANGED


def test_render_flags_reach_the_launch_settings():
    from batchgen.launch.k8s.options import add_launch_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    argv = [a for a in WorkerArgs("/o", "r", ("shard-000000",), "/m", CHANGED).argv()[9:]]
    settings = settings_from_args(parser.parse_args(argv))
    assert settings.parallel == CHANGED


def test_values_file_refuses_bad_values_by_key():
    for f in fields(ParallelConfig):
        with pytest.raises(Exception, match=f.name):
            LaunchSettings.from_dict({f.name: "not-a-value" if str(f.type) != "str" else 7}, source="launch.yaml")


def test_chart_schema_is_derived():
    assert chart_schema.drift() == [], "run python -m tools.chart_schema --write"


def test_chart_values_and_launch_yaml_carry_every_field():
    camel = dict(zip(FIELDS, chart_schema.value_schema(ParallelConfig), strict=True))
    values = yaml.safe_load((chart_schema.SCHEMA.parent / "values.yaml").read_text())["workers"]
    for f in fields(ParallelConfig):
        assert values[camel[f.name]] == f.default, f"values.yaml workers.{camel[f.name]} must default to {f.default!r}"
    overrides = {"workers": {camel[f.name]: other_value(f) for f in fields(ParallelConfig)}}
    with helm.Chart.load(chart_schema.SCHEMA.parent) as chart:
        config_maps = by_kind(objects_of(render(chart, merged(overrides))), "ConfigMap")
    (launch,) = [yaml.safe_load(c["data"]["launch.yaml"]) for c in config_maps if "launch.yaml" in c.get("data", {})]
    assert LaunchSettings.from_dict(launch).parallel == CHANGED
