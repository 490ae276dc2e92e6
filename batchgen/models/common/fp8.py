"""Optional FP8 linear layers for the transformer blocks, behind ``parallel.fp8`` and a numeric gate.

Each ``nn.Linear`` in the blocks becomes an ``Fp8Linear``: the weight is quantised once to float8 e4m3 with a
per-tensor scale, activations are quantised per call, and ``torch._scaled_mm`` multiplies on FP8 tensor cores
(Hopper or newer) with bf16 output. Attention stays in bf16.

The path is used only when its numeric gate passes on this device: one block is run in fp32 (the reference), in
the model dtype, and in the model dtype with FP8 linears, on the same seeded inputs; the FP8 block's relative
error against the reference must stay within ``ERROR_MULTIPLE`` times the model-dtype block's. The kernel is a
parameter, so CPU tests drive the gate with an emulated kernel (same quantisation, fp32 products) and with a
broken one. Never the default: ``bench/gpu.py`` reports the gate and the speed where a GPU exists.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from batchgen.core.errors import ConfigError
from batchgen.models.spec import ModelSpec

log = logging.getLogger("batchgen.generate.fp8")

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
MIN_CAPABILITY = (9, 0)
"""Hopper: FP8 tensor cores for torch._scaled_mm."""
ERROR_MULTIPLE = 12.0
"""FP8 block error allowed, as a multiple of the model dtype's error against fp32 on the same inputs. e4m3 keeps 3
mantissa bits to bf16's 7 (16x the unit roundoff); correct FP8 blocks measured 5-8x the bf16 error (CPU emulation,
widths 64 and 512 and the tiny model), a kernel with a 20% scale error far more (tests/test_speedups.py)."""
GATE_TOKENS = 1024
GATE_TEXT_TOKENS = 64
GATE_SEED = 0

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]


def scaled_mm_kernel(a, b, scale_a, scale_b, out_dtype):
    """a [M, K] fp8 row-major, b [K, N] fp8 column-major, fp32 scales [M, 1] and [1, N] -> [M, N] out_dtype."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def emulated_kernel(a, b, scale_a, scale_b, out_dtype):
    """The same FP8 quantisation with fp32 products: the gate's stand-in where no FP8 hardware exists."""
    return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise scaled e4m3 of a 2-D tensor: (x / scale) in FP8 and the fp32 scales [rows, 1] (each row's amax
    maps to the format's maximum). Row-wise rather than per-tensor: one outlier token or output channel then
    costs only its own row the precision (measured: the per-tensor block error was 6-9x bf16's)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear, kernel: Kernel):
        super().__init__()
        weight, scale = quantize(linear.weight)
        # [out, in] row-major transposed: the column-major [in, out] operand _scaled_mm wants; scales [1, out].
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", scale.t().contiguous())
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize(rows)
        out = self.kernel(q, self.weight_fp8.t(), scale, self.weight_scale, x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def convert_linears(module: nn.Module, kernel: Kernel) -> int:
    """Replace every ``nn.Linear`` under ``module`` whose sizes FP8 GEMMs accept (multiples of 16); returns how
    many were replaced."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
            setattr(module, name, Fp8Linear(child, kernel))
            replaced += 1
        else:
            replaced += convert_linears(child, kernel)
    return replaced


@dataclass(frozen=True)
class GateResult:
    passed: bool
    fp8_error: float
    """Relative L2 error of the FP8 block's visual output against the fp32 block."""
    reference_error: float
    """The same for the block in the model dtype."""
    limit: float

    def to_dict(self) -> dict:
        return asdict(self)


def numeric_gate(block, kernel: Kernel, device, *, spec: ModelSpec, multiple: float = ERROR_MULTIPLE) -> GateResult:
    """Run ``block`` (a copy of it, with the stock attention processor) in fp32, in its dtype and with FP8 linears
    on the same seeded inputs; pass iff the FP8 error is within ``multiple`` x the model-dtype error. The inputs,
    the stock processor and the visual output are the family's (``spec.block_code``)."""
    code = spec.block_code()
    dtype = next(p.dtype for p in block.parameters() if p.is_floating_point())
    inputs = code.gate_inputs(block, device)
    outputs = {}
    for name, run_dtype, fp8 in (("fp32", torch.float32, False), ("model", dtype, False), ("fp8", dtype, True)):
        twin = copy.deepcopy(block).to(device=device, dtype=run_dtype)
        twin.attn1.processor = code.stock_processor()
        if fp8:
            convert_linears(twin, kernel)
        with torch.no_grad():
            output = twin(**{k: _cast(v, run_dtype) for k, v in inputs.items()})
        outputs[name] = code.visual_output(output).float()
    fp8_error = _relative_error(outputs["fp8"], outputs["fp32"])
    reference_error = _relative_error(outputs["model"], outputs["fp32"])
    limit = multiple * reference_error
    return GateResult(fp8_error <= limit, fp8_error, reference_error, limit)


def transformer_blocks(transformer, spec: ModelSpec) -> nn.ModuleList:
    """The blocks whose linears become FP8 (where the family's ``ParallelPlan`` says); ConfigError when
    ``transformer`` is not the family's transformer."""
    blocks = getattr(transformer, spec.parallel_plan.blocks, None)
    if blocks is None:
        raise ConfigError(f"parallel.fp8 (--fp8): {type(transformer).__name__} is not a {spec.title} transformer")
    return blocks


def _cast(value, dtype: torch.dtype):
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm().clamp(min=1e-30))


def fp8_supported(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def enable_fp8(transformer, device, *, spec: ModelSpec, context=None, kernel: Kernel | None = None) -> dict:
    """Convert the blocks' linears to FP8 if the device has FP8 tensor cores (or ``kernel`` is given) and the
    gate passes on every rank; returns the facts for the sidecar and the log."""
    blocks = transformer_blocks(transformer, spec)
    if kernel is None:
        if not fp8_supported(device):
            log.info("fp8 requested, but %s has no FP8 tensor cores (Hopper or newer): staying in bf16", device)
            return {"used": False, "reason": "no FP8 tensor cores"}
        kernel = scaled_mm_kernel
    result = numeric_gate(blocks[0], kernel, device, spec=spec)
    passed = context.all_true(result.passed) if context is not None else result.passed
    facts = {"used": passed, "gate": result.to_dict()}
    if not passed:
        log.warning(
            "fp8 gate failed (FP8 error %.3g > %.3g = %.1f x the model dtype's %.3g): staying in bf16",
            result.fp8_error,
            result.limit,
            ERROR_MULTIPLE,
            result.reference_error,
        )
        return {**facts, "reason": "numeric gate failed"}
    replaced = sum(convert_linears(block, kernel) for block in blocks)
    log.info("fp8 linear layers on (%d replaced): gate error %.3g <= %.3g", replaced, result.fp8_error, result.limit)
    return {**facts, "linear_layers": replaced}
