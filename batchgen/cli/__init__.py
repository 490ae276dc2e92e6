"""Command-line entry point. Each subcommand is a module ``batchgen/cli/<name>.py`` that defines::

    NAME = "validate"           # subcommand name
    HELP = "one line"           # shown in --help
    ORDER = 10                  # position in --help
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int   # exit code

Command modules import heavy libraries (torch, diffusers) inside ``run`` only, so ``batchgen --help``
and the control-plane commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import signal
import sys

from batchgen import __version__
from batchgen.core.errors import EXIT_CODES, EXIT_FAILURE, EXIT_INTERRUPTED, BatchgenError
from batchgen.core.logs import LOG_FORMAT_ENV, LOG_FORMATS, make_handler, resolve_format

log = logging.getLogger("batchgen")


def _command_modules():
    import batchgen.cli as package

    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    modules = [importlib.import_module(f"batchgen.cli.{name}") for name in names]
    return sorted((m for m in modules if hasattr(m, "NAME")), key=lambda m: (m.ORDER, m.NAME))


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in sorted(EXIT_CODES.items()))
    parser = argparse.ArgumentParser(
        prog="batchgen",
        description="Batch video generation (Mochi, Wan): manifest -> shards -> workers -> S3 -> index.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"batchgen {__version__}")
    _add_global_options(parser, GLOBAL)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        # Also after the subcommand, as kubectl, aws and gcloud accept them: stored apart, then merged.
        _add_global_options(p.add_argument_group("global options (also accepted before the command)"), SUBCOMMAND)
        p.set_defaults(_run=module.run)
    return parser


GLOBAL = ""
SUBCOMMAND = "sub_"
"""Prefixes of the destinations of the global options given before / after the subcommand."""


def _add_global_options(parser, prefix: str) -> None:
    parser.add_argument(
        "-v", "--verbose", dest=f"{prefix}verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    parser.add_argument("-q", "--quiet", dest=f"{prefix}quiet", action="store_true", help="warnings and errors only")
    parser.add_argument(
        "--log-format",
        dest=f"{prefix}log_format",
        choices=LOG_FORMATS,
        default=None,
        help=f"text (default) or json lines (env {LOG_FORMAT_ENV})",
    )


def _merge_global_options(args: argparse.Namespace) -> None:
    """One value per global option, whichever side of the subcommand gave it (after wins for --log-format)."""
    args.verbose += getattr(args, f"{SUBCOMMAND}verbose", 0)
    args.quiet = args.quiet or getattr(args, f"{SUBCOMMAND}quiet", False)
    args.log_format = getattr(args, f"{SUBCOMMAND}log_format", None) or args.log_format


def configure_logging(verbose: int, quiet: bool, log_format: str = "text") -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    handler = make_handler(sys.stderr, log_format)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter (botocore, urllib3, diffusers) stays quiet unless asked for.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "kubernetes", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    _merge_global_options(args)
    try:
        log_format = resolve_format(args.log_format)
    except BatchgenError as e:
        print(f"batchgen: {e}", file=sys.stderr)
        return e.exit_code
    configure_logging(args.verbose, args.quiet, log_format)
    os.environ[LOG_FORMAT_ENV] = log_format  # worker subprocesses log in the same format
    try:
        return int(args._run(args) or 0)
    except BatchgenError as e:
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted: nothing half-written is left; run the same command again to finish")
        return EXIT_INTERRUPTED
    except Exception:
        log.exception("unexpected error")
        return EXIT_FAILURE


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
