"""Run-wide configuration: one tree of small dataclasses, validated before anything expensive starts.

Defaults follow Mochi 1 (``shared/reference/mochi.md``): 480x848, 163 frames, 64 steps, guidance 4.5, 30 fps.
A TOML file may set any field; CLI flags override the file. The config is stored with the run's plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from batchgen.errors import ConfigError

# Mochi's shape rules: frames are 6k+1 (causal VAE, 6x temporal), sizes multiples of 16 (8x VAE x 2x2 patch).
FRAME_STEP = 6
SIZE_MULTIPLE = 16
MAX_FRAMES = 511
MAX_SIDE = 2048
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_PROMPT_CHARS = 4000


def check_frames(num_frames: int) -> str | None:
    """Return why ``num_frames`` is invalid for Mochi, or None."""
    if num_frames < 1 or (num_frames - 1) % FRAME_STEP != 0:
        return f"must be 6k+1 (7, 13, 19, 31, 49, 61, 85, 163, ...), got {num_frames}"
    if num_frames > MAX_FRAMES:
        return f"must be at most {MAX_FRAMES}, got {num_frames}"
    return None


def check_side(value: int) -> str | None:
    if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE != 0:
        return f"must be a positive multiple of {SIZE_MULTIPLE}, got {value}"
    if value > MAX_SIDE:
        return f"must be at most {MAX_SIDE}, got {value}"
    return None


def check_steps(value: int) -> str | None:
    if value < 1 or value > MAX_STEPS:
        return f"must be between 1 and {MAX_STEPS}, got {value}"
    return None


def check_guidance(value: float) -> str | None:
    if not (value == value) or value < 0 or value > MAX_GUIDANCE:  # value != value catches NaN
        return f"must be between 0 and {MAX_GUIDANCE}, got {value}"
    return None


def latent_frames(num_frames: int) -> int:
    """Latent frames T for ``num_frames`` decoded frames (decoding gives back 6T - 5)."""
    return (num_frames - 1) // FRAME_STEP + 1


@dataclass(frozen=True)
class GenerationConfig:
    """Per-item generation parameters; manifest columns of the same names override them per row."""

    num_frames: int = 163
    """Decoded frames; must be 6k+1."""
    height: int = 480
    """Pixels; multiple of 16."""
    width: int = 848
    """Pixels; multiple of 16."""
    num_inference_steps: int = 64
    """Denoising steps."""
    guidance_scale: float = 4.5
    """Classifier-free guidance scale; 1.0 or less disables the unconditional pass."""
    negative_prompt: str = ""
    """Default negative prompt; empty is encoded as zeros, as Genmo does."""
    fps: int = 30
    """Frames per second of the MP4."""
    max_sequence_length: int = 256
    """T5 token limit."""
    crf: int = 18
    """H.264 constant rate factor (0 lossless .. 51 worst)."""

    def __post_init__(self) -> None:
        for name, check in (
            ("num_frames", check_frames),
            ("height", check_side),
            ("width", check_side),
            ("num_inference_steps", check_steps),
            ("guidance_scale", check_guidance),
        ):
            problem = check(getattr(self, name))
            if problem:
                raise ConfigError(f"generation.{name} {problem}")
        if not 1 <= self.fps <= 240:
            raise ConfigError(f"generation.fps must be between 1 and 240, got {self.fps}")
        if not 1 <= self.max_sequence_length <= 256:
            raise ConfigError(
                f"generation.max_sequence_length must be between 1 and 256, got {self.max_sequence_length}"
            )
        if not 0 <= self.crf <= 51:
            raise ConfigError(f"generation.crf must be between 0 and 51, got {self.crf}")


@dataclass(frozen=True)
class ParallelConfig:
    """How one worker process group splits the work. World size = data x cfg x ulysses x ring."""

    ulysses_degree: int = 0
    """Ulysses (all-to-all over heads) degree; 0 = choose automatically."""
    ring_degree: int = 0
    """Ring attention degree; 0 = choose automatically."""
    cfg_degree: int = 0
    """1 or 2 (conditional and unconditional passes on different ranks); 0 = choose automatically."""
    sp_backend: str = "native"
    """'native' (torch.distributed, CPU and GPU) or 'xfuser' (xDiT, CUDA + flash-attn only)."""
    offload: str = "auto"
    """'auto' (offload only when the estimated peak does not fit the GPU), 'none' or 'model' (each component on the
    GPU only while it runs)."""
    compile: bool = False
    """torch.compile each transformer block's norm, modulation and MLP regions (collectives stay eager)."""
    cache_threshold: float = 0.0
    """First-block cache: reuse the other blocks' residual while the first block's relative change stays below
    this (e.g. 0.05); 0 = off. Changes the output: recorded in each sidecar."""
    fp8: bool = False
    """FP8 linear layers (Hopper only), used only when the numeric gate passes on this device."""

    def __post_init__(self) -> None:
        for name in ("ulysses_degree", "ring_degree"):
            if getattr(self, name) < 0:
                raise ConfigError(f"parallel.{name} must be >= 0, got {getattr(self, name)}")
        if self.cfg_degree not in (0, 1, 2):
            raise ConfigError(f"parallel.cfg_degree must be 0, 1 or 2, got {self.cfg_degree}")
        if self.sp_backend not in ("native", "xfuser"):
            raise ConfigError(f"parallel.sp_backend must be 'native' or 'xfuser', got {self.sp_backend!r}")
        if self.offload not in ("auto", "none", "model"):
            raise ConfigError(f"parallel.offload must be 'auto', 'none' or 'model', got {self.offload!r}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ConfigError(f"parallel.cache_threshold must be between 0 and 1, got {self.cache_threshold}")


@dataclass(frozen=True)
class WorkerConfig:
    max_attempts: int = 3
    """Attempts per item inside one worker before it is recorded as failed."""
    shard_size: int = 64
    """Items per shard."""
    metrics_port: int = 0
    """Port of the Prometheus endpoint (0 = off); each torchrun rank adds its LOCAL_RANK (see metrics.py)."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"worker.max_attempts must be >= 1, got {self.max_attempts}")
        if not 1 <= self.shard_size <= 100_000:
            raise ConfigError(f"worker.shard_size must be between 1 and 100000, got {self.shard_size}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"worker.metrics_port must be between 0 (off) and 65535, got {self.metrics_port}")


@dataclass(frozen=True)
class QualityConfig:
    """The quality gate (``batchgen.quality``): thresholds of the black and frozen flags, and what a flag does.
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


@dataclass(frozen=True)
class RunConfig:
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        sections = {
            "generation": GenerationConfig,
            "parallel": ParallelConfig,
            "worker": WorkerConfig,
            "quality": QualityConfig,
        }
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; expected {sorted(sections)}")
        built = {}
        for name, klass in sections.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{name}] must be a table")
            built[name] = _build(klass, values, f"{source}: {name}")
        return cls(**built)

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> RunConfig:
        """Apply CLI overrides ({section: {key: value}}); None values are ignored."""
        merged = self.to_dict()
        for section, values in overrides.items():
            merged[section].update({k: v for k, v in values.items() if v is not None})
        return RunConfig.from_dict(merged, source="command line")


def _build(klass: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(klass)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected {sorted(known)}")
    for key, value in values.items():
        expected = known[key].type
        # Annotations are strings under `from __future__ import annotations`.
        if expected == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}.{key} must be an integer, got {value!r}")
        if expected == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
        if expected == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
        if expected == "str" and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string, got {value!r}")
    try:
        return klass(**values)
    except ConfigError as e:
        raise ConfigError(f"{where.split(':')[0]}: {e}") from None


def load_config(path: str | Path | None) -> RunConfig:
    """Load a TOML config file; None gives the defaults."""
    if path is None:
        return RunConfig()
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
    return RunConfig.from_dict(data, source=str(path))
