"""The `kvpr` command line: one sub-command per module in `kvpr_compile.commands`.

Each command module declares its flags with `add_parser(subparsers)` and imports torch only
inside `run(args)`, so `kvpr --help` and `kvpr CMD --help` answer without importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMANDS = ("demo", "profile", "plan", "bench")

# torch's import warns "Failed to initialize NumPy" where numpy is not installed (the CPU wheel
# does not depend on it); nothing the commands do needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpr", description="KVPR: partial KV recomputation for CPU-offloaded KV caches")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"kvpr_compile.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
