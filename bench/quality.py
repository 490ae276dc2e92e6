"""What the first-block cache costs in quality: cached against uncached videos on the same seeds.

    python bench/quality.py --tiny                                   # tiny random model on CPU (the smoke test)
    python bench/quality.py --model-dir models/mochi --threshold 0.05 --seeds 0 1 2 --frames 49

For every seed the same item is generated twice by one generator: with the cache at threshold 0 (exactly the
uncached output, tests/test_speedups.py) and at ``--threshold``. Each decoded frame is compared with PSNR and SSIM
(scikit-image, RGB, data range 255); the denoising loop's seconds and the steps computed / reused come with them.
Writes bench/results/quality-<model>.json. The tiny model's random weights move ~50% per step, so its figures
only show that the comparison runs; quality figures need real weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The tiny model needs a large threshold to reuse any step (see above); real Mochi uses about 0.05-0.1.
TINY_THRESHOLD = 0.6


def frame_scores(reference, frames) -> dict:
    """Per-frame PSNR (dB; None where identical) and SSIM of uint8 RGB frames [F, H, W, 3]."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr, ssim = [], []
    for ref, frame in zip(reference, frames, strict=True):
        with np.errstate(divide="ignore"):  # identical frames: infinite PSNR, reported as None
            value = peak_signal_noise_ratio(ref, frame, data_range=255)
        psnr.append(None if math.isinf(value) else round(float(value), 3))
        ssim.append(round(float(structural_similarity(ref, frame, channel_axis=-1, data_range=255)), 5))
    finite = [p for p in psnr if p is not None]
    return {
        "psnr_db": psnr,
        "ssim": ssim,
        "psnr_mean_db": round(statistics.fmean(finite), 3) if finite else None,
        "psnr_min_db": min(finite) if finite else None,
        "ssim_mean": round(statistics.fmean(ssim), 5),
        "ssim_min": min(ssim),
        "identical_frames": len(psnr) - len(finite),
    }


def compare_seed(generator, item, threshold: float) -> dict:
    (cache,) = generator.caches
    cache.threshold = 0.0
    reference = generator.generate(item)
    cache.threshold = threshold
    cached = generator.generate(item)
    uncached_s, cached_s = reference.timings["denoise_loop"], cached.timings["denoise_loop"]
    return {
        "seed": item.seed,
        **frame_scores(reference.frames, cached.frames),
        "cache": cached.extra["cache"],
        "denoise_loop_s": {"uncached": uncached_s, "cached": cached_s},
        "speedup": round(uncached_s / cached_s, 3) if cached_s else None,
    }


def make_item(seed: int, args, defaults) -> object:
    from batchgen.core.item import Item

    return Item(
        id=f"quality-{seed}",
        prompt=args.prompt,
        negative_prompt="",
        seed=seed,
        num_frames=args.frames or defaults.num_frames,
        height=args.height or defaults.height,
        width=args.width or defaults.width,
        num_inference_steps=args.steps or defaults.num_inference_steps,
        guidance_scale=defaults.guidance_scale,
        row=0,
    )


def run(args) -> dict:
    from batchgen.core.config import GenerationConfig, ParallelConfig, load_config
    from batchgen.models.mochi.generator import MochiGenerator

    model_dir = Path(args.model_dir) if args.model_dir else None
    defaults = GenerationConfig()
    if args.tiny:
        from batchgen.models.common.tiny import TINY_TOML_NAME
        from batchgen.models.mochi.tiny import write_tiny_model

        model_dir = write_tiny_model(Path(tempfile.mkdtemp(prefix="quality-")) / "tiny-mochi", seed=0)
        defaults = load_config(model_dir / TINY_TOML_NAME).generation
    threshold = args.threshold if args.threshold is not None else (TINY_THRESHOLD if args.tiny else 0.05)
    generator = MochiGenerator(model_dir, device=args.device, parallel=ParallelConfig(cache_threshold=threshold))
    try:
        items = [make_item(seed, args, defaults) for seed in args.seeds]
        # One cheap step first, so the first measured video does not pay for the allocator's and kernels' warm-up.
        generator.generate(dataclasses.replace(items[0], num_inference_steps=1))
        seeds = []
        for item in items:
            result = compare_seed(generator, item, threshold)
            seeds.append(result)
            print(
                f"seed {item.seed}: PSNR mean {result['psnr_mean_db']} dB (min {result['psnr_min_db']}), SSIM mean "
                f"{result['ssim_mean']} (min {result['ssim_min']}), steps reused {result['cache']['steps_reused']}"
                f"/{item.num_inference_steps}, denoise {result['denoise_loop_s']}",
                flush=True,
            )
    finally:
        generator.close()
    first = items[0]
    return {
        "model": str(model_dir) if not args.tiny else "tiny random model (batchgen tiny-model, seed 0)",
        "device": args.device or "auto",
        "host": platform.machine(),
        "threshold": threshold,
        "shape": {"frames": first.num_frames, "height": first.height, "width": first.width},
        "steps": first.num_inference_steps,
        "seeds": seeds,
        "summary": {
            "psnr_mean_db": _mean(s["psnr_mean_db"] for s in seeds),
            "ssim_mean": _mean(s["ssim_mean"] for s in seeds),
            "steps_reused": sum(s["cache"]["steps_reused"] for s in seeds),
            "steps_total": sum(s["cache"]["steps_reused"] + s["cache"]["steps_computed"] for s in seeds),
        },
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.fmean(values), 4) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="a tiny random model in a temporary folder, on CPU")
    source.add_argument("--model-dir", help="a Mochi model directory (diffusers or original layout)")
    parser.add_argument("--threshold", type=float, help=f"cache threshold (default 0.05; --tiny {TINY_THRESHOLD})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's config)")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--prompt", default="a red fox running through fresh snow at dawn")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", help="results file (default bench/results/quality-<model>.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device = args.device or "cpu"
    results = run(args)
    name = "tiny-cpu" if args.tiny else Path(args.model_dir).name
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"quality-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"summary: {results['summary']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
