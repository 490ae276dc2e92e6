"""What a run will cost before it starts: denoising forwards, GPU-hours and wall time, from the plan's shape
tally (run.json ``shapes``) and per-shape seconds whose source every figure names.

Sources of seconds, best first:
- ``run sidecars``: the run's own committed items (their ``timings`` and parallel layout), once there are some:
  denoising GPU-seconds per PFLOP, decode seconds per decoded voxel, text encoding seconds per item;
- ``calibration FILE``: a ``bench/gpu.py`` results file measured on the GPU type you will use;
- ``H200``: the measured table below (bench/results/gpu-nvidia-h200.json, 1 GPU, bf16, best SDPA kernel),
  optionally scaled to another GPU with ``--gpu-tflops`` (same model FLOP utilisation as measured on the H200).

Shapes between or beyond measured points are FLOP-scaled from the nearest one with the family's formula
(``FlopModel``), N visual tokens: Mochi (shared/reference/mochi.md) ``2 x 5.4e9 x N + 4 x 48 x N^2 x 3072``;
Wan ``2 x params x N + 4 x layers x N^2 x width + 4 x layers x N x 512 x width`` (self- plus cross-attention to
512 text tokens), params, layers and width from the transformer config when the weights are readable, else
Wan 14B's. Decoding scales with decoded voxels (frames x height x width). Sequence parallelism is assumed to scale
ideally (a lower bound on wall time); decoding and text encoding do not split across a group, so the group's
other GPUs wait meanwhile.

The measured tables are Mochi's. A run of another family without its own sidecars or a calibration file of its
family gets seconds FLOP-scaled from the Mochi measurements (same model FLOP utilisation and decode seconds per
voxel assumed), and every such figure says so: it is never presented as measured.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from batchgen.core import layout
from batchgen.core.errors import InputError
from batchgen.models import MOCHI, WAN, ModelSpec, spec_for, uses_cfg

log = logging.getLogger("batchgen.estimate")

VISUAL_LINEAR_PARAMS = 5.4e9
LAYERS, WIDTH = 48, 3072
H200_DATASHEET_TFLOPS = 989.4
OWN_SAMPLE = 64
"""Most recent sidecars read for the run's own timings (one GET each)."""


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of one transformer forward of a family at N visual tokens."""

    family: str
    params: float
    """Linear-layer parameters every visual token passes through."""
    layers: int
    width: int
    text_tokens: int = 0
    """Keys of a separate cross-attention (Wan: UMT5's 512); 0 where text joins self-attention (Mochi)."""

    def forward(self, tokens: int) -> float:
        self_attention = 4 * self.layers * tokens**2 * self.width
        cross_attention = 4 * self.layers * tokens * self.text_tokens * self.width
        return 2 * self.params * tokens + self_attention + cross_attention


MOCHI_FLOPS = FlopModel("mochi", VISUAL_LINEAR_PARAMS, LAYERS, WIDTH)


def dit_flops(tokens: int) -> float:
    """Mochi 1's forward FLOPs (the family the measured tables are of)."""
    return MOCHI_FLOPS.forward(tokens)


def wan_flops_from_config(config: dict[str, Any]) -> FlopModel:
    """Wan's FlopModel from a diffusers ``WanTransformer3DModel`` config. Per block, a visual token passes the
    self-attention's q/k/v/out (4 x width^2), the cross-attention's q and out (2 x width^2: its keys and values
    are projections of the 512 text tokens, computed once per forward, a negligible 4 x width^2 x 512 FLOPs) and the
    feed-forward network (2 x width x ffn_dim)."""
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    layers = int(config["num_layers"])
    params = layers * (6 * width**2 + 2 * width * int(config["ffn_dim"]))
    return FlopModel("wan", float(params), layers, width, text_tokens=WAN.text_length)


# Wan-AI/Wan2.1-T2V-14B as diffusers' WanTransformer3DModel (Wan-Video/Wan2.1 wan/configs/wan_t2v_14B.py: dim 5120,
# ffn 13824, 40 heads, 40 layers; Wan 2.2 A14B's two experts have the same shape).
WAN_14B_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}  # fmt: skip
WAN_14B_FLOPS = wan_flops_from_config(WAN_14B_CONFIG)


def flop_model(spec: ModelSpec, model_dir: str | Path | None = None) -> FlopModel:
    """The family's FlopModel: Mochi's published figures; Wan's from ``model_dir``'s config when given, else 14B."""
    if spec.family == MOCHI.family:
        return MOCHI_FLOPS
    if model_dir is None:
        return WAN_14B_FLOPS
    return wan_flops_from_config(spec.read_transformer_config(model_dir))


@dataclass(frozen=True)
class GpuProfile:
    """Single-GPU seconds of one GPU type: per DiT forward at measured token counts, decode, text encoding."""

    source: str
    forward_s: tuple[tuple[int, float], ...]
    """(visual tokens, seconds per forward)"""
    decode_s: float
    decode_voxels: int
    """frames x height x width of the measured decode"""
    text_encode_s: float
    family: str = "mochi"
    """The model family the seconds were measured on."""


# bench/results/gpu-nvidia-h200.json: transformer_forward.best (sdpa-cudnn), vae_decode, t5_encoder batch 1.
H200 = GpuProfile(
    source="H200 measured",
    forward_s=((14310, 0.7835), (44520, 3.7963)),
    decode_s=7.89,
    decode_voxels=163 * 480 * 848,
    text_encode_s=0.0224,
)


def scaled_profile(profile: GpuProfile, tflops: float) -> GpuProfile:
    """The profile on a GPU of ``tflops`` dense bf16 TFLOP/s, assuming the H200's measured utilisation."""
    if not tflops > 0:
        raise InputError(f"--gpu-tflops must be positive, got {tflops}")
    factor = H200_DATASHEET_TFLOPS / tflops
    return GpuProfile(
        source=f"{profile.source} x {H200_DATASHEET_TFLOPS:g}/{tflops:g} TFLOP/s",
        forward_s=tuple((n, s * factor) for n, s in profile.forward_s),
        decode_s=profile.decode_s * factor,
        decode_voxels=profile.decode_voxels,
        text_encode_s=profile.text_encode_s * factor,
        family=profile.family,
    )


def profile_from_bench(path: str | Path) -> GpuProfile:
    """A GpuProfile from a ``bench/gpu.py`` results file (the calibration of another GPU type)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        sections = data["sections"]
        runs = sections["transformer_forward"]["runs"]
        best: dict[int, float] = {}
        for run in runs:
            tokens, seconds = int(run["visual_tokens"]), float(run["seconds_per_forward"])
            best[tokens] = min(seconds, best.get(tokens, seconds))
        vae = sections["vae_decode"]
        height, width = vae["resolution"]
        return GpuProfile(
            source=f"calibration {path.name} ({data.get('device', 'unknown device')})",
            forward_s=tuple(sorted(best.items())),
            decode_s=float(vae["seconds"]),
            decode_voxels=int(vae["frames_out"]) * int(height) * int(width),
            text_encode_s=float(sections["t5_encoder"]["batches"][0]["seconds_per_prompt"]),
            family=str(data.get("family", "mochi")),  # bench/gpu.py measured Mochi before it named the family
        )
    except FileNotFoundError:
        raise InputError(f"{path}: calibration file not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e})") from None
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a bench/gpu.py results file (missing or bad {e})") from None


@dataclass(frozen=True)
class OwnTimings:
    """Rates measured on the run's own committed items, in single-GPU seconds."""

    items: int
    denoise_s_per_pflop: float
    decode_s_per_voxel: float
    text_encode_s: float


def own_timings(
    storage, run_id: str, *, sample: int = OWN_SAMPLE, spec: ModelSpec = MOCHI, flops: FlopModel = MOCHI_FLOPS
) -> OwnTimings | None:
    """Rates from the ``sample`` most recently listed sidecars of the run that carry timings (None if none)."""
    infos = sorted(storage.list(layout.meta_prefix(run_id)), key=lambda i: (i.modified or 0.0, i.key))
    pflops = denoise = voxels = decode = text = 0.0
    used = 0
    for info in reversed(infos[-sample:]):
        sidecar = json.loads(storage.get_bytes(info.key))
        timings = sidecar.get("timings") or {}
        if not {"denoise", "decode"} <= timings.keys():
            continue  # adopted videos have no timings
        parallel = sidecar.get("parallel") or {}
        group = max(1, int(parallel.get("world_size", 1)) // max(1, int(parallel.get("dp_size", 1))))
        forwards = sidecar["num_inference_steps"] * (2 if uses_cfg(sidecar["guidance_scale"]) else 1)
        tokens = spec.visual_tokens(sidecar["num_frames"], sidecar["height"], sidecar["width"])
        pflops += forwards * flops.forward(tokens) / 1e15
        denoise += timings["denoise"] * group
        voxels += sidecar["num_frames"] * sidecar["height"] * sidecar["width"]
        decode += timings["decode"]
        text += timings.get("text_encode", 0.0)
        used += 1
    if not used:
        return None
    return OwnTimings(used, denoise / pflops, decode / voxels, text / used)


@dataclass
class ShapeEstimate:
    num_frames: int
    height: int
    width: int
    items: int
    tokens: int
    forwards: int
    """Denoising forwards of all the group's items."""
    forward_s: float
    decode_s: float
    text_encode_s: float
    source: str
    item_wall_s: float = 0.0
    """Seconds one item occupies its group of GPUs."""


@dataclass
class Estimate:
    items: int
    forwards: int
    forwards_source: str
    gpus: int
    group_size: int
    shapes: list[ShapeEstimate] = field(default_factory=list)

    @property
    def groups(self) -> int:
        return self.gpus // self.group_size

    @property
    def wall_s(self) -> float:
        # Items are dealt evenly to groups (an item never splits across groups, so a group takes one item's time
        # at least); every GPU is held until the last item.
        spread = sum(s.item_wall_s * s.items for s in self.shapes) / self.groups
        return max([spread, *(s.item_wall_s for s in self.shapes if s.items)])

    @property
    def gpu_hours(self) -> float:
        """What the GPUs cost: every one of them for the whole wall time."""
        return self.gpus * self.wall_s / 3600

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "denoising_forwards": self.forwards,
            "forwards_source": self.forwards_source,
            "gpus": self.gpus,
            "gpus_per_group": self.group_size,
            "gpu_hours": round(self.gpu_hours, 3),
            "wall_seconds": round(self.wall_s, 1),
            "shapes": [
                {
                    "num_frames": s.num_frames, "height": s.height, "width": s.width, "items": s.items,
                    "visual_tokens": s.tokens, "forwards": s.forwards, "seconds_per_forward": round(s.forward_s, 4),
                    "decode_seconds": round(s.decode_s, 3), "text_encode_seconds": round(s.text_encode_s, 4),
                    "item_wall_seconds": round(s.item_wall_s, 2), "source": s.source,
                }
                for s in self.shapes
            ],
        }  # fmt: skip

    def lines(self) -> list[str]:
        lines = [f"estimate  {self.items} items, {self.forwards} denoising forwards ({self.forwards_source})"]
        for s in self.shapes:
            lines.append(
                f"  {s.num_frames}x{s.height}x{s.width}: {s.items} items, {s.tokens} tokens, "
                f"{s.forward_s:.3g} s/forward, decode {s.decode_s:.3g} s, {s.item_wall_s:.4g} s/item on "
                f"{self.group_size} GPU(s)  [{s.source}]"
            )
        lines.append(
            f"  {self.gpu_hours:.4g} GPU-hours, wall {_duration(self.wall_s)} on {self.gpus} GPU(s) "
            f"({self.groups} group(s) of {self.group_size}; ideal sequence-parallel scaling)"
        )
        return lines


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _forward_from_profile(profile: GpuProfile, tokens: int, flops: FlopModel) -> tuple[float, str]:
    measured, seconds = min(profile.forward_s, key=lambda point: abs(point[0] - tokens))
    if profile.family != flops.family:
        # Another family's measurement: same utilisation assumed, the label says so.
        measured_flops = flop_model(spec_for(profile.family)).forward(measured)
        scaled = seconds * flops.forward(tokens) / measured_flops
        return scaled, f"FLOP-scaled from {profile.source} of {profile.family} at {measured} tokens, not measured"
    if measured == tokens:
        return seconds, f"{profile.source} at {tokens} tokens"
    return seconds * flops.forward(tokens) / flops.forward(measured), (
        f"{profile.source}, FLOP-scaled from {measured} tokens"
    )


def _shape_estimate(
    group, forwards: int, profile: GpuProfile, own: OwnTimings | None, spec: ModelSpec, flops: FlopModel
) -> ShapeEstimate:
    tokens = spec.visual_tokens(group.num_frames, group.height, group.width)
    voxels = group.num_frames * group.height * group.width
    if own is not None:
        forward_s = own.denoise_s_per_pflop * flops.forward(tokens) / 1e15
        decode_s, text_s = own.decode_s_per_voxel * voxels, own.text_encode_s
        source = f"run sidecars ({own.items} items), FLOP-scaled"
    else:
        forward_s, source = _forward_from_profile(profile, tokens, flops)
        decode_s, text_s = profile.decode_s * voxels / profile.decode_voxels, profile.text_encode_s
    return ShapeEstimate(
        group.num_frames, group.height, group.width, group.items, tokens, forwards, forward_s, decode_s, text_s, source
    )


def estimate_plan(
    plan,
    *,
    gpus: int,
    group_size: int,
    profile: GpuProfile = H200,
    own: OwnTimings | None = None,
    flops: FlopModel | None = None,
) -> Estimate:
    """The run's cost on ``gpus`` GPUs where ``group_size`` of them split each video (ulysses x ring x cfg), for
    the plan's model family (``flops`` default: its ``flop_model`` without weights)."""
    if group_size < 1 or gpus < group_size:
        raise InputError(f"estimate needs at least one group: {gpus} GPU(s), {group_size} per group")
    if not plan.shapes:  # the tally of every item; generate_shapes (what is costed) may be empty when all are reused
        raise InputError(f"the plan of {plan.run_id} has no shape tally (planned by an older batchgen): plan again")
    generation = plan.config.generation
    per_item = generation.num_inference_steps * (2 if uses_cfg(generation.guidance_scale) else 1)
    counted = all(g.forwards for g in plan.generate_shapes)
    if counted:
        source = "per row: steps, x 2 with guidance"
    else:
        source = f"run defaults: {per_item} per item; this plan predates per-row counts, plan again for them"
    spec = plan.config.spec
    flops = flops or flop_model(spec)
    shapes = [
        _shape_estimate(g, g.forwards if counted else g.items * per_item, profile, own, spec, flops)
        for g in plan.generate_shapes
    ]
    for s in shapes:
        s.item_wall_s = s.forwards / s.items * s.forward_s / group_size + s.decode_s + s.text_encode_s
    return Estimate(
        items=sum(s.items for s in shapes),
        forwards=sum(s.forwards for s in shapes),
        forwards_source=source,
        gpus=gpus,
        group_size=group_size,
        shapes=shapes,
    )


def choose_profile(gpu_tflops: float | None, calibration: str | None) -> GpuProfile:
    if gpu_tflops is not None and calibration is not None:
        raise InputError("--gpu-tflops and --calibration are alternatives: give one")
    if calibration is not None:
        return profile_from_bench(calibration)
    return scaled_profile(H200, gpu_tflops) if gpu_tflops is not None else replace(H200)
