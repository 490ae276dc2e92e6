"""Run-wide configuration: one tree of small dataclasses, validated before anything expensive starts.

``[model] family`` picks a ``batchgen.models`` spec; generation defaults are that family's
(``spec.generation_defaults``: Mochi 1 480x848, 163 frames, 64 steps; Wan 480x832, 81 frames, 50 steps). A TOML
file may set any field; CLI flags override the file. The config is stored with the run's plan.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (requires-python): the library tomllib was taken from
    import tomli as tomllib

from batchgen.core.errors import ConfigError
from batchgen.models import FAMILIES, ModelSpec, spec_for

MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_PROMPT_CHARS = 4000
_HEX = frozenset("0123456789abcdef")


def check_steps(value: int) -> str | None:
    if value < 1 or value > MAX_STEPS:
        return f"must be between 1 and {MAX_STEPS}, got {value}"
    return None


def check_guidance(value: float) -> str | None:
    if not (value == value) or value < 0 or value > MAX_GUIDANCE:  # value != value catches NaN
        return f"must be between 0 and {MAX_GUIDANCE}, got {value}"
    return None


@dataclass(frozen=True)
class GenerationConfig:
    """Per-item generation parameters; manifest columns of the same names override them per row.

    The field defaults are Mochi's; ``RunConfig.from_dict`` starts from the run's family defaults instead. Rules
    that depend on the family (frame rule, size multiple, token limit) are checked by ``RunConfig``."""

    num_frames: int = 163
    """Decoded frames; the family's rule (Mochi 6k+1, Wan 4k+1)."""
    height: int = 480
    """Pixels; multiple of the family's size multiple (16 for both)."""
    width: int = 848
    """Pixels; multiple of the family's size multiple."""
    num_inference_steps: int = 64
    """Denoising steps."""
    guidance_scale: float = 4.5
    """Classifier-free guidance scale; 1.0 or less disables the unconditional pass."""
    negative_prompt: str = ""
    """Default negative prompt; empty is encoded as zeros, as Genmo does."""
    fps: int = 30
    """Frames per second of the MP4."""
    max_sequence_length: int = 256
    """Text encoder token limit (Mochi's T5 256, Wan's UMT5 512 at most)."""
    crf: int = 18
    """H.264 constant rate factor (0 lossless .. 51 worst)."""

    def __post_init__(self) -> None:
        for name, check in (("num_inference_steps", check_steps), ("guidance_scale", check_guidance)):
            problem = check(getattr(self, name))
            if problem:
                raise ConfigError(f"generation.{name} {problem}")
        if not 1 <= self.fps <= 240:
            raise ConfigError(f"generation.fps must be between 1 and 240, got {self.fps}")
        if self.max_sequence_length < 1:
            raise ConfigError(f"generation.max_sequence_length must be >= 1, got {self.max_sequence_length}")
        if not 0 <= self.crf <= 51:
            raise ConfigError(f"generation.crf must be between 0 and 51, got {self.crf}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model family the run uses, and (when known) which weights: both are part of the run id."""

    family: str = "mochi"
    """A ``batchgen.models`` family: 'mochi' or 'wan'. One run uses one family."""
    weights: str = ""
    """The weights' fingerprint (``batchgen.models.common.weights.fingerprint_model_dir``, hex); '' = unknown until the
    first commit pins it in plan/model.json."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family must be one of {', '.join(sorted(FAMILIES))}, got {self.family!r}")
        if self.weights and not (set(self.weights) <= _HEX and 16 <= len(self.weights) <= 64):
            raise ConfigError(f"model.weights must be 16 to 64 lowercase hex digits (or empty), got {self.weights!r}")

    @property
    def spec(self) -> ModelSpec:
        return spec_for(self.family)


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A config field whose help, choices and bounds are declared once, as field metadata: the CLI flags, the
    launch settings, the chart's values schema and the worker's argv are all derived from it (see ``flag_specs``,
    ``value_schema``, ``setting_argv``), and ``check_setting`` is its one validation."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum, "maximum": maximum})


ATTENTION_CHOICES = ("auto", "joint", "per-prompt")
"""``[parallel] attention``: how each block's attention treats the CFG batch (``ParallelConfig.attention``)."""


@dataclass(frozen=True)
class ParallelConfig:
    """How one worker process group splits the work. World size = data x cfg x ulysses x ring.

    The one declaration of the parallel and speed settings. A value at its default means "not set" wherever the
    settings are layered (launch settings over the plan's config; flags over the config file)."""

    ulysses_degree: int = setting(0, "Ulysses (all-to-all over heads) degree; 0 = choose automatically", minimum=0)
    ring_degree: int = setting(0, "ring attention degree; 0 = choose automatically", minimum=0)
    cfg_degree: int = setting(
        0, "CFG parallel degree: conditional and unconditional passes on different ranks; 0 = automatic",
        choices=(0, 1, 2),
    )  # fmt: skip
    sp_backend: str = setting(
        "native", "sequence-parallel backend: native (torch.distributed) or xfuser (xDiT, CUDA + flash-attn only)",
        choices=("native", "xfuser"),
    )  # fmt: skip
    offload: str = setting(
        "auto", "auto (offload only when the estimated peak does not fit the GPU), none, or model (each component "
        "on the GPU only while it runs)", choices=("auto", "none", "model"),
    )  # fmt: skip
    compile: bool = setting(False, "torch.compile each block's norm, modulation and MLP regions (collectives eager)")
    cache_threshold: float = setting(
        0.0, "first-block cache: reuse the other blocks' residual while the first block's relative change stays "
        "below this (e.g. 0.05); 0 = off; changes the output, recorded in each sidecar", minimum=0.0, maximum=1.0,
    )  # fmt: skip
    fp8: bool = setting(False, "FP8 linear layers (Hopper only), used only where the numeric gate passes")
    attention: str = setting(
        "auto", "how each block attends over the CFG batch: joint (one masked call for the batch), per-prompt (one "
        "unmasked call per prompt, cut to its valid text tokens: FlashAttention stays eligible) or auto (on CUDA the "
        "faster of the two and of the kernels under each, measured at the first use of each shape; on CPU joint)",
        choices=ATTENTION_CHOICES,
    )  # fmt: skip

    def __post_init__(self) -> None:
        problems = setting_problems(self)
        if problems:
            raise ConfigError(f"parallel.{problems[0]}")
        if self.attention == "joint" and self.sp_backend == "xfuser":
            # xDiT's attention takes no key mask, so it cannot batch prompts of different lengths into one call.
            raise ConfigError(
                "parallel.attention 'joint' needs a key mask, which the xfuser backend's attention "
                "does not take; use 'auto' or 'per-prompt', or sp_backend 'native'"
            )


def _one_of(choices: tuple[Any, ...]) -> str:
    shown = [repr(c) for c in choices]
    return ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0]


def check_setting(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for the ``setting`` field ``f`` ("must be ..."), or None."""
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        return f"must be {_one_of(meta['choices'])}, got {value!r}"
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and high is not None and not low <= value <= high:
        return f"must be between {low:g} and {high:g}, got {value}"
    if low is not None and value < low:
        return f"must be >= {low:g}, got {value}"
    return None


def setting_problems(obj: Any) -> list[str]:
    """Every "<key> must be ..." problem of a dataclass whose fields are declared with ``setting``."""
    problems = []
    for f in fields(obj):
        problem = check_setting(f, getattr(obj, f.name))
        if problem:
            problems.append(f"{f.name} {problem}")
    return problems


def field_kind(f: dataclasses.Field) -> str:
    """The field's base type name ("int", "float", "bool", "str", "tuple...", "Mapping..."); annotations are strings
    under ``from __future__ import annotations``, and ``X | None`` counts as X."""
    return str(f.type).split(" |")[0]


def flag_specs(klass: type) -> list[tuple[str, str, type, str]]:
    """(flag, key, type, help) of each ``setting`` field: the command-line flags derived from the dataclass."""
    specs = []
    for f in fields(klass):
        kind = {"int": int, "float": float, "bool": bool}.get(field_kind(f), str)
        help_text = f.metadata["help"]
        if kind is not bool:
            help_text += f"; default {f.default}"
        specs.append(("--" + f.name.replace("_", "-"), f.name, kind, help_text))
    return specs


def setting_argv(obj: Any) -> list[str]:
    """The flags that give a fresh process ``obj``'s values: those that differ from the defaults (an absent flag
    leaves the default), values first, then switches."""
    values, switches = [], []
    for flag, key, kind, _help in flag_specs(type(obj)):
        value = getattr(obj, key)
        if value == next(f.default for f in fields(obj) if f.name == key):
            continue
        if kind is bool:
            switches.append(flag)
        else:
            values += [flag, str(value)]
    return values + switches


def value_schema(klass: type) -> dict[str, dict[str, Any]]:
    """JSON-schema properties (camelCase names, as a Helm values file spells them) of the ``setting`` fields."""
    json_types = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}
    properties = {}
    for f in fields(klass):
        head, *rest = f.name.split("_")
        entry: dict[str, Any] = {"type": json_types[field_kind(f)], "description": f.metadata["help"]}
        if f.metadata.get("choices"):
            entry["enum"] = list(f.metadata["choices"])
        for bound in ("minimum", "maximum"):
            if f.metadata.get(bound) is not None:
                entry[bound] = f.metadata[bound]
        properties[head + "".join(part.title() for part in rest)] = entry
    return properties


@dataclass(frozen=True)
class WorkerConfig:
    max_attempts: int = setting(3, "attempts per item inside one worker before it is recorded as failed", minimum=1)
    shard_size: int = setting(64, "items per shard", minimum=1, maximum=100_000)
    metrics_port: int = setting(
        0, "port of the Prometheus endpoint, + LOCAL_RANK per rank (see metrics.py); 0 = off", minimum=0, maximum=65535
    )

    def __post_init__(self) -> None:
        problems = setting_problems(self)
        if problems:
            raise ConfigError(f"worker.{problems[0]}")


@dataclass(frozen=True)
class QualityConfig:
    """The quality gate (``batchgen.core.quality``): thresholds of the black and frozen flags, and what a flag does.
    Not part of the run id, like the retry settings: a rerun may tighten them."""

    on_flag: str = "record"
    """'record' (commit the video, flags in the sidecar and index) or 'fail' (the item fails with the flags)."""
    black_luma: float = 25.5
    """A pixel is black at or below this BT.601 luma (0-255): ffmpeg blackdetect's pix_th default, 10%."""
    black_pixel_fraction: float = 0.98
    """A frame is black when this share of its pixels is (blackdetect's picture_black_ratio_th default)."""
    black_frame_fraction: float = 0.5
    """A video is flagged 'black' when at least this share of its frames is black."""
    frozen_motion: float = 0.5
    """A video is flagged 'frozen' when its mean frame-to-frame luma difference (0-255) is below this."""

    def __post_init__(self) -> None:
        if self.on_flag not in ("record", "fail"):
            raise ConfigError(f"quality.on_flag must be 'record' or 'fail', got {self.on_flag!r}")
        limits = {"black_luma": 255, "black_pixel_fraction": 1, "black_frame_fraction": 1, "frozen_motion": 255}
        for name, top in limits.items():
            if not 0 <= getattr(self, name) <= top:
                raise ConfigError(f"quality.{name} must be between 0 and {top}, got {getattr(self, name)}")


_SECTIONS = {
    "model": ModelConfig,
    "generation": GenerationConfig,
    "parallel": ParallelConfig,
    "worker": WorkerConfig,
    "quality": QualityConfig,
}


@dataclass(frozen=True)
class RunConfig:
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        problem = check_generation(self.generation, self.spec)
        if problem:
            raise ConfigError(problem)

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from TOML-shaped data; generation keys absent from ``data`` take the family's defaults."""
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; expected {sorted(_SECTIONS)}")
        built: dict[str, Any] = {}  # section name -> that section's dataclass
        for name, klass in _SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{name}] must be a table")
            if name == "generation":
                values = {**built["model"].spec.generation_defaults, **values}
            built[name] = build_section(klass, values, f"{source}: {name}")
        try:
            return cls(**built)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> RunConfig:
        """Apply overrides ({section: {key: value}}) on top of every value of this config; None values are ignored.
        Keeps this config's generation values even when the family changes (``merge_tables`` + ``from_dict``
        rebases the ones a user did not set)."""
        merged = merge_tables(self.to_dict(), overrides)
        return RunConfig.from_dict(merged, source="command line")


def merge_tables(base: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``base`` (TOML-shaped) with each section updated by the non-None values of ``overrides``."""
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in base.items()}
    for section, values in overrides.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            table = merged.setdefault(section, {})
            if isinstance(table, dict):  # a non-table section is reported by from_dict
                table.update(given)
    return merged


def check_generation(generation: GenerationConfig, spec: ModelSpec) -> str | None:
    """The first family-dependent problem of ``generation`` (naming the key and the family), or None."""
    for name, check in (("num_frames", spec.check_frames), ("height", spec.check_side), ("width", spec.check_side)):
        problem = check(getattr(generation, name))
        if problem:
            return f"generation.{name} {problem} (model.family = {spec.family!r})"
    if generation.max_sequence_length > spec.text_length:
        return (
            f"generation.max_sequence_length must be at most {spec.text_length} for {spec.title} "
            f"(model.family = {spec.family!r}), got {generation.max_sequence_length}"
        )
    return None


def type_problem(kind: str, value: Any) -> str | None:
    """ "must be ..." when ``value`` (from TOML or YAML) does not have the field type ``kind`` (see ``field_kind``)."""
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer, got {value!r}"
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
        return f"must be a number, got {value!r}"
    if kind == "bool" and not isinstance(value, bool):
        return f"must be true or false, got {value!r}"
    if kind == "str" and not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if kind.startswith("tuple") and not isinstance(value, list | tuple):
        return f"must be a list, got {value!r}"
    if kind.startswith("Mapping") and not isinstance(value, dict):
        return f"must be a mapping, got {value!r}"
    return None


def build_section(klass: type, values: dict[str, Any], where: str) -> Any:
    """``klass(**values)`` after refusing unknown keys and wrong types by name (``where``: "source: section")."""
    known = {f.name: f for f in fields(klass)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected {sorted(known)}")
    for key, value in values.items():
        problem = type_problem(field_kind(known[key]), value)
        if problem:
            raise ConfigError(f"{where}.{key} {problem}")
    try:
        return klass(**values)
    except ConfigError as e:
        raise ConfigError(f"{where.split(':')[0]}: {e}") from None


def load_config(path: str | Path | None) -> RunConfig:
    """Load a TOML config file; None gives the defaults."""
    if path is None:
        return RunConfig()
    return RunConfig.from_dict(read_config_table(path), source=str(path))


def read_config_table(path: str | Path) -> dict[str, Any]:
    """The raw TOML tables of a config file (not yet validated: ``RunConfig.from_dict`` does that)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a TOML config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}), so not a TOML config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return data
