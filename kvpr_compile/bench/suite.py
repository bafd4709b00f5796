"""Run the cases: build each model once, run every contender per case, derive limits and targets.

A contender that fails (out of memory, an unsupported version...) is recorded as an error and the
run goes on; one progress line per case goes to ``progress`` (stderr), contender by contender.
Token agreement is the fraction of generated tokens equal to the reference run's (the resident
one when it ran): fp16 recompute may flip a near-tied argmax, after which a sequence diverges.
"""
from __future__ import annotations

import itertools
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from . import targets as tg
from .configs import Case, ModelSpec, build_model
from .limits import Limit, limit
from .prediction import predicted_ms
from .runners import (KVPR_R0, KVPR_SCHED, RESIDENT, HF_OFFLOADED, BenchEnv, RunResult,
                      free_memory, run_contender, warm_up)


@dataclass
class CaseResult:
    case: Case
    spec: ModelSpec
    layers: int
    runs: dict[str, RunResult]
    limits: dict[str, Limit] = field(default_factory=dict)   # KVPR_R0 / KVPR_SCHED
    predicted_ms: dict[str, float] = field(default_factory=dict)  # task graph, per kvpr run
    agreement: dict[str, float] = field(default_factory=dict)
    reference: str | None = None
    targets: list[tg.Target] = field(default_factory=list)
    wall_s: float = 0.0

    def ms(self, name: str) -> float | None:
        run = self.runs.get(name)
        return run.ms if run is not None else None

    @property
    def errors(self) -> list[RunResult]:
        return [r for r in self.runs.values() if r.status == "error"]

    def to_dict(self) -> dict:
        c, s = self.case, self.spec
        return {
            "model": c.model, "model_name": s.name, "family": s.family, "attention": s.attention,
            "hidden_size": s.hidden_size, "kv_hidden_size": s.kv_hidden_size,
            "layers": self.layers, "batch": c.batch, "prompt": c.prompt,
            "new_tokens": c.new_tokens, "kind": c.kind,
            "ms_per_step": {name: run.ms for name, run in self.runs.items()},
            "limits": {name: lim.to_dict() for name, lim in self.limits.items()},
            "predicted_ms": self.predicted_ms,
            "token_agreement": self.agreement, "reference": self.reference,
            "targets": [t.to_dict() for t in self.targets],
            "runs": {name: run.to_dict() for name, run in self.runs.items()},
            "wall_s": self.wall_s,
        }


def prompt_ids(case: Case, vocab: int, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + case.batch * 7919 + case.prompt)
    return torch.randint(0, vocab, (case.batch, case.prompt), generator=gen).to(device)


def _agreement(runs: dict[str, RunResult]) -> tuple[str | None, dict[str, float]]:
    done = [r for r in runs.values() if r.ok and r.tokens is not None]
    if not done:
        return None, {}
    ref = runs[RESIDENT] if RESIDENT in runs and runs[RESIDENT].ok else done[0]
    return ref.name, {r.name: (r.tokens == ref.tokens).float().mean().item() for r in done}


def finish(case: Case, spec: ModelSpec, layers: int, runs: dict[str, RunResult],
           env: BenchEnv) -> CaseResult:
    """Limits, agreement and targets (CUDA only) of one case from its runs."""
    result = CaseResult(case, spec, layers, runs)
    elem = torch.empty((), dtype=env.dtype).element_size()
    dims = dict(batch=case.batch, hidden=spec.hidden_size, kv_hidden=spec.kv_hidden_size,
                elem_bytes=elem, h2d_bytes_per_s=env.h2d_bytes_per_s)
    pasts = next((r.pasts for r in runs.values() if r.ok and r.pasts), None)
    if pasts:
        result.limits[KVPR_R0] = limit([0.0] * layers, pasts, **dims)
        sched = runs.get(KVPR_SCHED)
        if sched is not None and sched.ok and sched.ratios:
            result.limits[KVPR_SCHED] = limit(sched.ratios, pasts, **dims)
        shape = dict(batch=case.batch, hidden=spec.hidden_size, kv_hidden=spec.kv_hidden_size,
                     dtype=env.dtype, overlap=env.overlap)
        result.predicted_ms[KVPR_R0] = predicted_ms(env.profile, [0.0] * layers, pasts, **shape)
        if sched is not None and sched.ok and sched.ratios:
            result.predicted_ms[KVPR_SCHED] = predicted_ms(env.profile, sched.ratios, pasts,
                                                           **shape)
    result.reference, result.agreement = _agreement(runs)
    sched_limit = result.limits.get(KVPR_SCHED)
    if not env.cuda:
        return result  # CPU timings say nothing about the GPU targets
    result.targets = tg.evaluate(mha=spec.is_mha, batch=case.batch, prompt=case.prompt,
                                 sched_ms=result.ms(KVPR_SCHED), r0_ms=result.ms(KVPR_R0),
                                 hf_ms=result.ms(HF_OFFLOADED),
                                 sched_limit_ms=sched_limit.ms if sched_limit else None)
    return result


def _short(name: str) -> str:
    short = {RESIDENT: "resident", HF_OFFLOADED: "hf", KVPR_R0: "r0", KVPR_SCHED: "sched"}
    return short.get(name, name)


def _run_contenders(model, ids, case: Case, env: BenchEnv, contenders, build_error: str,
                    progress) -> tuple[dict[str, RunResult], list[str]]:
    """One case's contenders on a built model (each one's error recorded, the run goes on),
    printing each one's figure; returns (runs by name, tracebacks to print)."""
    runs: dict[str, RunResult] = {}
    failures: list[str] = []
    if model is not None and env.cuda:
        try:
            warm_up(model, ids)
        except Exception as exc:  # noqa: BLE001 - the contenders report their own errors
            print(f" (warm-up failed: {type(exc).__name__})", end="", file=progress)
        free_memory(env.device)
    for name in contenders:
        if model is None:
            runs[name] = RunResult(name, status="error", reason=build_error)
            continue
        try:
            runs[name] = run_contender(name, model, ids, case, env)
        except Exception as exc:  # noqa: BLE001
            runs[name] = RunResult(name, status="error", reason=f"{type(exc).__name__}: {exc}")
            failures.append(f"  {name}: " + traceback.format_exc(limit=-3))
        free_memory(env.device)
        run = runs[name]
        shown = f"{run.ms:.2f}" if run.ms is not None else run.status
        if run.ms is not None and run.host_ms and env.cuda:   # host-bound when close
            shown += f" (host {statistics.median(run.host_ms):.2f})"
        print(f" {_short(name)} {shown}", end="", file=progress, flush=True)
    return runs, failures


def run_suite(cases: list[Case], specs: dict[str, ModelSpec], env: BenchEnv, *, layers: int,
              contenders, progress=None, on_case=None) -> list[CaseResult]:
    """Every case in order; ``on_case(results so far)`` runs after each one (e.g. to save)."""
    progress = progress or sys.stderr
    results: list[CaseResult] = []
    total, index = len(cases), 0
    for model_key, group in itertools.groupby(cases, key=lambda c: c.model):
        group = list(group)
        spec = specs[model_key]
        longest = max(c.prompt + c.new_tokens for c in group) + env.trace_steps
        model, build_error = None, ""
        try:
            model = build_model(spec, layers, dtype=env.dtype, device=env.device, seed=env.seed,
                                max_positions=longest)
        except Exception as exc:  # noqa: BLE001 - reported per case, the run goes on
            build_error = f"building the model failed: {type(exc).__name__}: {exc}"
        for case in group:
            index += 1
            started = time.perf_counter()
            print(f"[{index}/{total}] {case.label} ({spec.attention}, {layers} layers):",
                  end="", file=progress, flush=True)
            ids = prompt_ids(case, spec.vocab_size, env.device, env.seed) \
                if model is not None else None
            runs, failures = _run_contenders(model, ids, case, env, contenders, build_error,
                                             progress)
            free_memory(env.device, host=True)
            result = finish(case, spec, layers, runs, env)
            result.wall_s = time.perf_counter() - started
            print(f" ms/step [{result.wall_s:.0f} s]", file=progress, flush=True)
            if build_error and case is group[0]:
                print(f"  {build_error}", file=progress)
            for text in failures:
                print(text.rstrip(), file=progress)
            results.append(result)
            if on_case is not None:
                on_case(list(results))
        del model
        free_memory(env.device, host=True)
    return results
