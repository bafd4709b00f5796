"""pytest-benchmark suite of the throughput schedule: one decode step of an effective batch per
round, layer weights streamed from pinned CPU memory, micro-batched column order.

- ``test_cpu_throughput_step``: toy OPT (3 layers, width 64, batch 5 in 2 micro-batches) on the
  CPU, kvpr at ratio 1.0 and at ratio 0; runs everywhere (CI included, ``--benchmark-disable``
  runs it once) and checks the tokens against the uncompiled model, so the path cannot rot.
- ``test_gpu_throughput_step``: 4-layer fp16 OPT-6.7B/13B/30B shapes at prompt 256, effective
  batch 64 and 128, kvpr (planned split) and ratio 0; marked ``cuda``. ``extra_info`` carries
  tokens/s and the step's link limit (streamed weight bytes + cache bytes loaded, over the
  measured H2D bandwidth), so the JSON holds the ratio to the physical limit.

    pytest benchmarks/test_bench_throughput.py -m cuda --benchmark-columns=median,iqr,rounds
"""
from __future__ import annotations

import pytest
import torch

from kvpr_compile.bench import configs as cf
from kvpr_compile.bench.loop import GreedyDecoder
from kvpr_compile.hf import KVPRCache
from kvpr_compile.runtime import traffic
from kvpr_compile.runtime.weight_stream import stream_weights

CUDA = torch.cuda.is_available()
PROMPT, WARMUP_STEPS = 256, 2


def _decoder(model, ratio, micro_batches, batch, max_seq_len, dtype, device, profile=None):
    options = {"schedule": "throughput", "micro_batches": micro_batches}
    if ratio is not None:
        options["ratio"] = ratio
    if profile is not None:
        options["profile"] = profile
    torch.compiler.reset()
    forward = torch.compile(model.forward, backend="kvpr", dynamic=True, options=options)
    cache = KVPRCache(model.config, batch_size=batch, max_seq_len=max_seq_len, dtype=dtype,
                      device=device)
    return GreedyDecoder(model, forward, cache)


@pytest.mark.parametrize("ratio", [0.0, 1.0], ids=["r0", "r1"])
def test_cpu_throughput_step(benchmark, ratio):
    spec = cf.CPU_MODELS["opt-6.7b"]
    model = cf.build_model(spec, 3, dtype=torch.float32, device="cpu", max_positions=64)
    ids = torch.randint(3, spec.vocab_size, (5, 12), generator=torch.Generator().manual_seed(0))
    ref = GreedyDecoder(model, model.forward, KVPRCache(model.config, 5, 64))
    ref.prefill(ids)
    stream_weights(model)
    decoder = _decoder(model, ratio, 2, 5, 64, torch.float32, "cpu")
    decoder.prefill(ids)
    for _ in range(WARMUP_STEPS):
        decoder.step()
        ref.step()
    benchmark.pedantic(decoder.step, rounds=3, iterations=1)
    while len(ref._tokens) < len(decoder._tokens):
        ref.step()
    assert torch.equal(decoder.tokens(), ref.tokens())


GPU_CASES = [(m, b) for m in ("opt-6.7b", "opt-13b", "opt-30b") for b in (64, 128)]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("ratio", [0.0, None], ids=["r0", "kvpr"])
@pytest.mark.parametrize("model_name,batch", GPU_CASES)
def test_gpu_throughput_step(benchmark, model_name, batch, ratio):
    from kvpr_compile.plan.measure import measure
    device, dtype = torch.device("cuda"), torch.float16
    profile = measure(device)
    spec = cf.GPU_MODELS[model_name]
    model = cf.build_model(spec, 4, dtype=dtype, device=device, max_positions=PROMPT + 64)
    stream = stream_weights(model)
    ids = torch.randint(3, spec.vocab_size, (batch, PROMPT),
                        generator=torch.Generator().manual_seed(batch)).to(device)
    decoder = _decoder(model, ratio, None, batch, PROMPT + 64, dtype, device, profile)
    decoder.prefill(ids)
    for _ in range(WARMUP_STEPS):
        decoder.step()

    def step():
        decoder.step()
        torch.cuda.synchronize()

    with traffic.counting() as counted:
        benchmark.pedantic(step, rounds=8, iterations=1, warmup_rounds=1)
    steps = 9
    limit_s = (stream.bytes_on_host() + counted.bytes / steps) / profile.h2d_bytes_per_s
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(tokens_per_s=batch / median, limit_s=limit_s,
                                ratio_to_limit=median / limit_s,
                                h2d_gbps=profile.h2d_bytes_per_s / 1e9)
