"""Host-side rates for the placement work: ``python -m benchmarks.host_rates --json PATH``.

CPU attention over host-resident fp16 and bf16 K,V at decode shapes (GB/s of K,V attended, 1 to
every core; the CPU worker's kernel and the native-dtype one), host memory bandwidth, and the
small D2H + H2D round trip with a host wait (CUDA only). Needs no profile and runs on a CPU-only
machine; ``--quick`` uses toy shapes. The measurement lives in ``kvpr_compile.bench.host_rates``.
"""
from __future__ import annotations

import argparse
import json
import sys

from kvpr_compile.bench.host_rates import measure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_rates",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the rates here")
    parser.add_argument("--quick", action="store_true", help="toy shapes, two thread counts")
    parser.add_argument("--cores", type=int, default=None, help="largest thread count")
    parser.add_argument("--max-s", type=float, default=40.0,
                        help="seconds for the attention rates (the rest is recorded absent)")
    args = parser.parse_args(argv)
    rates = measure(quick=args.quick, cores=args.cores, max_s=args.max_s)
    for a in rates["attention"]:
        rate = f"{a['gb_per_s']:7.2f} GB/s of K,V ({a['ms']:.2f} ms)" if "gb_per_s" in a \
            else a["absent"]
        print(f"{a['shape']:22s} {a['dtype']:8s} {a['threads']:3d} threads "
              f"{a['kernel']:7s} {rate}")
    mem = rates["memory"]
    print(f"host memory: copy {mem['copy_gb_per_s']:.1f} GB/s, read {mem['read_gb_per_s']:.1f} "
          f"GB/s; round trip: {rates['round_trip']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rates, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
