"""pytest-benchmark suites: one greedy decode step per round, per contender.

- ``test_cpu_decode_step``: a toy Llama (2 layers, width 64) compiled with ``backend="kvpr"`` at
  the scheduler's ratio on the CPU. Runs everywhere, including CI with ``--benchmark-disable``
  (the step then runs once), and checks the tokens against eager decoding so the path cannot rot.
- ``test_gpu_decode_step``: 8-layer fp16 OPT-6.7B / Llama-7B / Llama-3-8B shapes, each contender
  of the one-run comparison (resident, HF offloaded, kvpr ratio 0, kvpr scheduled); marked
  ``cuda`` and skipped without a CUDA device. Each round is one decode step with a device sync.
  After timing, the tokens it produced are checked against the eager, GPU-resident model fed the
  same tokens (``eager_agrees``: fp16 tolerance 2e-2, as in tests/test_cuda_runtime.py).

    pytest benchmarks -m cuda --benchmark-columns=median,iqr,rounds   # on a GPU box
"""
from __future__ import annotations

import functools

import pytest
import torch

from kvpr_compile import reports
from kvpr_compile.report import decode_graph_report
from kvpr_compile.bench import configs as cf
from kvpr_compile.bench.runners import (CONTENDERS, HF_OFFLOADED, KVPR_R0, KVPR_SCHED, RESIDENT,
                                        BenchEnv, hf_offloaded_decoder,
                                        kvpr_decoder, resident_decoder)
from kvpr_compile.plan.presets import preset
from kvpr_compile.plan.resolve import resolve_profile

CUDA = torch.cuda.is_available()
ROUNDS, WARMUP_ROUNDS, COMPILE_STEPS = 10, 2, 2
GPU_CASES = [("llama-7b", 16, 1024), ("opt-6.7b", 32, 256), ("llama-3-8b", 16, 1024)]


def _decoder(name: str, model, env: BenchEnv, batch: int, max_seq_len: int):
    if name == RESIDENT:
        return resident_decoder(model)
    if name == HF_OFFLOADED:
        return hf_offloaded_decoder(model)
    return kvpr_decoder(model, env, 0.0 if name == KVPR_R0 else None, batch, max_seq_len)


def _prompt(vocab: int, batch: int, prompt: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch * 7919 + prompt)
    return torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)


@torch.no_grad()
def eager_agrees(model, ids: torch.Tensor, tokens: torch.Tensor, tol: float) -> None:
    """Teacher-forced check of generated ``tokens`` (batch, n): the eager model with a resident
    cache reads the prompt and then these same tokens; at every step each row's token must be
    eager's argmax wherever eager's top-2 margin exceeds ``tol`` * max |logit| (closer calls may
    go either way in reduced precision). Fails if no position was decided at all."""
    decoder = resident_decoder(model)
    kwargs = {decoder.cache_kw: decoder.cache, "use_cache": True}
    if decoder.keep:   # only the last position's logits (a 1024-token prompt x 32k vocab is big)
        kwargs["logits_to_keep"] = 1
    logits = model(input_ids=ids, **kwargs).logits[:, -1].float()
    checked = 0
    for j in range(tokens.shape[1]):
        got = tokens[:, j].to(logits.device)
        top2 = logits.topk(2, dim=-1).values
        sure = (top2[:, 0] - top2[:, 1]) > tol * logits.abs().max()
        mismatch = (logits.argmax(-1) != got) & sure
        assert not mismatch.any(), (f"step {j}: rows {mismatch.nonzero().flatten().tolist()} "
                                    "differ from eager")
        checked += int(sure.sum())
        if j + 1 < tokens.shape[1]:
            logits = model(input_ids=got[:, None], **kwargs).logits[:, -1].float()
    assert checked > 0, "every position was a near-tie: nothing was checked"


def test_cpu_decode_step(benchmark):
    torch.compiler.reset()
    spec = cf.CPU_MODELS["llama-7b"]
    model = cf.build_model(spec, 2, dtype=torch.float32, device="cpu", max_positions=64)
    env = BenchEnv(device=torch.device("cpu"), dtype=torch.float32,
                   profile=preset("h200-pcie5"), h2d_bytes_per_s=55e9)
    prompt = 24  # not head_dim (16): a prompt that long makes RoPE's token dim ambiguous
    ids = _prompt(spec.vocab_size, 2, prompt, "cpu")
    first = len(reports())
    decoder = _decoder(KVPR_SCHED, model, env, 2, prompt + 1 + COMPILE_STEPS + 2 * ROUNDS)
    decoder.prefill(ids)
    for _ in range(COMPILE_STEPS):
        decoder.step()
    benchmark.pedantic(decoder.step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    got = decoder.tokens()
    decode_graph = decode_graph_report(reports()[first:])
    assert decode_graph is not None and any(e.ratio > 0 for e in decode_graph.layers)
    reference = _decoder(RESIDENT, model, env, 2, 0)
    reference.prefill(ids)
    for _ in range(got.shape[1] - 1):
        reference.step()
    torch.compiler.reset()
    assert torch.equal(got, reference.tokens())
    eager_agrees(model, ids, got, tol=0.0)


@functools.lru_cache(maxsize=1)
def _gpu_model(name: str):
    return cf.build_model(cf.GPU_MODELS[name], cf.DEFAULT_LAYERS, dtype=torch.float16,
                          device="cuda", max_positions=8192)


@functools.lru_cache(maxsize=1)
def _gpu_profile():
    return resolve_profile("measure", device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("model_name,batch,prompt", GPU_CASES,
                         ids=[f"{m}-b{b}-p{p}" for m, b, p in GPU_CASES])
def test_gpu_decode_step(benchmark, model_name, batch, prompt, contender):
    torch.compiler.reset()
    model = _gpu_model(model_name)
    profile = _gpu_profile()
    env = BenchEnv(device=torch.device("cuda"), dtype=torch.float16, profile=profile,
                   h2d_bytes_per_s=profile.h2d_bytes_per_s)
    room = 1 + COMPILE_STEPS + WARMUP_ROUNDS + ROUNDS + 2
    decoder = _decoder(contender, model, env, batch, prompt + room)
    ids = _prompt(model.config.vocab_size, batch, prompt, "cuda")
    decoder.prefill(ids)
    for _ in range(COMPILE_STEPS):
        decoder.step()

    def step():
        decoder.step()
        torch.cuda.synchronize()

    benchmark.group = f"{model_name} b{batch} p{prompt}"
    benchmark.extra_info.update(model=model_name, batch=batch, prompt=prompt,
                                layers=cf.DEFAULT_LAYERS, contender=contender,
                                device=torch.cuda.get_device_name())
    try:
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
        tokens = decoder.tokens()
    finally:
        decoder = None   # frees its cache before empty_cache (step's cell holds None)
        torch.compiler.reset()
        torch.cuda.empty_cache()
    eager_agrees(model, ids, tokens, tol=2e-2)
