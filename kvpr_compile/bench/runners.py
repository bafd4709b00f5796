"""One function per contender; each runs the same greedy decode and returns a ``RunResult``.

- ``run_resident``      eager model, HF ``DynamicCache`` on the device (the GPU-resident ceiling;
                        its tokens are the reference)
- ``run_hf_offloaded``  eager model, ``DynamicCache(config=..., offloading=True)`` (what
                        ``generate(cache_implementation="offloaded")`` builds); CUDA only
- ``run_kvpr``          ``model.forward`` compiled with ``backend="kvpr"`` over a ``KVPRCache``;
                        ``ratio=0.0`` is prefetch only (the baseline), ``ratio=None`` lets the
                        scheduler pick per-layer ratios from ``env.profile``

The ``*_decoder`` builders (cache + forward, nothing run yet) are shared with the pytest-benchmark
suites. Timing: the prefill and every decode step are timed (timing.py); the first
``env.warmup`` decode steps (where Dynamo compiles) are reported apart, the rest are the
measurement. With ``env.trace_dir`` the kvpr runs decode ``env.trace_steps`` more steps under
torch.profiler and write ``<case>-<contender>.json`` plus a stream timeline PNG (timeline.py).
Each kvpr run starts and ends with ``torch.compiler.reset()``, so runs never share graphs.
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import report as kvpr_report
from ..plan.profile import HardwareProfile
from .configs import CONTENDERS, HF_OFFLOADED, KVPR_R0, KVPR_SCHED, RESIDENT, Case  # noqa: F401
from .loop import GreedyDecoder
from .timing import step_timer, summarize


@dataclass
class BenchEnv:
    device: torch.device
    dtype: torch.dtype
    profile: HardwareProfile           # handed to the scheduler (kvpr-sched)
    h2d_bytes_per_s: float             # for the physical limit: measured pinned H2D on CUDA
    h2d_source: str = "measured"
    warmup: int = 2
    inner: str | None = None          # None: the backend's default
    overlap: str | None = None
    trace_dir: Path | None = None
    trace_steps: int = 3
    seed: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class RunResult:
    name: str
    status: str = "ok"                 # "ok" | "skipped" | "error"
    reason: str = ""
    tokens: torch.Tensor | None = None # (batch, new_tokens), CPU
    step_ms: list[float] = field(default_factory=list)     # timed decode steps
    host_ms: list[float] = field(default_factory=list)     # the host's part of them (timing.py)
    warmup_ms: list[float] = field(default_factory=list)
    prefill_ms: float | None = None
    pasts: list[int] = field(default_factory=list)         # cached tokens before each timed step
    ratios: list[float] | None = None  # per-layer split ratio of the decode graph (kvpr)
    ratio_source: str = ""
    plan: str = ""
    trace: dict | None = None
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def ms(self) -> float | None:
        return statistics.median(self.step_ms) if self.ok and self.step_ms else None

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "reason": self.reason,
                "ms_per_step": summarize(self.step_ms), "step_ms": self.step_ms,
                "host_ms_per_step": summarize(self.host_ms), "host_ms": self.host_ms,
                "warmup_ms": self.warmup_ms, "prefill_ms": self.prefill_ms, "pasts": self.pasts,
                "ratios": self.ratios, "ratio_source": self.ratio_source, "plan": self.plan,
                "trace": self.trace, "wall_s": self.wall_s}


def skipped(name: str, reason: str) -> RunResult:
    return RunResult(name, status="skipped", reason=reason)


def empty_host_cache() -> str:
    """Return the pinned host blocks torch's caching host allocator keeps; says which call did.

    ``torch.accelerator.empty_host_cache`` is public from torch 2.13 on; torch 2.11 (the lent GPU
    image) lacks it, and there the same allocator is emptied by ``torch._C._host_emptyCache``
    (bound in CUDA builds since 2.5; absent from CPU wheels, where nothing is pinned)."""
    if not torch.cuda.is_available():
        return "nothing (no CUDA: nothing is pinned)"
    public = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if public is not None:
        public()
        return "torch.accelerator.empty_host_cache"
    private = getattr(torch._C, "_host_emptyCache", None)
    if private is not None:
        private()
        return "torch._C._host_emptyCache"
    return "none (this torch has no call that empties the pinned host cache)"


def pinned_bytes() -> int | None:
    """Pinned host bytes held by torch's caching host allocator (None where torch cannot say)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_available():
        return None
    return int(stats().get("allocated_bytes.current", 0))   # blocks the allocator holds


def free_memory(device: torch.device, host: bool = False) -> None:
    """Collect garbage and return cached device memory; ``host=True`` also returns the pinned
    host blocks torch caches (sized in powers of two, so blocks of one case rarely fit the next;
    kept between the contenders of a case, whose caches have the same sizes)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        if host:
            how = empty_host_cache()
            left = pinned_bytes()
            if left is not None:
                print(f"  pinned host memory after {how}: {left / 2**30:.2f} GiB",
                      file=sys.stderr, flush=True)


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _decode(name: str, decoder: GreedyDecoder, input_ids: torch.Tensor, case: Case,
            env: BenchEnv, trace: bool = False) -> RunResult:
    started = time.perf_counter()
    steps = case.new_tokens - 1
    if steps <= env.warmup:
        raise ValueError(f"{case.label}: {case.new_tokens} new tokens leave no timed step after "
                         f"the prefill and {env.warmup} warm-up steps")
    timer = step_timer(env.device)
    timer.start()
    decoder.prefill(input_ids)
    timer.stop()
    for _ in range(steps):
        timer.start()
        decoder.step()
        timer.stop()
    times = timer.times_ms()
    result = RunResult(name, tokens=decoder.tokens(), prefill_ms=times[0],
                       warmup_ms=times[1:1 + env.warmup], step_ms=times[1 + env.warmup:],
                       host_ms=timer.host_ms()[1 + env.warmup:],
                       pasts=[case.prompt + j for j in range(env.warmup, steps)])
    if trace and env.trace_dir is not None:
        result.trace = _trace(decoder, env, f"{case.slug}-{name}", f"{case.label}: {name}")
    result.wall_s = time.perf_counter() - started
    return result


def _trace(decoder: GreedyDecoder, env: BenchEnv, stem: str, title: str) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    from .timeline import write_timeline
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.cuda else [])
    env.trace_dir.mkdir(parents=True, exist_ok=True)
    path = env.trace_dir / f"{stem}.json"
    with profile(activities=activities) as prof:
        for i in range(env.trace_steps):
            with record_function(f"decode step {i}"):
                decoder.step()
        if env.cuda:
            torch.cuda.synchronize(env.device)
    prof.export_chrome_trace(str(path))
    return {"json": str(path), **write_timeline(path, env.trace_dir / f"{stem}.png", title)}


def resident_decoder(model) -> GreedyDecoder:
    """Eager over a lazily built ``DynamicCache()`` (the bench's models have full attention in
    every layer). Protocol 2 times ``DynamicCache(config)`` and ``StaticCache`` apart, each in
    its own process (docs/design.md, "Benchmark protocol 2", says why)."""
    from transformers import DynamicCache
    return GreedyDecoder(model, model.forward, DynamicCache())


def warm_up(model, input_ids: torch.Tensor, steps: int = 3) -> None:
    """An untimed resident decode at a case's sizes, before any contender is timed: a process's
    first decode pays for lazy kernel loading, library handles and the allocator's first growth,
    which would otherwise land on whichever contender runs first."""
    decoder = resident_decoder(model)
    decoder.prefill(input_ids)
    for _ in range(steps):
        decoder.step()


def hf_offloaded_decoder(model) -> GreedyDecoder:
    from transformers import DynamicCache
    cache = DynamicCache(config=_text_config(model), offloading=True)
    return GreedyDecoder(model, model.forward, cache)


def backend():
    """``"kvpr"`` (the entry point users get), or the backend function itself when this checkout
    is imported without being installed (no entry point, e.g. a repo copied to a GPU box)."""
    if "kvpr" in torch.compiler.list_backends(exclude_tags=()):
        return "kvpr"
    from ..backend import kvpr_backend
    return kvpr_backend


def kvpr_decoder(model, env: BenchEnv, ratio: float | None, batch: int, max_seq_len: int
                 ) -> GreedyDecoder:
    """``model.forward`` compiled by the kvpr backend (``ratio=None``: the scheduler's split
    from ``env.profile``) over a fresh ``KVPRCache``. Compiles lazily, on the first call."""
    from ..hf import KVPRCache
    # resident_ratio 0: the offloaded contenders keep the whole cache in CPU memory
    options: dict = {"profile": env.profile, "resident_ratio": 0.0}
    if env.inner:
        options["inner"] = env.inner
    if ratio is not None:
        options["ratio"] = float(ratio)
    if env.overlap:
        options["overlap"] = env.overlap
    forward = torch.compile(model.forward, backend=backend(), options=options)
    cache = KVPRCache(model.config, batch_size=batch, max_seq_len=max_seq_len, dtype=env.dtype,
                      device=env.device)
    return GreedyDecoder(model, forward, cache)


def run_resident(model, input_ids: torch.Tensor, case: Case, env: BenchEnv) -> RunResult:
    return _decode(RESIDENT, resident_decoder(model), input_ids, case, env)


def run_hf_offloaded(model, input_ids: torch.Tensor, case: Case, env: BenchEnv) -> RunResult:
    if not env.cuda:
        return skipped(HF_OFFLOADED, "needs CUDA (HF's offloaded cache prefetches on CUDA streams)")
    return _decode(HF_OFFLOADED, hf_offloaded_decoder(model), input_ids, case, env)


def run_kvpr(model, input_ids: torch.Tensor, case: Case, env: BenchEnv,
             ratio: float | None) -> RunResult:
    name = KVPR_R0 if ratio == 0 else KVPR_SCHED if ratio is None else f"kvpr-{ratio:g}"
    torch.compiler.reset()
    first = len(kvpr_report.reports())
    try:
        room = env.trace_steps if env.trace_dir is not None else 0
        decoder = kvpr_decoder(model, env, ratio, case.batch,
                               case.prompt + case.new_tokens + room)
        result = _decode(name, decoder, input_ids, case, env, trace=True)
        rep = kvpr_report.decode_graph_report(kvpr_report.reports()[first:])
        if rep is None:
            result.reason = "no decode graph was rewritten by the kvpr backend"
        else:
            result.ratios = [e.ratio for e in sorted(rep.layers, key=lambda e: e.layer)]
            result.ratio_source = rep.ratio_source
            result.plan = str(rep.plan) if rep.plan is not None else ""
        return result
    finally:
        torch.compiler.reset()


def run_contender(name: str, model, input_ids: torch.Tensor, case: Case, env: BenchEnv
                  ) -> RunResult:
    if name == RESIDENT:
        return run_resident(model, input_ids, case, env)
    if name == HF_OFFLOADED:
        return run_hf_offloaded(model, input_ids, case, env)
    if name == KVPR_R0:
        return run_kvpr(model, input_ids, case, env, ratio=0.0)
    if name == KVPR_SCHED:
        return run_kvpr(model, input_ids, case, env, ratio=None)
    raise ValueError(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)}")
