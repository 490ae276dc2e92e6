"""Host memory of loading a Wan DiT from the official layout (CPU): writes bench/results/wan-official-load-cpu.json.

A Wan 2.1 1.3B-width DiT (dim 1536, 12 heads, FFN 8960, UMT5 width 4096; ``--layers`` of its 30 blocks, random
fp32 weights, as the official shards store them) is written in the official layout, sharded with an index, then
loaded in bf16 in a fresh process two ways:

- ``streamed``: ``wan_original.load_official_transformer`` (one tensor read, renamed, cast and placed at a time);
- ``whole_state_dict``: what diffusers' scripts/convert_wan_to_diffusers.py does: every shard opened with
  ``safetensors.torch.load_file`` into one state dict, renamed by the same converter, then cast into the model.
  safetensors maps the files, so that fp32 dict lives in the page cache (file pages), not in anonymous memory.

Figure: peak anonymous memory (``RssAnon``, sampled every 2 ms; the memory-mapped file pages are not counted as
they belong to the page cache) above the process's level before loading, against the bf16 model's and the fp32
weights' sizes.

Usage: python bench/wan_official_load.py [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "wan-official-load-cpu.json"
MIB = 1 << 20
# Wan2.1-T2V-1.3B (wan/configs/wan_t2v_1_3B.py) in WanTransformer3DModel's keys.
WAN_1_3B = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def write_model(folder: Path, layers: int) -> int:
    import torch
    from diffusers import WanTransformer3DModel

    from batchgen.models.wan import original as wan_original

    with torch.device("meta"):
        transformer = WanTransformer3DModel(**WAN_1_3B, num_layers=layers)
    transformer.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in transformer.parameters():
            param.normal_(0, 0.02, generator=generator)
    wan_original.write_official_transformer(transformer, folder, max_shard_size="200MB")
    return sum(p.numel() for p in transformer.parameters())


def load(folder: Path, way: str) -> dict:
    """Run in a fresh process: load ``folder`` in bf16 ``way`` and report the peak anonymous memory it added."""
    import accelerate  # noqa: F401  (imported before the baseline: library code is not what is measured)
    import diffusers  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch

    from batchgen.models.wan import original as wan_original

    before = rss_anon()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if way == "streamed":
        model = wan_original.load_official_transformer(folder, dtype=torch.bfloat16, device="cpu")
    else:
        model = load_whole_state_dict(folder)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_anon())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"way": way, "seconds": round(seconds, 2), "peak_added_mib": round((peak[0] - before) / MIB, 1),
            "model_mib": round(model_bytes / MIB, 1)}  # fmt: skip


def load_whole_state_dict(folder: Path):
    import torch
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from batchgen.models.wan import original as wan_original

    state = {}
    for shard in wan_original.weight_shards(folder):
        state.update(load_file(str(shard)))
    names = wan_original.transformer_name_map(list(state))
    with init_empty_weights():
        model = WanTransformer3DModel(**wan_original.read_official_transformer_config(folder))
    keep = model._keep_in_fp32_modules
    converted = {
        name: state[old].to(torch.float32 if any(m in name.split(".") for m in keep) else torch.bfloat16)
        for name, old in names.items()
    }
    model.load_state_dict(converted, strict=True, assign=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load(Path(args.child[0]), args.child[1])))
        return
    import torch

    from batchgen.models.wan import original as wan_original

    with tempfile.TemporaryDirectory(prefix="batchgen-wan-load-") as scratch:
        folder = Path(scratch)
        params = write_model(folder, args.layers)
        shards = len(wan_original.weight_shards(folder))
        runs = []
        for way in ("streamed", "whole_state_dict"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(folder), way], capture_output=True, text=True, check=True
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{way:>16}: +{runs[-1]['peak_added_mib']} MiB peak anonymous memory, {runs[-1]['seconds']} s")
    result = {
        "benchmark": "bench/wan_official_load.py",
        "model": f"Wan 2.1 1.3B-width DiT, {args.layers} of 30 blocks, random fp32 weights in the official layout",
        "parameters": params,
        "fp32_weights_mib": round(params * 4 / MIB, 1),
        "bf16_model_mib": runs[0]["model_mib"],
        "shards": shards,
        "runs": runs,
        "cpu": platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"fp32 weights {result['fp32_weights_mib']} MiB, bf16 model {result['bf16_model_mib']} MiB -> {RESULTS}")


if __name__ == "__main__":
    main()
