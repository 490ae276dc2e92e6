"""``batchgen export``: a run's videos as WebDataset tar shards (see ``batchgen.dataset.export``)."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "write a run's videos as WebDataset tar shards (mp4 + json + txt per sample) to any storage URI"
ORDER = 76
DESCRIPTION = (
    "Select committed videos from the run's index (optionally only unflagged ones, a sampled fraction) and write "
    "them as shard-NNNNNN.tar files plus manifest.json and README.md (a Hugging Face dataset card: "
    "datasets.load_dataset(OUT) loads the folder) under --out. Rerunning resumes: existing tars are checked "
    "and kept, and a finished export (manifest present) writes nothing. Exit 4 if --out holds another export."
)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--format", choices=["webdataset"], default="webdataset", help="output format")
    parser.add_argument("--out", required=True, metavar="URI", help="where the tars go: s3://bucket/prefix or a folder")
    parser.add_argument("--unflagged", action="store_true", help="only videos without quality flags")
    parser.add_argument("--fraction", type=_fraction, default=1.0, help="share of the videos to keep (0 < F <= 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --fraction sample")
    parser.add_argument("--max-count", type=_positive, help="samples per tar at most (default 1000)")
    parser.add_argument("--max-bytes", type=_positive, help="video bytes per tar at most (default 1 GiB)")


def run(args: argparse.Namespace) -> int:
    from batchgen.dataset.export import MANIFEST_KEY, ExportOptions, export_webdataset
    from batchgen.dataset.reader import open_run
    from batchgen.storage import open_storage

    source = open_run(args.run, args.run_id)
    out = open_storage(args.out)
    limits = {name: getattr(args, name) for name in ("max_count", "max_bytes") if getattr(args, name) is not None}
    options = ExportOptions(unflagged=args.unflagged, fraction=args.fraction, seed=args.seed, **limits)
    manifest = export_webdataset(source, out, options)
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} tar(s) -> {out.url(MANIFEST_KEY)}")
    return 0
