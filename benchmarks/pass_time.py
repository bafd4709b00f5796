"""Time of the kvpr backend's own work (find sites, slices, plan with a forced ratio, rewrite,
prefetch placement) on the built-in Llama at several layer counts: the prefill and the decode
graph of one short decode, Dynamo's tracing excluded.

    python -m benchmarks.pass_time --layers 8 32 80 [--repeat 3] [--profile]

Prints the fastest of ``--repeat`` compiles per graph (the machine may be shared).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from kvpr_compile.backend import kvpr_backend
from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama


def backend_seconds(layers: int, hidden: int = 64,
                    profiler: cProfile.Profile | None = None) -> list[float]:
    """Seconds the backend spent on each graph of a prefill + 2 decode steps."""
    cfg = TinyLlamaConfig(vocab_size=101, hidden_size=hidden, num_layers=layers, num_heads=4,
                          num_kv_heads=4, intermediate_size=2 * hidden, max_seq_len=64)
    model = build_tiny_llama(cfg)
    spent: list[float] = []

    def timed(gm, example_inputs, **kwargs):
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        out = kvpr_backend(gm, example_inputs, **kwargs)
        spent.append(time.perf_counter() - start)
        if profiler is not None:
            profiler.disable()
        return out

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=timed, options={"ratio": 0.5})
    cache = model.make_cache(1, 64)
    with torch.no_grad():
        compiled(torch.zeros(1, 8, dtype=torch.long), cache)
        for _ in range(2):
            compiled(torch.zeros(1, 1, dtype=torch.long), cache)
    return spent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32, 80])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile the largest layer count")
    args = parser.parse_args(argv)
    for layers in args.layers:
        prof = cProfile.Profile() if args.profile and layers == max(args.layers) else None
        runs = [backend_seconds(layers, profiler=prof) for _ in range(args.repeat)]
        spent = [min(r[i] for r in runs) for i in range(len(runs[0]))]
        print(f"{layers:>3} layers: backend " + ", ".join(f"{s:.3f}" for s in spent)
              + f" s per graph (total {sum(spent):.3f} s)", flush=True)
        if prof is not None:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
