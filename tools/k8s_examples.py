"""The ready-to-apply PyTorchJobs under ``jobs/``, generated from ``render_pytorchjob`` so they cannot drift.

    python -m tools.k8s_examples --write jobs   # regenerate
    python -m tools.k8s_examples --check jobs   # exit 1 naming every file that differs, is missing or is extra

Each file starts with a comment giving the equivalent ``batchgen render`` command; its output is the body of the
file byte for byte (tests/test_jobs_examples.py runs it). Only settings that ``batchgen render`` can take as
flags are used, so the command in the header is complete.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from batchgen.core.config import setting_argv
from batchgen.core.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from batchgen.core.layout import shard_id
from batchgen.launch.k8s.pod import to_yaml
from batchgen.launch.k8s.pytorchjob import render_pytorchjob
from batchgen.launch.k8s.settings import LaunchSettings
from batchgen.worker.contract import shard_selection

log = logging.getLogger("batchgen.k8s.examples")

# A run id of the shape plan.py produces ("<slug>-<fingerprint[:12]>"); users replace it with their own.
EXAMPLE_RUN_ID = "prompts-0123456789ab"

# What a typical cluster run shares: weights on a read-only PVC, S3 credentials from an existing Secret,
# pods pinned to H100 nodes.
_COMMON = LaunchSettings(
    launcher="pytorchjob",
    output="s3://my-bucket/videos",
    namespace="videos",
    model_pvc="mochi-weights",
    s3_secret="s3-credentials",
    s3_region="us-east-1",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    cpu="64",
    memory="800Gi",
)


@dataclass(frozen=True)
class Example:
    filename: str
    title: str
    shards: tuple[str, ...]
    settings: LaunchSettings


EXAMPLES: tuple[Example, ...] = (
    Example(
        "1x8-ulysses8.yaml",
        "1 node x 8 GPUs, Ulysses 8 (CFG batched on every rank)",
        (shard_id(0), shard_id(1)),
        _COMMON.replace(nodes=1, gpus_per_node=8, ulysses_degree=8, ring_degree=1, cfg_degree=1),
    ),
    Example(
        # CFG parallel across nodes: the two guidance branches meet once per step, where ring attention would pass
        # key/value blocks between the nodes in every attention layer.
        "2x8-cfg2-ulysses8.yaml",
        "2 nodes x 8 GPUs, Ulysses 8 inside a node x CFG parallel 2 across nodes",
        (shard_id(2), shard_id(3)),
        _COMMON.replace(nodes=2, gpus_per_node=8, ulysses_degree=8, ring_degree=1, cfg_degree=2, shm_size="128Gi"),
    ),
    Example(
        "1x8-cfg2-ulysses4.yaml",
        "1 node x 8 GPUs, CFG parallel 2 x Ulysses 4",
        (shard_id(4), shard_id(5)),
        _COMMON.replace(nodes=1, gpus_per_node=8, ulysses_degree=4, ring_degree=1, cfg_degree=2),
    ),
    Example(
        "1x1.yaml",
        "1 node x 1 GPU, no sequence parallelism (with model offload)",
        (shard_id(6),),
        _COMMON.replace(
            nodes=1, gpus_per_node=1, ulysses_degree=1, ring_degree=1, cfg_degree=1, offload="model", cpu="16",
            memory="200Gi",
        ),
    ),
)  # fmt: skip

_DEFAULTS = LaunchSettings()


def render_flags(settings: LaunchSettings) -> list[str]:
    """``batchgen render`` flags that reproduce ``settings`` (only fields that differ from the defaults).

    Raises ValueError for settings that ``batchgen render`` only takes from a values file (tolerations,
    affinity): an example must be reproducible from its header alone.
    """
    flags: list[str] = []
    for f in fields(LaunchSettings):
        value = getattr(settings, f.name)
        if value == getattr(_DEFAULTS, f.name):
            continue
        if f.name == "parallel":
            flags += setting_argv(value)
        elif f.name == "node_selector":
            for key, val in sorted(value.items()):
                flags += ["--node-selector", f"{key}={val}"]
        elif f.name == "image_pull_secrets":
            for name in value:
                flags += ["--image-pull-secret", name]
        elif f.name in ("tolerations", "affinity") or value is None:
            raise ValueError(f"{f.name} cannot be given to `batchgen render` as a flag; keep it out of the examples")
        else:
            flags += ["--" + f.name.replace("_", "-"), str(value)]
    return flags


def render_args(example: Example) -> list[str]:
    """The full ``batchgen render`` argument list for ``example`` (without the program name)."""
    return [
        "render",
        "--run-id",
        EXAMPLE_RUN_ID,
        "--shards",
        shard_selection(example.shards),
        *render_flags(example.settings),
    ]


def render_example(example: Example) -> str:
    """The file content: a header comment, then exactly what ``batchgen render`` prints."""
    command = shlex.join(["batchgen", *render_args(example)])
    header = [
        f"# {example.title}.",
        "# Generated by `python -m tools.k8s_examples --write jobs`; do not edit. Same output as:",
        f"#   {command}",
        f"# Plan the run first (`batchgen plan MANIFEST --output {example.settings.output}`) and use its run id;",
        "# the workers read the plan from the output and skip items that are already done.",
    ]
    job = render_pytorchjob(EXAMPLE_RUN_ID, list(example.shards), example.settings, attempt=1)
    return "\n".join(header) + "\n" + to_yaml([job])


def split_header(text: str) -> tuple[list[str], str]:
    """(header comment lines, YAML body) of an example file."""
    lines = text.splitlines(keepends=True)
    count = 0
    while count < len(lines) and lines[count].startswith("#"):
        count += 1
    return [line.rstrip("\n") for line in lines[:count]], "".join(lines[count:])


def expected_files() -> dict[str, str]:
    return {example.filename: render_example(example) for example in EXAMPLES}


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in expected_files().items():
        path = directory / name
        if not path.exists() or path.read_text() != content:
            tmp = path.with_suffix(".yaml.tmp")
            tmp.write_text(content)
            tmp.replace(path)  # never a half-written example
            written.append(path)
    return written


def drift(directory: Path) -> list[str]:
    """Every difference between ``directory`` and the generated examples, one message per file."""
    problems = []
    expected = expected_files()
    present = {p.name for p in directory.glob("*.yaml")} if directory.is_dir() else set()
    for name, content in expected.items():
        path = directory / name
        if name not in present:
            problems.append(f"{path}: missing")
        elif path.read_text() != content:
            problems.append(f"{path}: differs from what render_pytorchjob produces")
    for name in sorted(present - set(expected)):
        problems.append(f"{directory / name}: not a generated example (remove it or add it to EXAMPLES)")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.k8s_examples", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="DIR", type=Path, help="(re)generate the examples into DIR")
    action.add_argument("--check", metavar="DIR", type=Path, help="exit 1 if DIR differs from the generated examples")
    args = parser.parse_args(argv)
    if args.write:
        written = write(args.write)
        log.info("%d of %d example(s) written to %s", len(written), len(EXAMPLES), args.write)
        return EXIT_OK
    problems = drift(args.check)
    for problem in problems:
        log.error("%s", problem)
    if problems:
        log.error("regenerate with: python -m tools.k8s_examples --write %s", args.check)
        return EXIT_FAILURE
    log.info("%s: %d example(s) up to date", args.check, len(EXAMPLES))
    return EXIT_OK


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main())
    except ValueError as e:  # an example that render cannot reproduce from flags: a bug in EXAMPLES
        logging.getLogger("batchgen.k8s.examples").error("%s", e)
        sys.exit(EXIT_BAD_INPUT)
