"""`kvpr bench`: decode ms/step of resident, HF offloaded, kvpr ratio 0 and kvpr scheduled
against the physical H2D limit (see kvpr_compile.bench; also `python -m benchmarks.decode`);
`kvpr bench --protocol 2` runs benchmark protocol 2 (kvpr_compile.bench.v2): one process per
contender in two rounds, yardsticks from measured rates, sanity flags, a protocol-2 file."""
from __future__ import annotations

import argparse

from ..bench.main import DESCRIPTION, add_arguments, run


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="decode comparison against the physical limit (--protocol 2: the "
                      "audited run)",
        description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser
