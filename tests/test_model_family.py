"""The model family through the control plane: per-family defaults and rules in the config, the manifest's
``model_family`` column, the family and weights in the run id, and workers refusing other weights (exit 4)."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.cli import main
from batchgen.cli._options import add_generation_arguments, add_shard_size_argument, config_from_args
from batchgen.core import layout
from batchgen.core.config import GenerationConfig, ModelConfig, RunConfig
from batchgen.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_CONFLICT,
    ConfigError,
    ManifestError,
    ModelMismatchError,
    TopologyError,
)
from batchgen.core.manifest import iter_items, manifest_family, validate_manifest
from batchgen.core.plan import describe_changes, load_shard_items, make_plan, plan_fingerprint
from batchgen.dataset.estimate import (
    WAN_14B_CONFIG,
    WAN_14B_FLOPS,
    dit_flops,
    estimate_plan,
    profile_from_bench,
    wan_flops_from_config,
)
from batchgen.launch.k8s.settings import LaunchSettings, resolve_degrees
from batchgen.models import MOCHI, WAN, check_weights
from batchgen.models.common.weights import fingerprint_model_dir
from batchgen.storage.local import LocalStorage
from batchgen.worker.context import SingleProcess
from batchgen.worker.loop import run_worker
from tests._runs import plan_run, tiny_run_config
from tests.test_trust import NeverGenerates, put_orphans

WAN_SMALL = ["--num-frames", "9", "--height", "32", "--width", "32"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("manifest", nargs="?")
    add_generation_arguments(p)
    add_shard_size_argument(p)
    return p


def write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def wan_dir(tmp_path):
    """A directory the family detection reads as Wan (diffusers layout marker only: nothing here loads weights)."""
    path = tmp_path / "wan"
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": None}))
    return path


# -- config -------------------------------------------------------------------------------------------------


def test_family_flag_rebases_the_defaults_the_user_did_not_set(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[generation]\nheight = 240\n")
    got = config_from_args(parser().parse_args(["--config", str(toml), "--family", "wan", "--steps", "3"]))
    assert got.model.family == "wan" and got.spec is WAN
    g = got.generation
    assert (g.num_frames, g.height, g.width) == (81, 240, 832)  # Wan default, TOML, Wan default
    assert (g.num_inference_steps, g.guidance_scale, g.fps, g.max_sequence_length) == (3, 5.0, 16, 512)
    assert config_from_args(parser().parse_args([])).generation == GenerationConfig()  # Mochi's, as before


def test_toml_family_then_flag_family_wins(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[model]\nfamily = 'wan'\n")
    assert config_from_args(parser().parse_args(["--config", str(toml)])).generation.num_frames == 81
    back = config_from_args(parser().parse_args(["--config", str(toml), "--family", "mochi"]))
    assert (back.model.family, back.generation.num_frames, back.generation.width) == ("mochi", 163, 848)


@pytest.mark.parametrize(
    ("family", "key", "value", "fragment"),
    [
        ("wan", "num_frames", 163, "generation.num_frames must be 4k+1 for Wan 2.1/2.2"),
        ("mochi", "num_frames", 81, "generation.num_frames must be 6k+1 for Mochi 1"),
        ("mochi", "max_sequence_length", 512, "generation.max_sequence_length must be at most 256 for Mochi 1"),
        ("wan", "max_sequence_length", 513, "generation.max_sequence_length must be at most 512 for Wan"),
        ("wan", "num_frames", 4097, "must be at most 4093"),
    ],
)
def test_family_rules_name_the_key_and_the_family(tmp_path, family, key, value, fragment):
    toml = tmp_path / "run.toml"
    toml.write_text(f"[model]\nfamily = '{family}'\n[generation]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        config_from_args(parser().parse_args(["--config", str(toml)]))
    assert fragment in str(caught.value) and f"model.family = '{family}'" in str(caught.value)
    assert str(toml) in str(caught.value)


def test_wan_accepts_its_own_shapes():
    config = RunConfig.from_dict({"model": {"family": "wan"}, "generation": {"max_sequence_length": 512}})
    assert config.generation.num_frames == 81 and config.spec.check_frames(config.generation.num_frames) is None


@pytest.mark.parametrize("weights", ["xyz", "ABCDEF0123456789", "ab"])
def test_bad_weights_fingerprint_named(weights):
    with pytest.raises(ConfigError, match="model.weights must be"):
        ModelConfig(weights=weights)


def test_unknown_family_exit_2(tmp_path, capsys):
    m = write(tmp_path / "m.parquet", prompt=["a cat"])
    assert main(["validate", str(m), "--family", "sora"]) == EXIT_BAD_INPUT
    assert "model.family must be one of mochi, wan, got 'sora'" in capsys.readouterr().err


# -- manifest -----------------------------------------------------------------------------------------------


def test_manifest_column_picks_an_unset_family(tmp_path):
    m = write(tmp_path / "m.parquet", prompt=["a", "b"], model_family=[None, "wan"])
    assert manifest_family(m) == "wan"
    config = config_from_args(parser().parse_args([str(m)]))
    assert config.model.family == "wan" and config.generation.num_frames == 81
    summary = validate_manifest(m, config.generation, spec=config.spec)
    assert summary.rows == 2 and not summary.warnings


def test_manifest_family_does_not_change_the_digest(tmp_path):
    plain = write(tmp_path / "a.parquet", prompt=["a", "b"])
    tagged = write(tmp_path / "b.parquet", prompt=["a", "b"], model_family=["mochi", "mochi"])
    assert validate_manifest(plain, GenerationConfig()).digest == validate_manifest(tagged, GenerationConfig()).digest


def test_mixed_families_name_file_row_and_column(tmp_path):
    m = write(tmp_path / "m.parquet", prompt=["a", "b", "c"], model_family=["wan", "wan", "mochi"])
    config = config_from_args(parser().parse_args([str(m)]))
    with pytest.raises(ManifestError) as caught:
        validate_manifest(m, config.generation, spec=config.spec)
    text = str(caught.value)
    assert f"{m}, row 2, column 'model_family': 'mochi' differs from the run's model family 'wan'" in text
    assert "row 0" not in text and "row 1" not in text


def test_explicit_family_conflicts_with_the_column(tmp_path, capsys):
    m = write(tmp_path / "m.parquet", prompt=["a"], model_family=["wan"])
    assert main(["plan", str(m), "--output", str(tmp_path / "o"), "--family", "mochi"]) == EXIT_BAD_INPUT
    assert "row 0, column 'model_family': 'wan' differs from the run's model family 'mochi'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_family_in_the_column(tmp_path):
    m = write(tmp_path / "m.parquet", prompt=["a", "b"], model_family=["mochi", "sora"])
    assert manifest_family(m) == "mochi"
    with pytest.raises(ManifestError, match=r"row 1, column 'model_family': unknown model family 'sora'"):
        validate_manifest(m, GenerationConfig())


def test_wan_frame_rule_per_row(tmp_path):
    m = write(tmp_path / "m.parquet", prompt=["a", "b"], num_frames=[7, 9])
    wan = RunConfig.from_dict({"model": {"family": "wan"}})
    with pytest.raises(ManifestError) as caught:
        validate_manifest(m, wan.generation, spec=wan.spec)
    assert "row 0, column 'num_frames': must be 4k+1 for Wan 2.1/2.2" in str(caught.value)
    assert "row 1" not in str(caught.value)
    with pytest.raises(ManifestError, match=r"row 1, column 'num_frames': must be 6k\+1 for Mochi 1"):
        validate_manifest(m, GenerationConfig(), spec=MOCHI)


# -- run id -------------------------------------------------------------------------------------------------


def test_mochi_run_ids_are_unchanged():
    # Computed with batchgen before model families existed (main at 3cf30d0): existing runs keep their ids.
    before = "373bbabd0d50869d222c362377605b773bfbbdb52282d8934f367922e4bbc6b0"
    assert plan_fingerprint("ab" * 32, 10, GenerationConfig(), 64) == before
    assert plan_fingerprint("ab" * 32, 10, GenerationConfig(), 64, ModelConfig()) == before
    assert plan_fingerprint("ab" * 32, 10, GenerationConfig(), 64, ModelConfig(family="wan")) != before
    assert plan_fingerprint("ab" * 32, 10, GenerationConfig(), 64, ModelConfig(weights="ab" * 16)) != before


def test_family_and_weights_change_the_run_and_are_described(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    m = write(tmp_path / "m.parquet", prompt=["a", "b"])
    mochi = make_plan(m, RunConfig(), storage)
    wan = make_plan(m, RunConfig.from_dict({"model": {"family": "wan"}}), storage, new_run=True)
    assert mochi.run_id != wan.run_id and wan.config.model.family == "wan"
    pinned = RunConfig(model=ModelConfig(weights="cd" * 16))
    changes = describe_changes(mochi, validate_manifest(m, GenerationConfig()), pinned)
    assert changes == [f'model.weights: "" -> "{"cd" * 16}"']
    changes = describe_changes(mochi, validate_manifest(m, GenerationConfig()), wan.config)
    assert 'model.family: "mochi" -> "wan"' in changes and "generation.num_frames: 163 -> 81" in changes


def test_plan_model_dir_pins_family_and_fingerprint(tmp_path, capsys, tiny_model_dir):
    m = write(tmp_path / "m.parquet", prompt=["a"])
    out = str(tmp_path / "o")
    assert main(["plan", str(m), "--output", out, "--model-dir", str(tiny_model_dir), "--json"]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    stored = json.loads(LocalStorage(tmp_path / "o").get_bytes(layout.plan_key(run_id)))
    assert stored["config"]["model"] == {"family": "mochi", "weights": fingerprint_model_dir(tiny_model_dir)}
    same = ["plan", str(m), "--output", out, "--weights-fingerprint", fingerprint_model_dir(tiny_model_dir), "--json"]
    assert main(same) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == run_id


def test_plan_model_dir_of_another_family_exit_4(tmp_path, capsys, tiny_model_dir):
    m = write(tmp_path / "m.parquet", prompt=["a"])
    code = main(
        ["plan", str(m), "--output", str(tmp_path / "o"), "--family", "wan", "--model-dir", str(tiny_model_dir)]
    )
    assert code == EXIT_CONFLICT
    err = capsys.readouterr().err
    assert "holds a Mochi 1 model (family 'mochi'), but the run uses family 'wan'" in err


# -- workers ------------------------------------------------------------------------------------------------


def _plan_cli(tmp_path, capsys, *flags) -> tuple[str, str]:
    m = write(tmp_path / "m.parquet", prompt=["a"])
    out = str(tmp_path / "o")
    assert main(["plan", str(m), "--output", out, "--json", *flags]) == 0
    return out, json.loads(capsys.readouterr().out)["run_id"]


def test_worker_refuses_weights_of_another_family_before_loading(tmp_path, capsys, tiny_model_dir):
    out, run_id = _plan_cli(tmp_path, capsys, "--family", "wan", *WAN_SMALL)
    code = main(["worker", "--output", out, "--run-id", run_id, "--shards", "all", "--model-dir", str(tiny_model_dir)])
    assert code == EXIT_CONFLICT
    err = capsys.readouterr().err
    assert str(tiny_model_dir) in err and "family 'mochi'" in err and "the run uses family 'wan'" in err


def test_worker_refuses_other_weights_of_the_family(tmp_path, capsys, tiny_model_dir):
    out, run_id = _plan_cli(tmp_path, capsys, "--weights-fingerprint", "ab" * 32)
    code = main(["worker", "--output", out, "--run-id", run_id, "--shards", "all", "--model-dir", str(tiny_model_dir)])
    assert code == EXIT_CONFLICT
    err = capsys.readouterr().err
    assert fingerprint_model_dir(tiny_model_dir) in err and "ab" * 32 in err
    assert LocalStorage(tmp_path / "o").head(layout.model_pin_key(run_id)) is None  # nothing was committed


def test_check_weights(wan_dir, tiny_model_dir):
    check_weights(wan_dir, family="wan")
    check_weights(tiny_model_dir, family="mochi", weights=fingerprint_model_dir(tiny_model_dir))
    with pytest.raises(ModelMismatchError, match="holds a Wan 2.1/2.2 model"):
        check_weights(wan_dir, family="mochi")


# -- Kubernetes ---------------------------------------------------------------------------------------------


def test_launch_settings_take_the_family_defaults():
    wan = LaunchSettings(family="wan")
    assert (wan.num_heads, wan.model_dir) == (WAN.default_heads, "/models/wan") == (40, "/models/wan")
    assert (LaunchSettings().num_heads, LaunchSettings().model_dir) == (24, "/models/mochi")
    assert LaunchSettings(family="wan", num_heads=12, model_dir="/w").num_heads == 12
    with pytest.raises(ConfigError, match="family must be one of"):
        LaunchSettings(family="sora")


def test_render_a_wan_plan(tmp_path, capsys):
    m = write(tmp_path / "m.parquet", prompt=["a", "b"], model_family=["wan", "wan"])
    out = (tmp_path / "o").as_uri()
    args = ["render", "--manifest", str(m), "--output", out, "--shards", "all", "--launcher", "pytorchjob"]
    assert main([*args, *WAN_SMALL, "--gpus-per-node", "2"]) == 0
    (job,) = yaml.safe_load_all(capsys.readouterr().out)
    command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--model-dir") + 1] == "/models/wan"
    values = tmp_path / "launch.yaml"
    values.write_text("family: mochi\n")
    assert main([*args, *WAN_SMALL, "--values", str(values)]) == EXIT_BAD_INPUT
    assert "family 'mochi' differs from the run's model family 'wan'" in capsys.readouterr().err


def test_degrees_checked_against_the_family_heads(tmp_path):
    m = write(tmp_path / "m.parquet", prompt=["a"])
    plan = make_plan(m, RunConfig.from_dict({"model": {"family": "wan"}}), LocalStorage(tmp_path / "o"))
    assert resolve_degrees(LaunchSettings(family="wan").replace(ulysses_degree=8, cfg_degree=1), plan).ulysses == 8
    with pytest.raises(TopologyError, match="does not divide the model's 12 attention heads"):
        resolve_degrees(LaunchSettings(family="wan", num_heads=12).replace(ulysses_degree=8, cfg_degree=1), plan)


# -- tiny-model -----------------------------------------------------------------------------------------------


def test_tiny_model_wan_reaches_the_family_writer(tmp_path, monkeypatch, capsys):
    # Plumbing only: the tiny Wan writer itself (batchgen.models.wan.tiny) is tested with it.
    calls = []

    def write_tiny_wan(directory, *, seed=0, experts=1):
        calls.append((str(directory), seed, experts))
        return Path(directory)

    monkeypatch.setitem(sys.modules, "batchgen.models.wan.tiny", types.SimpleNamespace(write_tiny_wan=write_tiny_wan))
    target = tmp_path / "wan"
    assert main(["tiny-model", str(target), "--family", "wan", "--experts", "2", "--seed", "5"]) == 0
    assert calls == [(str(target), 5, 2)]
    assert main(["tiny-model", str(target), "--family", "wan"]) == 0
    assert calls[-1] == (str(target), 0, 1)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--experts", "2"], "--experts is for --family wan"),
        (["--family", "wan", "--layout", "original"], "--layout original is for --family mochi"),
    ],
)
def test_tiny_model_refuses_options_of_the_other_family(tmp_path, capsys, flags, fragment):
    assert main(["tiny-model", str(tmp_path / "m"), *flags]) == EXIT_BAD_INPUT
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# -- estimate -------------------------------------------------------------------------------------------------

WAN_1_3B_CONFIG = {"num_attention_heads": 12, "attention_head_dim": 128, "num_layers": 30, "ffn_dim": 8960}


def test_wan_flops_from_its_config():
    big, small = wan_flops_from_config(WAN_14B_CONFIG), wan_flops_from_config(WAN_1_3B_CONFIG)
    # Per visual token and block: self-attention q/k/v/out, cross-attention q/out, the two FFN matrices.
    assert big.params == 40 * (6 * 5120**2 + 2 * 5120 * 13824) and (big.layers, big.width) == (40, 5120)
    assert small.params == 30 * (6 * 1536**2 + 2 * 1536 * 8960) and (small.layers, small.width) == (30, 1536)
    n = 32760  # 81 frames at 480x832: 21 latent frames x 30 x 52
    assert small.forward(n) == 2 * small.params * n + 4 * 30 * n**2 * 1536 + 4 * 30 * n * 512 * 1536


def _wan_plan(tmp_path):
    m = write(tmp_path / "m.parquet", prompt=["a", "b"])
    return make_plan(m, RunConfig.from_dict({"model": {"family": "wan"}}), LocalStorage(tmp_path / "o"))


def test_wan_estimate_is_labelled_flop_scaled_from_mochi(tmp_path):
    (shape,) = estimate_plan(_wan_plan(tmp_path), gpus=8, group_size=1).shapes
    assert shape.tokens == WAN.visual_tokens(81, 480, 832) == 32760
    # Nearest Mochi measurement: 44520 tokens, 3.7963 s; same utilisation assumed.
    assert shape.forward_s == pytest.approx(3.7963 * WAN_14B_FLOPS.forward(32760) / dit_flops(44520))
    assert "FLOP-scaled from H200 measured of mochi at 44520 tokens, not measured" in shape.source


def test_wan_calibration_file_is_used_as_measured(tmp_path):
    bench = json.loads((Path(__file__).parents[1] / "bench/results/gpu-nvidia-h200.json").read_text())
    bench["family"] = "wan"
    bench["sections"]["transformer_forward"]["runs"] = [{"visual_tokens": 32760, "seconds_per_forward": 9.5}]
    path = tmp_path / "wan-bench.json"
    path.write_text(json.dumps(bench))
    (shape,) = estimate_plan(_wan_plan(tmp_path), gpus=8, group_size=1, profile=profile_from_bench(path)).shapes
    assert shape.forward_s == 9.5 and "not measured" not in shape.source and "at 32760 tokens" in shape.source


def test_defaults_that_do_not_fit_the_family_are_refused_before_resolving(tmp_path):
    m = write(tmp_path / "m.parquet", prompt=["a"])
    with pytest.raises(ConfigError, match="generation.num_frames must be 4k"):
        list(iter_items(m, GenerationConfig(), spec=WAN))  # Mochi's 163 frames would fill the null cells


def test_tiny_wan_directory_pins_wan_and_is_refused_by_a_mochi_run(tmp_path, capsys):
    # The real tiny Wan layout, detected from its files.
    from batchgen.models.wan.tiny import write_tiny_wan

    wan = write_tiny_wan(tmp_path / "wan", seed=0, experts=2)
    m = write(tmp_path / "m.parquet", prompt=["a"])
    out = str(tmp_path / "o")
    plan = ["plan", str(m), "--output", out, "--json", "--model-dir", str(wan), *WAN_SMALL]
    assert main(plan) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    stored = json.loads(LocalStorage(tmp_path / "o").get_bytes(layout.plan_key(run_id)))
    assert stored["config"]["model"] == {"family": "wan", "weights": fingerprint_model_dir(wan)}
    assert main(["plan", str(m), "--output", out, "--json", "--run-name", "mochi"]) == 0
    mochi_run = json.loads(capsys.readouterr().out)["run_id"]
    worker = ["worker", "--output", out, "--run-id", mochi_run, "--shards", "all", "--model-dir", str(wan)]
    assert main(worker) == EXIT_CONFLICT
    assert "holds a Wan 2.1/2.2 model (family 'wan'), but the run uses family 'mochi'" in capsys.readouterr().err


def test_worker_loop_refuses_weights_other_than_the_planned_ones(tmp_path, tiny_config):
    # The loop's own guard (a generator built without the CLI's check_weights): real MP4s adopted as orphans.
    storage = LocalStorage(tmp_path / "out")
    config = tiny_run_config(tiny_config, shard_size=2).with_overrides({"model": {"weights": "cd" * 16}})
    plan = plan_run(storage, tmp_path, 2, config)
    (shard,) = plan.shards
    put_orphans(storage, plan, {shard: load_shard_items(storage, plan.run_id, shard)})
    with pytest.raises(ModelMismatchError) as refused:
        run_worker(storage, plan, [shard], NeverGenerates("ab" * 16), SingleProcess())
    assert "cd" * 16 in str(refused.value) and "ab" * 16 in str(refused.value)
    assert storage.head(layout.model_pin_key(plan.run_id)) is None
    assert run_worker(storage, plan, [shard], NeverGenerates("cd" * 16), SingleProcess()).adopted == 2
