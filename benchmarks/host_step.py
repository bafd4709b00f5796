"""Host time of one decode step on the CPU: the contenders, and a one-run interleaved ratio table.

Tiny dims (a step is all host work): a Hugging Face Llama of width 64 with random weights, batch 1,
a 32-token prompt, 8 or 32 layers. Contenders:

- ``hf``                uncompiled, transformers' ``DynamicCache``
                        (the reference and the ratio's 1.0)
- ``kvpr-uncompiled``   uncompiled, ``KVPRCache`` (the exact offloaded path, ``kvpr::cache_update``)
- ``kvpr``              ``model.forward`` compiled with ``backend="kvpr"``, default options (the
                        scheduler plans with the h200-pcie5 preset: ratio ~1, so the CPU also does
                        the recompute's real FLOPs, which a GPU would do on the device)
- ``kvpr-r0``, ``kvpr-r1`` the same at forced ratio 0 (no recompute: the host cost of the kvpr steps
                        alone) and 1 (all of the past recomputed)
- ``kvpr-<inner>``      default options with ``options={"inner": <inner>}`` for each ``--inner``

``python -m benchmarks.host_step [--layers 8 32] [--steps 40] [--inner eager inductor ...]``
builds every contender, warms them up, then times them in turns (one step each, round after
round) so load on the machine hits them alike, and prints µs per step with the ratio to ``hf``.
Every contender's tokens must equal ``hf``'s. pytest-benchmark suite: ``test_bench_host_step.py``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvpr_compile.bench import configs as cf
from kvpr_compile.bench.loop import GreedyDecoder
from kvpr_compile.bench.runners import backend, resident_decoder

PROMPT, BATCH = 32, 1
HF, UNCOMPILED, DEFAULT = "hf", "kvpr-uncompiled", "kvpr"
RATIOS = {"kvpr-r0": 0.0, "kvpr-r1": 1.0}
WARMUP = 3   # decode steps before timing (Dynamo compiles the decode graphs here)


def build_model(layers: int):
    spec = cf.CPU_MODELS["llama-7b"]
    return cf.build_model(spec, layers, dtype=torch.float32, device="cpu", max_positions=512)


def prompt_ids(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, model.config.vocab_size, (BATCH, PROMPT), generator=gen)


def decoder(name: str, model, steps: int) -> GreedyDecoder:
    """A fresh decoder for contender ``name`` with room for the prefill and ``steps`` steps."""
    if name == HF:
        return resident_decoder(model)
    from kvpr_compile.hf import KVPRCache
    cache = KVPRCache(model.config, batch_size=BATCH, max_seq_len=PROMPT + steps + 2,
                      dtype=torch.float32, device="cpu")
    if name == UNCOMPILED:
        return GreedyDecoder(model, model.forward, cache)
    if name == DEFAULT:
        options = {}
    elif name in RATIOS:
        options = {"ratio": RATIOS[name]}
    else:
        options = {"inner": name.removeprefix("kvpr-")}
    return GreedyDecoder(model, torch.compile(model.forward, backend=backend(), options=options),
                         cache)


def interleaved(model, names: list[str], steps: int) -> dict[str, list[float]]:
    """Seconds per decode step of each contender, measured in turns; checks tokens against hf.
    Every compiled contender compiles the same ``forward`` (one code object), so Dynamo's
    recompile limit is raised for the run: past it a frame would silently run uncompiled."""
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1024):
        return _interleaved(model, names, steps)


def _interleaved(model, names: list[str], steps: int) -> dict[str, list[float]]:
    decoders = {name: decoder(name, model, WARMUP + steps) for name in names}
    ids = prompt_ids(model)
    with torch.no_grad():
        for d in decoders.values():
            d.prefill(ids)
            for _ in range(WARMUP):
                d.step()
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(steps):
            for name, d in decoders.items():
                start = time.perf_counter()
                d.step()
                times[name].append(time.perf_counter() - start)
    ref = decoders[names[0]].tokens()
    for name, d in decoders.items():
        if not torch.equal(d.tokens(), ref):
            raise AssertionError(f"{name}: tokens differ from {names[0]}'s")
    return times


def table(results: dict[int, dict[str, list[float]]]) -> str:
    names = list(next(iter(results.values())))
    lines = [f"{'contender':<18}" + "".join(f"{f'{L} layers µs':>16}{'ratio':>7}" for L in results)]
    for name in names:
        row = f"{name:<18}"
        for times in results.values():
            med, ref = statistics.median(times[name]), statistics.median(times[names[0]])
            row += f"{med * 1e6:>16.0f}{med / ref:>7.2f}"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--steps", type=int, default=40, help="timed decode steps per contender")
    parser.add_argument("--inner", nargs="*", default=[],
                        help="inner compilers to add as kvpr-<inner> "
                             "(e.g. eager inductor piecewise)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [HF, UNCOMPILED, DEFAULT, *RATIOS, *(f"kvpr-{i}" for i in args.inner)]
    results = {}
    for layers in args.layers:
        torch.compiler.reset()
        results[layers] = interleaved(build_model(layers), names, args.steps)
    print(f"µs per decode step, batch {BATCH}, prompt {PROMPT}, width 64, CPU "
          f"({torch.get_num_threads()} thread(s)); ratio to {HF}; tokens identical")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
