"""README.md's performance tables are generated from bench/results/ (``make perf-tables``): the README must agree
with the files, every row names its file, device and date, and a figure without a file is "not measured"."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "perf_tables.py"
sys.path.insert(0, str(ROOT / "bench"))

import perf_tables  # noqa: E402


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_readme_tables_agree_with_the_results_files():
    proc = run("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(f"{len(perf_tables.TABLES)} tables agree with {ROOT / 'bench' / 'results'}")


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for match in perf_tables.BLOCK.finditer(text):
        lines = match.group("body").strip().splitlines()[2:]  # after the header and its rule
        rows += [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    return rows


def test_every_row_names_an_existing_file_its_device_and_date_or_says_not_measured():
    rows = table_rows((ROOT / "README.md").read_text())
    assert rows
    for *cells, device, date, file in rows:
        if file == "-":
            assert perf_tables.NOT_MEASURED in cells and device == date == "-"
            continue
        assert (ROOT / "bench" / "results" / file.strip("`")).exists(), file
        assert device and re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), (device, date)


def test_a_changed_figure_fails_the_check_and_write_restores_it(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text().replace("| 3.796 |", "| 3.500 |"))
    proc = run("--check", "--readme", str(readme))
    assert proc.returncode == 1
    assert "tables gpu-forward differ" in proc.stdout and "make perf-tables" in proc.stdout
    assert run("--write", "--readme", str(readme)).returncode == 0
    assert readme.read_text() == (ROOT / "README.md").read_text()


def test_without_results_files_the_figures_are_not_measured(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(ROOT / "bench" / "results" / "controller-cpu.json", results)
    text, changed = perf_tables.regenerate((ROOT / "README.md").read_text(), results)
    assert {"gpu-forward", "cpu-pipeline"} <= set(changed)
    by_block = {m.group("name"): m.group("body") for m in perf_tables.BLOCK.finditer(text)}
    # The file kept its figures; outside the repository it has no commit date.
    assert "| first tenth | 64-448 | 129 | 3 | 0.679 | CPU (2 cores) | uncommitted |" in by_block["cpu-controller"]
    for name in ("gpu-forward", "gpu-measures", "gpu-device", "wan-gpu", "cpu-pipeline"):
        rows = table_rows(f"<!-- perf-table:{name} begin -->\n{by_block[name]}<!-- perf-table:{name} end -->")
        assert rows and all(row[-1] == "-" and perf_tables.NOT_MEASURED in row for row in rows), name


def test_a_device_results_file_fills_the_device_table(tmp_path):
    # The shape bench/gpu_device.py writes (tests/test_bench_gpu_device.py checks the real one); tiny runs are
    # smoke tests and never reach the table.
    results = tmp_path / "results"
    results.mkdir()
    device = {
        "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-05", "tiny": False,
        "sections": {
            "attention_paths": {
                "runs": [{"frames": 163, "candidate": "per-prompt/flash", "masked": False, "seconds": 0.0412,
                          "max_abs_diff_vs_fp32": 0.0005}],
                "auto": {"163": {"path": "per-prompt", "kernel": "flash"}},
            },
        },
    }  # fmt: skip
    (results / "gpu-device-nvidia-h100.json").write_text(json.dumps(device))
    (results / "gpu-device-cpu.json").write_text(json.dumps({**device, "device": "cpu-x86_64", "tiny": True}))
    body = perf_tables.gpu_device(results)
    assert "| one block's attention, 163 frames, per-prompt/flash (unmasked) | 41.20 ms, max abs diff vs fp32" in body
    assert "| auto's pick for one block, 163 frames | per-prompt/flash | NVIDIA H100 80GB HBM3 | 2026-12-05 |" in body
    assert "gpu-device-cpu.json" not in body and perf_tables.NOT_MEASURED not in body


def test_makefile_target_runs_the_generator():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^perf-tables: .*\n\t\$\(BIN\)/python bench/perf_tables.py --write$", makefile, re.M)
