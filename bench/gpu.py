"""GPU benchmark for a lent machine: full-size Mochi with random weights. Downloads nothing.

    python bench/gpu.py                       # full-size, writes bench/results/gpu-<device>.json
    python bench/gpu.py --tiny --out /tmp/x   # CPU smoke test with small shapes (what the tests run)

Sections run cheapest-first and the results file is rewritten after each one, so a run cut short by the
device lease still leaves every finished figure behind. Figures are medians of timed repeats after warm-up.

FLOPs follow shared/reference/mochi.md: per DiT forward, 2 x 5.4e9 x N for the visual stream's per-token linear
layers plus 4 x 48 x N^2 x 3072 for joint attention (N visual tokens). MFU is quoted against the GPU's dense bf16
datasheet peak and against a matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40": 181.0}
VISUAL_LINEAR_PARAMS = 5.4e9
REAL_LAYERS, REAL_WIDTH = 48, 3072


def dit_flops(
    visual_tokens: int, layers: int = REAL_LAYERS, width: int = REAL_WIDTH, linear_params: float = VISUAL_LINEAR_PARAMS
) -> float:
    return 2 * linear_params * visual_tokens + 4 * layers * visual_tokens**2 * width


def visual_tokens(frames: int, height: int, width: int) -> int:
    return ((frames - 1) // 6 + 1) * (height // 16) * (width // 16)


class Timer:
    """Wall time of a GPU region, synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn, *, warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return times


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random(factory, device: torch.device, dtype: torch.dtype):
    """Build a module directly on the device in its final dtype (no fp32 host copy of 10 B parameters)."""
    with torch.device(device), default_dtype(dtype), torch.no_grad():
        module = factory()
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def sdpa_kernels(device: torch.device) -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return {"sdpa-math": SDPBackend.MATH}
    kernels = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        kernels["sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION
    return kernels


class KernelPinnedProcessor:
    """The stock diffusers Mochi attention processor with SDPA pinned to one backend. Pinned per block rather
    than globally: the caption attention pool in the time embedding uses a masked SDPA that flash and cuDNN
    reject, and it must not decide which kernel the joint attention is measured with."""

    def __init__(self, inner, backend):
        self.inner = inner
        self.backend = backend

    def __call__(self, *args, **kwargs):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([self.backend]):
            return self.inner(*args, **kwargs)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.timer = Timer(self.device)
        self.started = time.perf_counter()
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu-{platform.machine()}"
        self.device_name = name
        short = next((k for k in DATASHEET_BF16_TFLOPS if k in name), None)
        self.results: dict = {
            "device": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "tiny": args.tiny,
            "datasheet_bf16_tflops": DATASHEET_BF16_TFLOPS.get(short) if short else None,
            "sections": {},
            "errors": {},
        }
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        self.out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-{slug}.json"
        if args.tiny:
            self.shape = dict(
                height=64,
                width=64,
                frames=[13, 19],
                layers=2,
                heads=4,
                head_dim=16,
                text_dim=32,
                t5_layers=2,
                t5_dim=32,
            )
        else:
            self.shape = dict(
                height=480,
                width=848,
                frames=[49, 163],
                layers=48,
                heads=24,
                head_dim=128,
                text_dim=4096,
                t5_layers=24,
                t5_dim=4096,
            )

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def section(self, name: str, fn) -> None:
        if self.args.only and name not in self.args.only:
            return
        if self.left_s() < 20:
            self.results["errors"][name] = "skipped: time budget spent"
            self.save()
            return
        print(f"== {name} ({self.left_s():.0f} s left)", flush=True)
        try:
            self.results["sections"][name] = fn()
        except Exception as e:  # one failed section must not cost the others' figures
            traceback.print_exc()
            self.results["errors"][name] = f"{type(e).__name__}: {e}"
        finally:
            reset_peak(self.device)
            self.save()
        print(json.dumps(self.results["sections"].get(name), indent=1, default=str)[:3000], flush=True)

    # -- sections ----------------------------------------------------------------------------------------------------
    def matmul_peak(self) -> dict:
        n = 8192 if self.device.type == "cuda" else 512
        a = torch.randn(n, n, device=self.device, dtype=self.dtype)
        b = torch.randn(n, n, device=self.device, dtype=self.dtype)
        times = self.timer.measure(lambda: a @ b, warmup=3, repeats=10)
        tflops = 2 * n**3 / statistics.median(times) / 1e12
        self.results["measured_matmul_tflops"] = round(tflops, 1)
        return {"n": n, "median_s": statistics.median(times), "tflops": round(tflops, 1)}

    def transformer(self):
        from diffusers import MochiTransformer3DModel

        s = self.shape
        return build_random(
            lambda: MochiTransformer3DModel(
                num_layers=s["layers"],
                num_attention_heads=s["heads"],
                attention_head_dim=s["head_dim"],
                text_embed_dim=s["text_dim"],
                pooled_projection_dim=s["heads"] * s["head_dim"] // 2,
            ),
            self.device,
            self.dtype,
        )

    def dit_inputs(self, frames: int, text_tokens: int = 256, valid_text: int = 64):
        s = self.shape
        latent_t = (frames - 1) // 6 + 1
        gen = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(1, 12, latent_t, s["height"] // 8, s["width"] // 8, generator=gen).to(
            self.device, self.dtype
        )
        text = torch.randn(1, text_tokens, s["text_dim"], generator=gen).to(self.device, self.dtype)
        mask = torch.zeros(1, text_tokens, dtype=torch.bool, device=self.device)
        mask[:, :valid_text] = True  # a typical prompt: Mochi drops the padding tokens from attention
        timestep = torch.tensor([500.0], device=self.device)
        return dict(
            hidden_states=hidden,
            encoder_hidden_states=text,
            timestep=timestep,
            encoder_attention_mask=mask,
            return_dict=False,
        )

    def transformer_forward(self) -> dict:
        model = self.transformer()
        stock_processors = [block.attn1.processor for block in model.transformer_blocks]
        params = sum(p.numel() for p in model.parameters())
        out: dict = {"parameters": params, "runs": []}
        peak = self.results.get("datasheet_bf16_tflops")
        measured = self.results.get("measured_matmul_tflops")
        kernels = dict(sdpa_kernels(self.device))
        for frames in self.shape["frames"]:
            inputs = self.dit_inputs(frames)
            n = visual_tokens(frames, self.shape["height"], self.shape["width"])
            flops = (
                dit_flops(n)
                if not self.args.tiny
                else dit_flops(n, self.shape["layers"], self.shape["heads"] * self.shape["head_dim"], params)
            )
            for kernel_name, backend in kernels.items():
                if self.left_s() < 60:
                    out["runs"].append({"frames": frames, "kernel": kernel_name, "skipped": "time budget"})
                    continue
                reset_peak(self.device)
                for block, stock in zip(model.transformer_blocks, stock_processors, strict=True):
                    block.attn1.processor = KernelPinnedProcessor(stock, backend)
                try:
                    with torch.no_grad():
                        times = self.timer.measure(
                            lambda inputs=inputs: model(**inputs), warmup=1, repeats=self.args.repeats
                        )
                except Exception as e:  # a kernel that does not support this shape or GPU
                    out["runs"].append(
                        {"frames": frames, "kernel": kernel_name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    )
                    continue
                median = statistics.median(times)
                run = {
                    "frames": frames,
                    "visual_tokens": n,
                    "kernel": kernel_name,
                    "seconds_per_forward": round(median, 4),
                    "all_seconds": [round(t, 4) for t in times],
                    "pflop_per_forward": round(flops / 1e15, 4),
                    "achieved_tflops": round(flops / median / 1e12, 1),
                    "peak_memory_gib": peak_memory_gib(self.device),
                }
                if peak:
                    run["mfu_vs_datasheet"] = round(flops / median / 1e12 / peak, 4)
                if measured:
                    run["mfu_vs_measured_matmul"] = round(flops / median / 1e12 / measured, 4)
                out["runs"].append(run)
                print(f"   {frames} frames {kernel_name}: {median:.3f} s/forward", flush=True)
        best = {}
        for run in out["runs"]:
            if "seconds_per_forward" in run and (
                run["frames"] not in best or run["seconds_per_forward"] < best[run["frames"]]["seconds_per_forward"]
            ):
                best[run["frames"]] = run
        out["best"] = {
            str(f): {"kernel": r["kernel"], "seconds_per_forward": r["seconds_per_forward"]} for f, r in best.items()
        }
        self.results["best_forward"] = out["best"]
        if not self.args.tiny and self.device.type == "cuda" and best and self.left_s() > 90:
            out["profile"] = self.profile_forward(model, max(best), best[max(best)]["kernel"], kernels)
        return out

    def profile_forward(self, model, frames: int, kernel_name: str, kernels: dict) -> dict:
        """Where one forward's time goes: the top CUDA ops, grouped."""
        from torch.profiler import ProfilerActivity, profile

        inputs = self.dit_inputs(frames)
        for block in model.transformer_blocks:
            block.attn1.processor = KernelPinnedProcessor(block.attn1.processor.inner, kernels[kernel_name])
        with torch.no_grad():
            model(**inputs)
            self.timer.sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(**inputs)
                self.timer.sync()
        rows = []
        for evt in prof.key_averages():
            cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            rows.append((evt.key, cuda_us, evt.count))
        rows.sort(key=lambda r: -r[1])
        kernels_only = [r for r in rows if not r[0].startswith("aten::")]
        kernel_total = sum(r[1] for r in kernels_only) or 1.0
        return {
            "frames": frames,
            "kernel": kernel_name,
            "gpu_kernel_ms_total": round(kernel_total / 1e3, 1),
            "top_kernels": [
                {"name": k[:120], "ms": round(us / 1e3, 1), "share": round(us / kernel_total, 3), "calls": c}
                for k, us, c in kernels_only[:15]
            ],
        }

    def native_attention_check(self) -> dict:
        """The project's sequence-parallel attention path at degree 1 against plain SDPA."""
        import torch.nn.functional as F

        from batchgen.parallel import attention as native

        heads, dim = self.shape["heads"], self.shape["head_dim"]
        seq = 4770 + 64 if not self.args.tiny else 64
        gen = torch.Generator(device="cpu").manual_seed(1)
        q, k, v = (torch.randn(1, heads, seq, dim, generator=gen).to(self.device, self.dtype) for _ in range(3))
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        out: dict = {"shape": [1, heads, seq, dim], "dtype": str(self.dtype), "kernels": {}}
        for kernel in native.list_kernels(self.device, self.dtype, dim):
            try:
                result, lse = native.attention_with_lse(q, k, v, kernel=kernel)
                sdpa = F.scaled_dot_product_attention(q, k, v)
                out["kernels"][kernel] = {
                    "max_abs_diff_vs_sdpa_same_dtype": float((result.float() - sdpa.float()).abs().max()),
                    "max_abs_diff_vs_fp32_reference": float((result.float() - reference).abs().max()),
                    "sdpa_same_dtype_vs_fp32_reference": float((sdpa.float() - reference).abs().max()),
                    "lse_finite": bool(torch.isfinite(lse).all()),
                }
            except Exception as e:
                out["kernels"][kernel] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out.update(self.native_forward_check())
        return out

    def native_forward_check(self) -> dict:
        """Whole transformer forwards with the native sequence-parallel processor installed at degree 1 (every
        local kernel it can use) against the stock diffusers processor."""
        from diffusers import MochiTransformer3DModel

        from batchgen.models.mochi.attention import USPMochiAttnProcessor
        from batchgen.parallel import attention as native
        from batchgen.parallel.usp import Axis

        s = self.shape
        layers = 4 if not self.args.tiny else s["layers"]
        model = build_random(
            lambda: MochiTransformer3DModel(
                num_layers=layers,
                num_attention_heads=s["heads"],
                attention_head_dim=s["head_dim"],
                text_embed_dim=s["text_dim"],
                pooled_projection_dim=s["heads"] * s["head_dim"] // 2,
            ),
            self.device,
            self.dtype,
        )
        inputs = self.dit_inputs(self.shape["frames"][0])
        single = Axis(group=None, size=1, rank=0, ranks=(0,))
        stock_processors = [block.attn1.processor for block in model.transformer_blocks]
        out: dict = {"forward_layers": layers, "frames": self.shape["frames"][0], "forward_vs_stock": {}}
        with torch.no_grad():
            stock = model(**inputs)[0].float()
            out["forward_output_abs_max"] = float(stock.abs().max())
            for kernel in native.list_kernels(self.device, self.dtype, s["head_dim"]):
                for block in model.transformer_blocks:
                    block.attn1.processor = USPMochiAttnProcessor(single, single, kernel=kernel)
                try:
                    result = model(**inputs)[0].float()
                    out["forward_vs_stock"][kernel] = {"max_abs_diff": float((result - stock).abs().max())}
                except Exception as e:
                    out["forward_vs_stock"][kernel] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                finally:
                    for block, processor in zip(model.transformer_blocks, stock_processors, strict=True):
                        block.attn1.processor = processor
        return out

    def longest_tokens(self) -> int:
        return visual_tokens(max(self.shape["frames"]), self.shape["height"], self.shape["width"])

    def attention_batching(self) -> dict:
        """The CFG batch's joint attention for one block at the longest shape: today's two per-sample calls (each
        over its visual tokens and its own valid text tokens, as diffusers' processor runs them) against one
        batched call with a key-padding mask; both against an fp32 reference, on the valid query rows."""
        import torch.nn.functional as F

        from batchgen.models.common.staged import fastest_attention as _fastest_attention

        heads, dim, n, text = self.shape["heads"], self.shape["head_dim"], self.longest_tokens(), 256
        valid = (0, 64)  # [uncond, cond]: an empty negative prompt has no valid text token
        gen = torch.Generator(device="cpu").manual_seed(2)
        q, k, v = (torch.randn(2, heads, n + text, dim, generator=gen).to(self.device, self.dtype) for _ in range(3))
        key_mask = torch.zeros(2, 1, 1, n + text, dtype=torch.bool, device=self.device)
        for b, length in enumerate(valid):
            key_mask[b, ..., : n + length] = True

        def two_calls(dtype=self.dtype):
            return [
                F.scaled_dot_product_attention(*(t[b : b + 1, :, : n + valid[b]].to(dtype) for t in (q, k, v)))
                for b in range(2)
            ]

        def one_call():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)

        with torch.no_grad(), _fastest_attention(self.device):
            reference = two_calls(torch.float32)
            out: dict = {"visual_tokens": n, "text_tokens": text, "valid_text": list(valid), "heads": heads}
            for name, fn in (("two_calls", two_calls), ("one_batched_call", one_call)):
                times = self.timer.measure(fn, warmup=1, repeats=self.args.repeats)
                result = fn()
                rows = result if isinstance(result, list) else [result[b : b + 1, :, : n + valid[b]] for b in range(2)]
                error = max(float((r.float() - ref).abs().max()) for r, ref in zip(rows, reference, strict=True))
                out[name] = {"seconds": round(statistics.median(times), 5), "max_abs_diff_vs_fp32": error}
        out["speedup_one_call"] = round(out["two_calls"]["seconds"] / out["one_batched_call"]["seconds"], 3)
        return out

    def fp8_linear(self) -> dict:
        """bf16 against FP8 (torch._scaled_mm, row-wise scales) for the blocks' big visual GEMMs at the longest
        shape, each against fp32; then the numeric gate (batchgen.models.common.fp8) on one block of the real width.
        Without FP8 tensor cores the emulated kernel runs (errors only; its seconds mean nothing)."""
        from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock

        from batchgen.models import MOCHI
        from batchgen.models.common import fp8

        native = fp8.fp8_supported(self.device)
        kernel = fp8.scaled_mm_kernel if native else fp8.emulated_kernel
        width = self.shape["heads"] * self.shape["head_dim"]
        inner = (4 * width * 2) // 3
        tokens = self.longest_tokens()
        gen = torch.Generator(device="cpu").manual_seed(3)
        out: dict = {"kernel": "torch._scaled_mm" if native else "emulated (no FP8 tensor cores)", "gemms": []}
        for k_in, k_out in ((width, 2 * inner), (inner, width), (width, width)):
            out["gemms"].append(self.fp8_gemm(tokens, k_in, k_out, kernel, gen))
        block = build_random(
            lambda: MochiTransformerBlock(
                width, self.shape["heads"], self.shape["head_dim"], pooled_projection_dim=width // 2
            ),
            self.device,
            self.dtype,
        )
        out["gate"] = fp8.numeric_gate(block, kernel, self.device, spec=MOCHI).to_dict()
        out["gate"]["multiple"] = fp8.ERROR_MULTIPLE
        return out

    def fp8_gemm(self, tokens: int, k_in: int, k_out: int, kernel, gen: torch.Generator) -> dict:
        from batchgen.models.common import fp8

        x = torch.randn(tokens, k_in, generator=gen).to(self.device, self.dtype)
        linear = torch.nn.Linear(k_in, k_out, bias=False).to(self.device, self.dtype)
        row: dict = {"tokens": tokens, "in": k_in, "out": k_out}
        with torch.no_grad():
            linear.weight.copy_(torch.randn(k_out, k_in, generator=gen) / k_in**0.5)
            reference = x.float() @ linear.weight.float().t()
            for name, layer in (("bf16", linear), ("fp8", fp8.Fp8Linear(linear, kernel))):
                times = self.timer.measure(lambda layer=layer: layer(x), warmup=1, repeats=self.args.repeats)
                error = float((layer(x).float() - reference).norm() / reference.norm())
                row[name] = {"seconds": round(statistics.median(times), 5), "relative_error_vs_fp32": error}
        row["speedup_fp8"] = round(row["bf16"]["seconds"] / row["fp8"]["seconds"], 3)
        return row

    def compiled_forward(self) -> dict:
        """8- and 48-block forwards at the longest shape, eager against ``--compile`` (batchgen.models.common.compile):
        the first compiled call (compilation included), steady-state seconds, and the difference to eager."""
        frames = max(self.shape["frames"])
        inputs = self.dit_inputs(frames)
        runs = [
            self.eager_vs_compiled(layers, inputs) for layers in ([self.shape["layers"]] if self.args.tiny else [8, 48])
        ]
        return {"frames": frames, "runs": runs}

    def eager_vs_compiled(self, layers: int, inputs: dict) -> dict:
        from diffusers import MochiTransformer3DModel

        from batchgen.models import MOCHI
        from batchgen.models.common.compile import compile_blocks, graph_count

        s = self.shape
        model = build_random(
            lambda: MochiTransformer3DModel(
                num_layers=layers,
                num_attention_heads=s["heads"],
                attention_head_dim=s["head_dim"],
                text_embed_dim=s["text_dim"],
                pooled_projection_dim=s["heads"] * s["head_dim"] // 2,
            ),
            self.device,
            self.dtype,
        )

        def forward():
            return model(**inputs)[0]

        with torch.no_grad(), self.fastest():
            eager_times = self.timer.measure(forward, warmup=1, repeats=self.args.repeats)
            eager = forward().float()
            compile_blocks(model, spec=MOCHI)
            graphs = graph_count()
            first = self.timer.measure(forward, warmup=0, repeats=1)[0]
            compiled_times = self.timer.measure(forward, warmup=0, repeats=self.args.repeats)
            compiled = forward().float()
        eager_s, compiled_s = statistics.median(eager_times), statistics.median(compiled_times)
        return {
            "layers": layers,
            "eager_s": round(eager_s, 4),
            "compiled_s": round(compiled_s, 4),
            "first_compiled_call_s": round(first, 2),
            "new_graphs": graph_count() - graphs,
            "speedup": round(eager_s / compiled_s, 3),
            "max_abs_diff_vs_eager": float((compiled - eager).abs().max()),
            "eager_abs_max": float(eager.abs().max()),
        }

    def fastest(self):
        from batchgen.models.common.staged import fastest_attention as _fastest_attention

        return _fastest_attention(self.device)

    def vae_decode(self) -> dict:
        from diffusers import AutoencoderKLMochi

        if self.args.tiny:
            vae = build_random(
                lambda: AutoencoderKLMochi(
                    encoder_block_out_channels=(32, 32, 32, 32),
                    decoder_block_out_channels=(32, 32, 32, 32),
                    layers_per_block=(1, 1, 1, 1, 1),
                ),
                self.device,
                self.dtype,
            )
        else:
            vae = build_random(AutoencoderKLMochi, self.device, self.dtype)
        from batchgen.models.common.vae import enable_causal_framewise_decoding

        enable_causal_framewise_decoding(vae, tiling=True)
        frames = max(self.shape["frames"])
        latent_t = (frames - 1) // 6 + 1
        z = torch.randn(1, 12, latent_t, self.shape["height"] // 8, self.shape["width"] // 8).to(
            self.device, self.dtype
        )
        reset_peak(self.device)
        decoded = {}

        def decode():
            with torch.no_grad():
                decoded["video"] = vae.decode(z, return_dict=False)[0]

        times = self.timer.measure(decode, warmup=0, repeats=1 if not self.args.tiny else 2)
        video = decoded.pop("video")
        result = {
            "frames_requested": frames,
            "latent_frames": latent_t,
            "frames_out": int(video.shape[2]),
            "frames_expected": 6 * latent_t - 5,
            "resolution": [int(video.shape[3]), int(video.shape[4])],
            "seconds": round(statistics.median(times), 2),
            "peak_memory_gib": peak_memory_gib(self.device),
            "vae_parameters": sum(p.numel() for p in vae.parameters()),
        }
        return result

    def t5_encoder(self) -> dict:
        from transformers import T5Config, T5EncoderModel

        s = self.shape
        config = T5Config(
            vocab_size=32128,
            d_model=s["t5_dim"],
            d_kv=64 if not self.args.tiny else 8,
            d_ff=10240 if not self.args.tiny else 64,
            num_layers=s["t5_layers"],
            num_heads=64 if not self.args.tiny else 4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
        model = build_random(lambda: T5EncoderModel(config), self.device, self.dtype)
        out: dict = {"parameters": sum(p.numel() for p in model.parameters()), "batches": []}
        for batch in (1, 8):
            ids = torch.randint(0, 32128, (batch, 256), device=self.device)
            mask = torch.ones_like(ids)

            def run(ids=ids, mask=mask):
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)

            times = self.timer.measure(run, warmup=1, repeats=self.args.repeats)
            median = statistics.median(times)
            out["batches"].append(
                {
                    "batch": batch,
                    "tokens": 256,
                    "seconds_per_batch": round(median, 4),
                    "seconds_per_prompt": round(median / batch, 4),
                }
            )
        return out

    def pipeline(self, offload: str = "model") -> dict:
        """The whole single-GPU generator at the longest frame count with ``offload`` and a few steps."""
        from batchgen.core.config import ParallelConfig
        from batchgen.core.item import Item
        from batchgen.models.mochi.generator import MochiGenerator
        from batchgen.models.mochi.tiny import build_random_components

        frames = max(self.shape["frames"])
        steps = self.args.pipeline_steps
        components = build_random_components(full_size=not self.args.tiny, dtype=self.dtype, device=self.device)
        generator = MochiGenerator.from_components(
            components, parallel=ParallelConfig(offload=offload), device=str(self.device)
        )
        item = Item(
            id="bench",
            prompt="a red fox running through fresh snow at dawn",
            negative_prompt="",
            seed=0,
            num_frames=frames,
            height=self.shape["height"],
            width=self.shape["width"],
            num_inference_steps=steps,
            guidance_scale=4.5,
            row=0,
        )
        reset_peak(self.device)
        start = time.perf_counter()
        generator.prepare([item])
        video = generator.generate(item)
        total = time.perf_counter() - start
        result = {
            "frames": frames,
            "steps": steps,
            "offload": offload,
            "offloaded": generator.offload,
            "offload_reason": generator.offload_reason,
            "frames_out": int(video.frames.shape[0]),
            "seconds_total": round(total, 2),
            "timings": {k: round(v, 3) for k, v in video.timings.items()},
            # The loop alone: "denoise" also holds the one-off host-to-GPU move of the offloaded DiT.
            "seconds_per_denoising_step": round(video.timings.get("denoise_loop", float("nan")) / steps, 3),
            "offload_transfer_s": round(video.timings.get("denoise", 0) - video.timings.get("denoise_loop", 0), 2),
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        generator.close()
        return result

    def projection(self) -> dict:
        """Projected time per video from the measured pieces (64 steps, CFG = 2 forwards per step)."""
        sections = self.results["sections"]
        best = self.results.get("best_forward", {})
        pipe = sections.get("pipeline", {})
        vae = sections.get("vae_decode", {})
        t5 = sections.get("t5_encoder", {})
        t5_prompt = next((b["seconds_per_prompt"] for b in t5.get("batches", []) if b["batch"] == 1), None)
        out = {}
        for frames, fwd in best.items():
            seconds = 64 * 2 * fwd["seconds_per_forward"]
            decode = vae.get("seconds", 0) * (int(frames) / vae.get("frames_requested", int(frames)) if vae else 0)
            out[f"{frames}_frames"] = {
                "denoise_s_from_forward": round(seconds, 1),
                "vae_decode_s": round(decode, 1),
                "t5_s": t5_prompt,
                "total_s": round(seconds + decode + 2 * (t5_prompt or 0), 1),
            }
        if pipe.get("seconds_per_denoising_step") and str(pipe.get("frames")) in {str(k) for k in best}:
            out[f"{pipe['frames']}_frames"]["total_s_from_pipeline_step"] = round(
                64 * pipe["seconds_per_denoising_step"] + pipe["timings"].get("decode", 0), 1
            )
        out["published_anchors"] = {
            "mochi-xdit L40 49 frames 64 steps 1 GPU": 394,
            "ParaAttention A100 ~84 frames 28 steps 1 GPU": 196.5,
            "TeaCache A800 163 frames 64 steps (offload+tiling)": 1800,
        }
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU (smoke test)")
    parser.add_argument("--out", help="results file (default bench/results/gpu-<device>.json)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float(os.environ.get("BENCH_BUDGET_S", 480)),
        help="stop starting sections after this",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline-steps", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these sections")
    parser.add_argument(
        "--resume-from",
        help="start from an earlier results file of the same device (its sections are kept unless rerun)",
    )
    args = parser.parse_args(argv)
    bench = Bench(args)
    if args.resume_from:
        earlier = json.loads(Path(args.resume_from).read_text())
        if earlier.get("device") != bench.device_name:
            parser.error(f"{args.resume_from} was measured on {earlier.get('device')}, not {bench.device_name}")
        for key in ("sections", "best_forward", "measured_matmul_tflops"):
            if key in earlier:
                bench.results[key] = earlier[key]
        bench.results["resumed_from"] = {"file": args.resume_from, "elapsed_s": earlier.get("elapsed_s")}
    print(f"device: {bench.device_name}; results -> {bench.out}", flush=True)
    bench.section("matmul_peak", bench.matmul_peak)
    bench.section("native_attention", bench.native_attention_check)
    bench.section("attention_batching", bench.attention_batching)
    bench.section("fp8_linear", bench.fp8_linear)
    bench.section("transformer_forward", bench.transformer_forward)
    bench.section("compiled_forward", bench.compiled_forward)
    bench.section("t5_encoder", bench.t5_encoder)
    bench.section("vae_decode", bench.vae_decode)
    bench.section("pipeline", bench.pipeline)
    bench.section("pipeline_auto", lambda: bench.pipeline("auto"))
    bench.section("projection", bench.projection)
    print(f"wrote {bench.out}")
    return 0 if not bench.results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
