"""The chart's ``workers`` values for the parallel settings, derived from ``ParallelConfig``.

    python -m tools.chart_schema --write   # rewrite charts/batchgen/values.schema.json's entries
    python -m tools.chart_schema --check   # exit 1 naming every entry that differs (tests/test_settings.py)

Each ``ParallelConfig`` field is a ``workers.<camelCase>`` value: its type, choices, bounds and description come
from the field's metadata (``batchgen.core.config.value_schema``), so a new setting cannot be left out of the chart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from batchgen.core.config import ParallelConfig, value_schema

SCHEMA = Path(__file__).resolve().parents[1] / "charts" / "batchgen" / "values.schema.json"


def derived_schema(text: str) -> str:
    """``text`` (the schema file) with the workers' parallel entries replaced by the derived ones, in place."""
    schema = json.loads(text)
    workers = schema["properties"]["workers"]["properties"]
    workers.update(value_schema(ParallelConfig))
    return json.dumps(schema, indent=2) + "\n"


def drift(path: Path = SCHEMA) -> list[str]:
    """The parallel entries of ``path`` that differ from the derived ones (empty when in sync)."""
    workers = json.loads(path.read_text())["properties"]["workers"]["properties"]
    return [name for name, entry in value_schema(ParallelConfig).items() if workers.get(name) != entry]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.chart_schema", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the schema's parallel entries")
    action.add_argument("--check", action="store_true", help="exit 1 when an entry differs")
    args = parser.parse_args(argv)
    if args.write:
        SCHEMA.write_text(derived_schema(SCHEMA.read_text()))
        return 0
    stale = drift()
    for name in stale:
        print(f"{SCHEMA}: workers.{name} differs from ParallelConfig; run python -m tools.chart_schema --write")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
