"""One-run decode comparison: ``python -m benchmarks.decode [--quick] [--json PATH] [--trace DIR]``.

A thin wrapper: the benchmark lives in ``kvpr_compile.bench`` (installed with the package, also
reachable as ``kvpr bench``). ``--help`` lists the flags.
"""
from __future__ import annotations

import sys

from kvpr_compile.bench.main import main

if __name__ == "__main__":
    sys.exit(main())
