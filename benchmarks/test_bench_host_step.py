"""pytest-benchmark: host µs per decode step on the CPU (tiny dims, batch 1, prompt 32), per
contender of ``host_step.py`` (uncompiled HF DynamicCache, uncompiled KVPRCache, kvpr default, at
ratio 0 and 1, each inner).

With benchmarking disabled (the default run) every case still decodes and asserts tokens equal to
uncompiled HF; the 32-layer compiled cases, the inductor-backed inners (C++ compiles on CPU) and
``kvpr-eager`` (the default inner spelled out: untimed, the same run as ``kvpr``) run only with
``--benchmark-enable`` or ``--run-slow``. The side-by-side ratio table comes from
one interleaved run: ``python -m benchmarks.host_step``.

    python -m pytest benchmarks/test_bench_host_step.py --benchmark-enable
        --benchmark-group-by=param:layers
"""
from __future__ import annotations

import functools

import pytest
import torch

from benchmarks import host_step as hs

ROUNDS = 20
INNERS = ("eager", "inductor", "piecewise")
CONTENDERS = (hs.HF, hs.UNCOMPILED, hs.DEFAULT, *hs.RATIOS, *(f"kvpr-{i}" for i in INNERS))
HEAVY = {"kvpr-inductor", "kvpr-piecewise"}
DEFAULT_INNER = "kvpr-eager"   # the default inner spelled out: untimed, the same run as kvpr's


@functools.lru_cache(maxsize=1)
def _model(layers: int):
    return hs.build_model(layers)


@functools.lru_cache(maxsize=2)
def _reference(layers: int, steps: int) -> torch.Tensor:
    d = hs.decoder(hs.HF, _model(layers), steps)
    with torch.no_grad():
        d.prefill(hs.prompt_ids(_model(layers)))
        for _ in range(steps):
            d.step()
    return d.tokens()


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("layers", [8, 32])
def test_host_step(benchmark, request, layers, contender):
    heavy = contender in HEAVY or (layers == 32 and contender not in (hs.HF, hs.UNCOMPILED))
    if benchmark.disabled and not request.config.getoption("--run-slow", default=False):
        if heavy:
            pytest.skip("compiles for long on CPU: run with --benchmark-enable or --run-slow")
        if contender == DEFAULT_INNER:
            pytest.skip("untimed, the same run as kvpr's: run with --benchmark-enable or "
                        "--run-slow")
    torch.compiler.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rounds = ROUNDS if benchmark.enabled else 1
        steps = hs.WARMUP + rounds + 1
        d = hs.decoder(contender, _model(layers), steps)
        with torch.no_grad():
            d.prefill(hs.prompt_ids(_model(layers)))
            for _ in range(hs.WARMUP):
                d.step()
            benchmark.group = f"{layers} layers"
            benchmark.extra_info.update(layers=layers, batch=hs.BATCH, prompt=hs.PROMPT)
            benchmark.pedantic(d.step, rounds=rounds, iterations=1,
                               warmup_rounds=1 if benchmark.enabled else 0)
        got = d.tokens()
        assert torch.equal(got, _reference(layers, got.shape[1] - 1))
    finally:
        torch.set_num_threads(threads)
        torch.compiler.reset()
