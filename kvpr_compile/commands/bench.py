"""`kvpr bench`: decode ms/step of resident, HF offloaded, kvpr ratio 0 and kvpr scheduled
against the physical H2D limit (see kvpr_compile.bench; also `python -m benchmarks.decode`)."""
from __future__ import annotations

import argparse

from ..bench.main import DESCRIPTION, add_arguments, run


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="one-run decode comparison against the physical limit",
        description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser
