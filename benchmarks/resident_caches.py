"""The resident (GPU-only) decode step under three Hugging Face caches, timed in one process.

The first GPU run (H100, transformers 5.17) timed the bench's resident contender, which then
used ``DynamicCache(config=...)`` and ran first in its process, at 68-80 ms per step for a
Llama-7B-like model with 8 layers at batch 16, prompt 1024; timed here in one process, in this
order, it was 44.3 ms with ``DynamicCache(config=...)``, 6.1 ms with ``DynamicCache()`` and 7.1 ms
with ``StaticCache``. ``--order`` reverses the order, to tell the cache from the position.

    python -m benchmarks.resident_caches [--model llama-7b] [--batch 16] [--prompt 1024]
        [--order reversed]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvpr_compile.bench.configs import GPU_MODELS, build_model


def step_ms(model, cache, ids: torch.Tensor, steps: int = 10, warmup: int = 2
            ) -> tuple[float, float]:
    """Median (device ms, host ms) of greedy decode steps after ``warmup`` untimed ones."""
    with torch.no_grad():
        nxt = model(input_ids=ids, past_key_values=cache, use_cache=True,
                    logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        device, host = [], []
        for _ in range(steps + warmup):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            end.record()
            host.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
            device.append(start.elapsed_time(end))
    return statistics.median(device[warmup:]), statistics.median(host[warmup:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-7b", choices=sorted(GPU_MODELS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--order", choices=("as-listed", "reversed"), default="as-listed")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("resident_caches: needs CUDA")
        return 2
    from transformers import DynamicCache, StaticCache
    spec = GPU_MODELS[args.model]
    model = build_model(spec, args.layers, dtype=torch.float16, device="cuda",
                        max_positions=args.prompt + 64)
    config = model.config
    ids = torch.randint(0, spec.vocab_size, (args.batch, args.prompt), device="cuda")
    caches = [("DynamicCache(config=...)", lambda: DynamicCache(config=config)),
              ("DynamicCache()", DynamicCache),
              ("StaticCache", lambda: StaticCache(config=config, max_cache_len=args.prompt + 16))]
    if args.order == "reversed":
        caches.reverse()
    for name, make in caches:
        device_ms, host_ms = step_ms(model, make(), ids)
        print(f"{name:26s} device {device_ms:7.2f} ms  host {host_ms:7.2f} ms per step", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
