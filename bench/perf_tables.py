"""README.md's performance tables, generated from the results files in bench/results/ (``make perf-tables``).

    python bench/perf_tables.py --write    # rewrite every table between its markers in README.md
    python bench/perf_tables.py --check    # exit 1, naming the table, when README.md differs from the files

Every row names its results file, the device it ran on and its date (the file's ``date``, else the day the file
was last committed, else "uncommitted"). A figure no results file holds is written "not measured". Only the text
between ``<!-- perf-table:NAME begin ... -->`` and ``<!-- perf-table:NAME end -->`` is generated; the prose
around the tables is not.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_MEASURED = "not measured"
KERNEL_NAMES = {"sdpa-cudnn": "cuDNN", "sdpa-flash": "flash", "sdpa-efficient": "efficient", "sdpa-math": "math"}
BLOCK = re.compile(
    r"(<!-- perf-table:(?P<name>[a-z0-9-]+) begin[^>]*-->\n)(?P<body>.*?)(<!-- perf-table:(?P=name) end -->)", re.S
)


class Results:
    """One results file: its figures, and the device and date every row of it names."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text())
        self.name = path.name
        self.device = _device(self.data)
        self.date = self.data.get("date") or _commit_date(path)

    def row(self, *cells: object) -> list[str]:
        return [str(c) for c in cells] + [self.device, self.date, f"`{self.name}`"]


def _device(data: dict) -> str:
    if data.get("device") and not str(data["device"]).startswith("cpu"):
        return str(data["device"])
    machine = data.get("machine") or {}
    cpus = machine.get("cpus") or data.get("cpu_count")
    return f"CPU ({cpus} cores)" if cpus else "CPU"


def _commit_date(path: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", path.name], cwd=path.parent, capture_output=True, text=True
        ).stdout.strip()
    except OSError:  # no git on this machine
        out = ""
    return out or "uncommitted"


def table(header: list[str], rows: list[list[str]]) -> str:
    header = [*header, "device", "date", "file"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def not_measured(*labels: str, width: int = 1) -> list[list[str]]:
    """Rows for figures no results file holds (device, date and file: none)."""
    return [[label, *[NOT_MEASURED] * width, "-", "-", "-"] for label in labels]


def _files(results_dir: Path, pattern: str, exclude: str | None = None) -> Iterator[Results]:
    for path in sorted(results_dir.glob(pattern)):
        if exclude is None or not path.name.startswith(exclude):
            yield Results(path)


def _pct(value: float | None) -> str:
    return f"{value * 100:.1f}%" if value is not None else NOT_MEASURED


# -- GPU -------------------------------------------------------------------------------------------------------------


def gpu_forward(results_dir: Path) -> str:
    """bench/gpu.py's 48-block forwards, one row per frame count and SDPA kernel."""
    rows = []
    for res in _files(results_dir, "gpu-*.json", exclude="gpu-device-"):
        for run in res.data.get("sections", {}).get("transformer_forward", {}).get("runs", []):
            tokens = f"{run['frames']} ({run['visual_tokens']:,})" if "visual_tokens" in run else str(run["frames"])
            kernel = KERNEL_NAMES.get(run["kernel"], run["kernel"])
            if "seconds_per_forward" not in run:  # the kernel refused the shape, or the time budget ran out
                why = f"failed: {run['error'].split(': ', 1)[-1]}" if "error" in run else NOT_MEASURED
                rows.append(res.row(tokens, kernel, why, *["-"] * 4))
                continue
            rows.append(res.row(
                tokens, kernel, f"{run['seconds_per_forward']:.3f}", f"{run['achieved_tflops']:.0f}",
                _pct(run.get("mfu_vs_datasheet")), _pct(run.get("mfu_vs_measured_matmul")),
                f"{run['peak_memory_gib']:.1f}",
            ))  # fmt: skip
    header = ["frames (visual tokens)", "SDPA kernel", "s / forward", "TFLOP/s", "MFU (datasheet)",
              "MFU (measured matmul)", "peak GiB"]  # fmt: skip
    return table(header, rows or not_measured("48-block forward", width=6))


def _gpu_measure_rows(res: Results) -> list[list[str]]:
    sections = res.data.get("sections", {})
    rows = []
    if vae := sections.get("vae_decode"):
        rows.append(res.row(
            f"VAE decode, {vae['frames_requested']} frames {'x'.join(map(str, vae['resolution']))}, tiled + framewise",
            f"{vae['seconds']:.2f} s, peak {vae['peak_memory_gib']:.1f} GiB, {vae['frames_out']} frames out",
        ))  # fmt: skip
    if t5 := sections.get("t5_encoder"):
        per = {b["batch"]: b["seconds_per_batch"] for b in t5["batches"]}
        rows.append(res.row("T5-XXL-shaped encoder, 256 tokens", f"{per[1]:.3f} s for 1 prompt, {per[8]:.3f} s for 8"))
    for key in ("pipeline", "pipeline_auto"):
        if pipe := sections.get(key):
            rows.append(res.row(
                f"whole pipeline, {pipe['frames']} frames, `--offload {pipe['offload']}`, {pipe['steps']} steps",
                f"{pipe['seconds_per_denoising_step']:.2f} s per CFG step, peak {pipe['peak_memory_gib']:.1f} GiB, "
                f"{pipe['offload_transfer_s']:.1f} s of offload transfers",
            ))  # fmt: skip
    if native := sections.get("native_attention"):
        diffs = [v["max_abs_diff"] for v in native.get("forward_vs_stock", {}).values() if "max_abs_diff" in v]
        if diffs:
            rows.append(res.row(
                "native USP path at degree 1 vs stock attention",
                f"max abs diff {max(diffs):.4f} over a {native['forward_layers']}-block forward "
                f"(abs max {native['forward_output_abs_max']:.1f})",
            ))  # fmt: skip
    for frames, figures in sections.get("projection", {}).items():
        if frames.endswith("_frames"):
            result = f"{figures['total_s']:.0f} s from the forward time"
            if "total_s_from_pipeline_step" in figures:
                result += f", {figures['total_s_from_pipeline_step']:.0f} s from the pipeline's step time"
            rows.append(res.row(f"projected 64-step video, {frames.split('_')[0]} frames", result))
    return rows


def gpu_measures(results_dir: Path) -> str:
    """bench/gpu.py's other sections: VAE, T5, the pipeline, the native path's accuracy, the projection."""
    rows = [row for res in _files(results_dir, "gpu-*.json", exclude="gpu-device-") for row in _gpu_measure_rows(res)]
    return table(["measure", "result"], rows or not_measured("VAE decode, T5, pipeline"))


DEVICE_CHECKS = (
    "attention paths (joint masked, per-prompt unmasked, each kernel) against fp32, 49 and 163 frames",
    "joint against per-prompt 48-block forward, and auto's pick",
    "FP8 linears and their numeric gate",
    "Wan 14B forward, 81 frames 480x832",
    "whole pipeline, 3 steps, `--offload auto`",
    "compiled against eager 48-block forward",
)


def _device_rows(res: Results) -> list[list[str]]:
    sections = res.data.get("sections", {})
    rows = []
    for run in sections.get("attention_paths", {}).get("runs", []):
        timed = f"{run['seconds'] * 1000:.2f} ms, " if "seconds" in run else "not timed (fallback), "
        kind = "masked" if run["masked"] else "unmasked"
        rows.append(res.row(f"one block's attention, {run['frames']} frames, {run['candidate']} ({kind})",
                            f"{timed}max abs diff vs fp32 {run['max_abs_diff_vs_fp32']:.2g}"))  # fmt: skip
    for frames, auto in sections.get("attention_paths", {}).get("auto", {}).items():
        rows.append(res.row(f"auto's pick for one block, {frames} frames", f"{auto['path']}/{auto['kernel']}"))
    for run in sections.get("attention_forward", {}).get("runs", []):
        if "joint" not in run:
            continue
        joint, per, auto = run["joint"], run["per-prompt"], run["auto"]
        rows.append(res.row(
            f"48-block forward of the CFG pair, {run['frames']} frames: joint / per-prompt",
            f"{joint['seconds_per_forward']:.3f} s ({joint['kernel']}) / {per['seconds_per_forward']:.3f} s "
            f"({per['kernel']}); auto picks {auto['path']}/{auto['kernel']}, measuring {auto['measure_s']:.2f} s "
            f"= {run['auto_measure_share_of_item'] * 100:.2f}% of a 64-step item",
        ))  # fmt: skip
    if fp8 := sections.get("fp8_linear"):
        gate = fp8["gate"]
        speedups = ", ".join(f"{g['speedup_fp8']:.2f}x" for g in fp8["gemms"])
        verdict = "passes" if gate["passed"] else "fails"
        rows.append(res.row("FP8 linears (3 GEMM shapes) and the numeric gate",
                            f"{fp8['kernel']}: speed-up {speedups}; gate {verdict}"))  # fmt: skip
    for run in sections.get("wan_forward", {}).get("runs", []):
        if "seconds_per_forward" in run:
            rows.append(res.row(
                f"Wan forward, {run['frames']} frames {run['height']}x{run['width']}, {run['kernel']}",
                f"{run['seconds_per_forward']:.3f} s, MFU (measured matmul) {_pct(run.get('mfu_vs_measured_matmul'))}",
            ))  # fmt: skip
    rows += [r for r in _gpu_measure_rows(res) if "pipeline" in r[0]]
    for run in sections.get("compiled_forward", {}).get("runs", []):
        rows.append(res.row(f"{run['layers']}-block forward, eager / compiled",
                            f"{run['eager_s']:.3f} s / {run['compiled_s']:.3f} s (first call {run['first_compiled_call_s']:.0f} s)"))  # fmt: skip
    return rows


def gpu_device(results_dir: Path) -> str:
    """``bash bench/gpu_device.sh``'s results, one row per figure; "not measured" while no such file exists."""
    files = [res for res in _files(results_dir, "gpu-device-*.json") if not res.data.get("tiny")]
    rows = [row for res in files for row in _device_rows(res)]
    return table(["measure", "result"], rows or not_measured(*DEVICE_CHECKS))


def wan_gpu(results_dir: Path) -> str:
    """bench/wan_gpu.py's 14B forwards (and the device command's)."""
    rows = []
    for res in _files(results_dir, "wan-gpu-*.json"):
        for run in res.data.get("runs", []):
            if "seconds_per_forward" in run:
                rows.append(res.row(f"{run['frames']} frames {run['height']}x{run['width']} ({run['visual_tokens']:,})",
                                    run["kernel"], f"{run['seconds_per_forward']:.3f}"))  # fmt: skip
    labels = ("81 frames 480x832 (32,760)", "81 frames 720x1280 (75,600)")
    return table(["shape (visual tokens)", "SDPA kernel", "s / forward"], rows or not_measured(*labels, width=2))


# -- CPU -------------------------------------------------------------------------------------------------------------


def cpu_pipeline(results_dir: Path) -> str:
    """bench/pipeline.py: planning, worker bookkeeping, the resume scan and the index build."""
    path = results_dir / "pipeline-cpu.json"
    if not path.exists():
        return table(["measure", "result", "target"], not_measured("bench/pipeline.py", width=2))
    res = Results(path)
    d, t = res.data, res.data["targets"]
    plan, scan, index = d["plan"], d["resume_scan"], d["index_build"]
    scans = [r["seconds"] for r in scan["runs"]]
    projected = index["projected_1m"]
    rows = [
        res.row(f"plan {plan['rows']:,} rows ({plan['shards']:,} shards) to a folder",
                f"{plan['seconds']:.1f} s, peak RSS {plan['peak_rss_gib']:.2f} GiB",
                f"< {t['plan_seconds']:.0f} s, < {t['plan_peak_rss_gib']} GiB"),
        res.row("worker bookkeeping (encode + upload + sidecar) against moto",
                f"{d['bookkeeping']['items_per_second']:.1f} items/s, {d['bookkeeping']['requests_per_item']} "
                "requests per item", f">= {t['items_per_second']:.0f} /s"),
        res.row("worker bookkeeping with noise frames (worst case for the encoder)",
                f"{d['bookkeeping_noise_frames']['items_per_second']:.1f} items/s", ""),
        res.row(f"resume scan, shard of {scan['committed_items']:,} committed items",
                f"{scan['seconds']:.2f} s (runs {min(scans):.2f} to {max(scans):.2f} s), {scan['requests']} requests",
                f"< {t['scan_seconds']:.0f} s, < {t['scan_requests']}"),
        res.row(f"index build, {index['items']:,} committed items in {index['shards']:,} shards",
                f"{index['seconds']:.1f} s, {index['requests']:,} requests ({index['requests_per_shard']:.2f} per "
                f"shard), peak RSS {index['peak_rss_gib']:.2f} GiB",
                f"<= {t['index_requests_per_shard']:.0f} requests per shard"),
        res.row("same, projected to 1,000,000 items",
                f"{projected['seconds']:,.0f} s, about {round(projected['requests'], -2):,.0f} requests, peak RSS "
                f"{projected['peak_rss_gib']:.2f} GiB", f"< {t['index_1m_peak_rss_gib']:.0f} GiB"),
    ]  # fmt: skip
    return table(["measure", "result", "target"], rows)


def cpu_controller(results_dir: Path) -> str:
    """bench/controller.py: requests and seconds per controller pass, early and late in a 5,000-group run."""
    path = results_dir / "controller-cpu.json"
    header = ["passes", "done groups", "API requests", "S3 requests", "seconds (median)"]
    if not path.exists():
        return table(header, not_measured("bench/controller.py", width=4))
    res = Results(path)
    rows = []
    for key, label in (("first_tenth", "first tenth"), ("last_tenth", "last tenth")):
        part = res.data[key]
        low, high = part["done_groups"]
        rows.append(res.row(label, f"{low:,}-{high:,}", part["api_requests_median"], part["s3_requests_median"],
                            f"{part['seconds_median']:.3f}"))  # fmt: skip
    return table(header, rows)


TABLES: dict[str, Callable[[Path], str]] = {
    "gpu-forward": gpu_forward,
    "gpu-measures": gpu_measures,
    "gpu-device": gpu_device,
    "wan-gpu": wan_gpu,
    "cpu-pipeline": cpu_pipeline,
    "cpu-controller": cpu_controller,
}


def regenerate(readme: str, results_dir: Path) -> tuple[str, list[str]]:
    """README text with every marked table regenerated, and the names of the tables that changed. A table the
    README does not mark, or a marker no table answers, is an error (the two lists must match)."""
    found = [m.group("name") for m in BLOCK.finditer(readme)]
    if sorted(found) != sorted(TABLES):
        raise SystemExit(f"README.md marks tables {sorted(found)}; bench/perf_tables.py makes {sorted(TABLES)}")
    changed = []

    def replace(match: re.Match) -> str:
        body = TABLES[match.group("name")](results_dir)
        if body != match.group("body"):
            changed.append(match.group("name"))
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, readme), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the tables in the README")
    mode.add_argument("--check", action="store_true", help="exit 1 when the README differs from the results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    text, changed = regenerate(args.readme.read_text(), args.results)
    if args.check:
        if changed:
            print(f"{args.readme}: tables {', '.join(changed)} differ from {args.results}; run `make perf-tables`")
            return 1
        print(f"{args.readme}: {len(TABLES)} tables agree with {args.results}")
        return 0
    args.readme.write_text(text)
    print(f"{args.readme}: rewrote {', '.join(changed) or 'nothing (already current)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
