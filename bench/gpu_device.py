"""The Python core of ``bench/gpu_device.sh``: one call on a lent H100 or H200 (about 8 minutes), one results file.

    bash bench/gpu_device.sh            # there: installs the carried wheels, then runs this
    python bench/gpu_device.py --tiny --out /tmp/x.json   # CPU smoke test with small shapes (what the tests run)

Sections, each checked against fp32 or eager and timed as medians after warm-up (``bench/gpu.py``'s ``Bench``:
the file is rewritten after every section, so a run cut short keeps what finished):

- ``attention_paths``: every candidate of ``[parallel] attention`` (the joint masked call, per-prompt unmasked
  calls, under every kernel that passes the probe) for one block's attention of the CFG pair (an empty negative
  prompt and a 64-token prompt) at 49 and 163 frames, against the fp32 masked math reference; and what 'auto'
  picks there (``batchgen.parallel.choice``, CUDA events);
- ``attention_forward``: 48-block forwards of the CFG pair with ``attention`` joint, per-prompt and auto (the
  first auto forward measures; its cost against a 64-step item of the faster path);
- ``fp8_linear``: bf16 against FP8 GEMMs and the numeric gate (``Bench.fp8_linear``);
- ``wan_forward``: the 14B Wan DiT at 81 frames, 480x832 (``bench/wan_gpu.py``), per SDPA kernel;
- ``pipeline_auto``: the whole Mochi generator for 3 steps at 163 frames with ``offload=auto``;
- ``compiled_forward``: a 48-block forward at 49 frames, eager against ``--compile``.

Writes ``bench/results/gpu-device-<device>.json`` (``--out`` elsewhere), and a copy into ``$OUT`` when set (the
device tool brings back what is there).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import wan_gpu  # noqa: E402
from gpu import Bench, reset_peak, visual_tokens  # noqa: E402

from batchgen.parallel.choice import (  # noqa: E402
    WARMUP_CALLS,
    AttentionChooser,
    AttentionPath,
    PromptKeys,
    candidates,
    cuda_event_timer,
    masked_attention,
    timed_candidates,
)

SECTIONS = (
    "matmul_peak",
    "attention_paths",
    "attention_forward",
    "fp8_linear",
    "wan_forward",
    "pipeline_auto",
    "compiled_forward",
)
CFG_VALID_TEXT = (0, 64)
"""Valid text tokens of the CFG pair [negative, prompt]: an empty negative prompt and a typical prompt."""
ITEM_STEPS = 64
"""Mochi's default steps: the measuring cost is quoted against an item of this many CFG steps."""


def wall_timer(warmup: int = WARMUP_CALLS, calls: int = 3):
    """The chooser's timer where CUDA events do not exist (the CPU smoke test): median wall seconds."""

    def timer(name, fn) -> float:
        for _ in range(warmup):
            fn()
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    return timer


def environment() -> dict:
    """What the figures depend on: GPU, driver, torch, CUDA, cuDNN, diffusers, flash-attn."""
    import diffusers

    facts = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__,
    }
    try:
        import flash_attn

        facts["flash_attn"] = flash_attn.__version__
    except Exception:  # absent, or a build that does not load
        facts["flash_attn"] = None
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
        facts["nvidia_smi"] = smi.stdout.strip()
    return facts


class DeviceBench(Bench):
    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        slug = "".join(c if c.isalnum() else "-" for c in self.device_name.lower()).strip("-")
        self.out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-device-{slug}.json"
        self.results["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        self.results["environment"] = environment()
        self.chooser_timer = cuda_event_timer() if self.device.type == "cuda" else wall_timer()

    def save(self) -> None:
        super().save()
        copy_dir = os.environ.get("OUT")
        if copy_dir:
            shutil.copyfile(self.out, Path(copy_dir) / self.out.name)

    # -- attention ---------------------------------------------------------------------------------------------------
    def block_attention_inputs(self, frames: int):
        """One block's joint attention inputs for the CFG pair: q, k, v [2, H, N + L, D] and the text mask [2, L]
        with the prompts' valid tokens first (as ``gather_valid_text`` leaves them)."""
        heads, dim, n = self.shape["heads"], self.shape["head_dim"], self.tokens(frames)
        text = max(CFG_VALID_TEXT)
        gen = torch.Generator(device="cpu").manual_seed(frames)
        q, k, v = (torch.randn(2, heads, n + text, dim, generator=gen).to(self.device, self.dtype) for _ in range(3))
        text_mask = torch.arange(text).unsqueeze(0) < torch.tensor(CFG_VALID_TEXT).unsqueeze(1)
        return q, k, v, text_mask.to(self.device), n

    def tokens(self, frames: int) -> int:
        return visual_tokens(frames, self.shape["height"], self.shape["width"])

    def attention_paths(self) -> dict:
        out: dict = {"valid_text": list(CFG_VALID_TEXT), "dtype": str(self.dtype), "runs": [], "auto": {}}
        for frames in self.shape["frames"]:
            runs, out["auto"][str(frames)] = self.paths_at(frames)
            out["runs"] += runs
            reset_peak(self.device)
        return out

    @torch.no_grad()
    def paths_at(self, frames: int) -> tuple[list[dict], dict]:
        """Every candidate at one frame count against the fp32 masked math reference; then the 'auto' decision."""
        q, k, v, text_mask, n = self.block_attention_inputs(frames)
        key_mask = torch.cat([text_mask.new_ones(2, n), text_mask], dim=1)
        rows = PromptKeys().rows(text_mask, n)
        exact = AttentionPath("joint", "math")
        reference = masked_attention(q.float(), k.float(), v.float(), key_mask, exact, rows)[0]
        timed = {c.name for c in timed_candidates(self.device, self.dtype, q.shape[-1])}
        runs = []
        for candidate in candidates(self.device, self.dtype, q.shape[-1]):

            def call(candidate=candidate):
                return masked_attention(q, k, v, key_mask, candidate, rows)

            runs.append(self.attention_run(frames, n, candidate, call, reference, candidate.name in timed))
        chooser = AttentionChooser("auto", timer=self.chooser_timer)
        chooser.attend(q, k, v, text_mask, leading=n)
        return runs, chooser.facts()

    def attention_run(self, frames: int, n: int, candidate: AttentionPath, call, reference, timed: bool) -> dict:
        run = {
            "frames": frames,
            "visual_tokens": n,
            "candidate": candidate.name,
            "masked": candidate.path == "joint",
            "max_abs_diff_vs_fp32": float((call()[0].float() - reference).abs().max()),
        }
        if timed:  # the math fallback is checked, not timed (auto never times it where a fused kernel serves)
            run["seconds"] = round(self.chooser_timer(candidate.name, call), 6)
        print(f"   {frames} frames {candidate.name}: {run}", flush=True)
        return run

    def cfg_inputs(self, frames: int) -> dict:
        """The generator's CFG batch for one forward: [negative, prompt] latents and text, valid tokens first."""
        from batchgen.models.mochi.joint import gather_valid_text

        inputs = self.dit_inputs(frames, text_tokens=256, valid_text=max(CFG_VALID_TEXT))
        text = inputs["encoder_hidden_states"].expand(2, -1, -1)
        mask = torch.arange(256).unsqueeze(0) < torch.tensor(CFG_VALID_TEXT).unsqueeze(1)
        embeds, mask = gather_valid_text(text.cpu(), mask)
        return {
            **inputs,
            "hidden_states": inputs["hidden_states"].expand(2, -1, -1, -1, -1),
            "encoder_hidden_states": embeds.to(self.device),
            "encoder_attention_mask": mask.to(self.device),
            "timestep": inputs["timestep"].expand(2),
        }

    def attention_forward(self) -> dict:
        from batchgen.parallel.apply import attention_facts, parallelize_transformer, unparallelize_transformer
        from batchgen.worker.context import SingleProcess

        model = self.transformer()
        out: dict = {"layers": self.shape["layers"], "runs": []}
        for frames in self.shape["frames"]:
            if self.left_s() < 90:
                out["runs"].append({"frames": frames, "skipped": "time budget"})
                continue
            inputs = self.cfg_inputs(frames)
            run: dict = {"frames": frames, "visual_tokens": self.tokens(frames), "batch": 2}
            outputs = {}
            with torch.no_grad():
                for setting in ("joint", "per-prompt"):
                    parallelize_transformer(model, SingleProcess(), attention=setting)
                    times = self.timer.measure(
                        lambda inputs=inputs: model(**inputs), warmup=1, repeats=self.args.repeats
                    )
                    outputs[setting] = model(**inputs)[0].float()
                    run[setting] = {"seconds_per_forward": round(statistics.median(times), 4), **attention_facts(model)}
                    unparallelize_transformer(model)
                parallelize_transformer(model, SingleProcess(), attention="auto", timer=self.chooser_timer)
                model(**inputs)  # the first forward of the shape measures
                run["auto"] = attention_facts(model)
                unparallelize_transformer(model)
            fastest = min(run[s]["seconds_per_forward"] for s in ("joint", "per-prompt"))
            run["auto_measure_share_of_item"] = round(run["auto"]["measure_s"] / (ITEM_STEPS * fastest), 5)
            run["max_abs_diff_joint_vs_per_prompt"] = float((outputs["joint"] - outputs["per-prompt"]).abs().max())
            run["output_abs_max"] = float(outputs["joint"].abs().max())
            out["runs"].append(run)
            print(f"   {frames} frames: {run}", flush=True)
            del outputs
        return out

    # -- the rest ----------------------------------------------------------------------------------------------------
    def wan_forward(self) -> dict:
        """bench/wan_gpu.py's 14B DiT at 81 frames and 480x832 (its tiny Wan with --tiny), per SDPA kernel."""
        setup = wan_gpu.TINY if self.args.tiny else {**wan_gpu.FULL, "shapes": wan_gpu.FULL["shapes"][:1]}
        started = time.perf_counter()
        model = wan_gpu.build_transformer(setup["config"], self.device, self.dtype)
        build_s = time.perf_counter() - started
        ctx = {
            "device": self.device, "dtype": self.dtype, "timer": self.timer, "repeats": self.args.repeats,
            # Unrounded where matmul_peak's figure rounds to 0 (a small CPU): the MFU divides by it.
            "matmul_tflops": self.results.get("measured_matmul_tflops")
            or wan_gpu.matmul_tflops(self.timer, self.device, self.dtype),
            "datasheet": self.results.get("datasheet_bf16_tflops"),
        }  # fmt: skip
        height, width = setup["shapes"][0]
        runs = wan_gpu.measure_shape(model, setup, height, width, ctx)
        parameters = sum(p.numel() for p in model.parameters())
        return {"parameters": parameters, "build_seconds": round(build_s, 2), "runs": runs}

    def compiled_forward(self) -> dict:
        """A forward of every block (48 at full size) at the shortest frame count, eager against compiled."""
        frames = min(self.shape["frames"])
        return {"frames": frames, "runs": [self.eager_vs_compiled(self.shape["layers"], self.dit_inputs(frames))]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU (smoke test)")
    parser.add_argument("--out", help="results file (default bench/results/gpu-device-<device>.json)")
    parser.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET_S", 460)),
                        help="start no section after this many seconds")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pipeline-steps", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args(argv)
    bench = DeviceBench(args)
    print(f"device: {bench.device_name}; results -> {bench.out}", flush=True)
    sections = {name: getattr(bench, name, None) for name in SECTIONS}
    sections["pipeline_auto"] = lambda: bench.pipeline("auto")
    for name, fn in sections.items():
        bench.section(name, fn)
    print(f"wrote {bench.out}")
    return 0 if not bench.results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
