"""The contenders of benchmark protocol 2 and how each one decodes (one of them per process).

Every contender offers ``decode(timed)``: one full greedy decode of 1 + N tokens (the prefill's
token and N decode steps) over a cache of its own, built fresh for that decode. Three kinds:

- loop       ``model.forward`` (or its kvpr-compiled version) called per step by the bench's own
             loop (loop.py); CUDA events around each step, the host's enqueue time, and wall
             clock from the first step to the final sync
- generate   ``model.generate`` as its users run it; per-step figure (t(1+N) - t(1)) / N from
             two generate calls, each with a fresh cache (events and wall clock alike)
- copy       no model: the full K,V of every layer copied from pinned host memory into two
             device slots on a side stream, layer after layer, N steps with the cache growing
             by one token per step: what the link gives at ratio 0's bytes

``resident_static``  eager, ``StaticCache`` on the device
``resident_dynamic`` eager, ``DynamicCache(config=...)`` on the device
``hf_loop_offloaded`` eager, ``DynamicCache(config=..., offloading=True)`` (CUDA only)
``hf_generate_offloaded`` ``generate(cache_implementation="offloaded")`` (CUDA only)
``kvpr_ratio0`` / ``kvpr`` ``model.forward`` compiled with ``backend="kvpr"`` at ratio 0 / the
                   scheduler's split, over a ``KVPRCache``
``kvpr_generate``  ``model.generate`` with ``model.forward`` compiled as for ``kvpr`` and a
                   ``KVPRCache``
``copy_only``      the copy pipeline (on a CPU: plain copies, labelled as such)
``kvpr_resident_third`` / ``kvpr_resident_two_thirds``  as ``kvpr_ratio0`` with that share of
                   every layer's past resident on the device (``resident_ratio``): a budget of
                   one and two thirds of the cache. Opt-in (``--only``): not in the default run
``kvpr_cpu``       ``model.forward`` compiled with the plan's CPU share too (``cpu_ratio`` None:
                   the LP's from the profile's host attention rate), with recompute. Opt-in.
                   The other kvpr contenders pass ``cpu_ratio=0``: their yardsticks (T*, the
                   link floor) model no host attention
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .loop import GreedyDecoder
from .timing import step_timer

RESIDENT_STATIC, RESIDENT_DYNAMIC = "resident_static", "resident_dynamic"
HF_GENERATE, HF_LOOP = "hf_generate_offloaded", "hf_loop_offloaded"
KVPR_RATIO0, KVPR, KVPR_GENERATE, COPY_ONLY = "kvpr_ratio0", "kvpr", "kvpr_generate", "copy_only"
RESIDENT_THIRD, RESIDENT_TWO_THIRDS = "kvpr_resident_third", "kvpr_resident_two_thirds"
RESIDENT_SHARES = {RESIDENT_THIRD: 1 / 3, RESIDENT_TWO_THIRDS: 2 / 3}   # name -> resident_ratio
KVPR_CPU = "kvpr_cpu"
NAMES = (RESIDENT_STATIC, RESIDENT_DYNAMIC, HF_GENERATE, HF_LOOP, KVPR_RATIO0, KVPR,
         KVPR_GENERATE, COPY_ONLY)          # the default run
OPT_IN = (*RESIDENT_SHARES, KVPR_CPU)        # run only when named (--only)
COUNTED = (KVPR_RATIO0, KVPR, *RESIDENT_SHARES, KVPR_CPU)   # K,V bytes counted (protocol.py)
TRACED = (KVPR_RATIO0, KVPR, KVPR_CPU)   # a few steps profiled with --trace (step_trace.py)
ALL_NAMES = (*NAMES, *OPT_IN)
RESIDENTS = (RESIDENT_STATIC, RESIDENT_DYNAMIC)
OFFLOADED = (HF_GENERATE, HF_LOOP, KVPR_RATIO0, KVPR, KVPR_GENERATE, COPY_ONLY, KVPR_CPU)
KVPR_NAMES = (KVPR_RATIO0, KVPR, KVPR_GENERATE, KVPR_CPU)   # they record their split
CUDA_ONLY = {HF_GENERATE: "HF's offloaded cache prefetches on CUDA streams",
             HF_LOOP: "HF's offloaded cache prefetches on CUDA streams"}
# a near-tied argmax: top-2 logit margin below this share of the largest |logit|
NEAR_TIE = {"float16": 2e-2, "bfloat16": 4e-2, "float32": 1e-4}


@dataclass
class Decode:
    step_ms: list[float]                  # per timed step (generate: one per-step figure)
    host_ms: list[float] | None           # the host's enqueue time per step (loop only)
    wall_ms: float                        # wall clock over the N steps
    prefill_ms: float | None = None
    tokens: torch.Tensor | None = None    # (batch, 1 + N) on the CPU
    first_ties: list[int | None] | None = None
    extra: dict = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MarginDecoder(GreedyDecoder):
    """A GreedyDecoder that also records, per row, the first step whose argmax was near-tied."""

    def __init__(self, model, forward, cache, tie: float):
        super().__init__(model, forward, cache)
        self.tie, self.margins = tie, []

    def _call(self, ids):
        kwargs = {self.cache_kw: self.cache, "use_cache": True}
        if self.keep:
            kwargs["logits_to_keep"] = 1
        logits = self.forward(input_ids=ids, **kwargs).logits[:, -1].float()
        top = logits.topk(2, dim=-1).values
        self.margins.append((top[:, 0] - top[:, 1]) < self.tie * logits.abs().amax(-1))
        nxt = logits.argmax(-1, keepdim=True)
        self._tokens.append(nxt)
        return nxt

    def first_ties(self) -> list[int | None]:
        near = torch.stack(self.margins, dim=1).cpu()       # (batch, tokens)
        return [int(row.nonzero()[0]) if row.any() else None for row in near]


def loop_decode(model, forward, cache, ids, steps: int, device, tie: float | None = None,
                hook=None) -> Decode:
    """``hook(i)``, where given, is called before step i and once after the last (i = steps),
    outside the timed spans (step_trace.StepTrace)."""
    dec = MarginDecoder(model, forward, cache, tie) if tie is not None \
        else GreedyDecoder(model, forward, cache)
    t0 = time.perf_counter()
    dec.prefill(ids)
    sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    timer = step_timer(device)
    t0 = time.perf_counter()
    for i in range(steps):
        if hook is not None:
            hook(i)
        timer.start()
        dec.step()
        timer.stop()
    if hook is not None:
        hook(steps)
    sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    return Decode(step_ms=timer.times_ms(), host_ms=timer.host_ms(), wall_ms=wall_ms,
                  prefill_ms=prefill_ms, tokens=dec.tokens(),
                  first_ties=dec.first_ties() if tie is not None else None)


def _timed(fn, device) -> tuple[float, float, object]:
    """(device ms by events or perf_counter on a CPU, wall ms, result) of ``fn()``."""
    sync(device)
    t0 = time.perf_counter()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) * 1e3
        return start.elapsed_time(end), wall, out
    out = fn()
    wall = (time.perf_counter() - t0) * 1e3
    return wall, wall, out


def generate_decode(model, make_kwargs, ids, steps: int, device) -> Decode:
    """(t(1+N) - t(1)) / N, each generate call over a fresh cache from ``make_kwargs()``."""
    mask = torch.ones_like(ids)

    def gen(n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, **make_kwargs())
    ev1, wall1, _ = _timed(lambda: gen(1), device)
    evn, walln, out = _timed(lambda: gen(1 + steps), device)
    return Decode(step_ms=[(evn - ev1) / steps], host_ms=None, wall_ms=walln - wall1,
                  prefill_ms=ev1, tokens=out[:, ids.shape[1]:].cpu(),
                  extra={"t1_ms": ev1, "t1n_ms": evn})


class CopyPipeline:
    """Full K,V per layer, host -> two device slots, layer-ahead on a side stream."""

    def __init__(self, layers: int, batch: int, kv_hidden: int, max_len: int, dtype, device):
        self.device, self.layers = device, layers
        cuda = device.type == "cuda"
        self.host = torch.zeros((layers, max_len, batch, 2 * kv_hidden), dtype=dtype,
                                pin_memory=cuda)
        self.slots = [torch.empty((max_len, batch, 2 * kv_hidden), dtype=dtype, device=device)
                      for _ in range(2)]
        if cuda:
            self.stream = torch.cuda.Stream(device)
            self.done = [torch.cuda.Event() for _ in range(2)]
            self.free = [torch.cuda.Event() for _ in range(2)]

    def step(self, past: int) -> None:
        if self.device.type != "cuda":
            for i in range(self.layers):
                self.slots[i % 2][:past].copy_(self.host[i, :past])
            return
        compute = torch.cuda.current_stream(self.device)
        for i in range(self.layers):
            k = i % 2
            self.stream.wait_event(self.free[k])
            with torch.cuda.stream(self.stream):
                self.slots[k][:past].copy_(self.host[i, :past], non_blocking=True)
                self.done[k].record(self.stream)
            compute.wait_event(self.done[k])
            self.free[k].record(compute)


def copy_decode(pipe: CopyPipeline, prompt: int, steps: int, device) -> Decode:
    timer = step_timer(device)
    sync(device)
    t0 = time.perf_counter()
    for j in range(steps):
        timer.start()
        pipe.step(prompt + j)
        timer.stop()
    sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    return Decode(step_ms=timer.times_ms(), host_ms=timer.host_ms(), wall_ms=wall_ms)
