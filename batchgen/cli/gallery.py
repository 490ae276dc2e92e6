"""``batchgen gallery``: a static HTML page of a run's videos (see ``batchgen.dataset.gallery``)."""

from __future__ import annotations

import argparse

NAME = "gallery"
HELP = "write a static HTML gallery (thumbnail strips, prompts, quality flags) of a run's videos"
ORDER = 77
DESCRIPTION = (
    "Write index.html, one small script per page of videos and a contact-sheet thumbnail per video under --out "
    "(a folder or s3://bucket/prefix). Open index.html in a browser: no server needed. Rerunning makes only the "
    "missing thumbnails."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="where the gallery goes: a folder or s3://...")
    parser.add_argument("--sample", type=int, default=None, metavar="N", help="show N sampled videos (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sample draw")
    parser.add_argument("--page-size", type=int, default=None, help="videos per page (default 60)")
    parser.add_argument(
        "--link-base",
        default=None,
        metavar="URL",
        help="HTTP(S) base the video keys are served under (e.g. a CDN in front of the bucket), for the MP4 links",
    )


def run(args: argparse.Namespace) -> int:
    from batchgen.dataset.gallery import write_gallery
    from batchgen.dataset.reader import open_run
    from batchgen.storage import open_storage

    source = open_run(args.run, args.run_id)
    out = open_storage(args.out)
    paging = {"page_size": args.page_size} if args.page_size is not None else {}
    summary = write_gallery(source, out, sample=args.sample, seed=args.seed, link_base=args.link_base, **paging)
    print(
        f"{summary['videos']} videos ({summary['flagged']} flagged) on {summary['pages']} page(s), "
        f"{summary['thumbnails_made']} new thumbnail(s) -> {out.url('index.html')}"
    )
    return 0
