"""One contender in one process, by benchmark protocol 2 (the parent is rounds.py).

    python -m kvpr_compile.bench.protocol [--wait] SPEC.json OUT.json

(``--wait``: import everything, then wait for "go" on stdin before step 1; rounds.py starts
the next child that way while the current one runs.)

SPEC names the contender, the case (model key, layers, batch, prompt), N (``steps``), R
(``repeats``), dtype, device, seed and the run's one profile (a JSON path or preset name; never
measured here). The process:

1. builds the model with the fixed seed, and the prompt from the same seed;
2. decodes once in full, untimed, over a cache of its own (compiles, loads kernels, grows the
   device and pinned-host allocators); the resident contenders record there where their argmax
   was near-tied (what fp16 may flip elsewhere);
3. drops that cache, runs ``gc.collect()`` and synchronises, emptying no allocator cache;
4. snapshots the counters (counters.py), runs R timed decodes, each over a fresh cache, and
   snapshots them again: any growth marks the window not clean;
5. kvpr's loop contenders decode once more, untimed, under the traffic counter: the K,V bytes
   the runtime loaded per step, for the check against the yardstick's bytes; with a
   ``trace_dir``, the traced ones (``contenders.TRACED``) decode once more in round 1 with their
   last ``trace_steps`` steps under the profiler (step_trace.py);
6. writes every raw number to OUT.json (step times per repeat, host times, wall clocks, the
   first repeat's tokens, the kvpr split, the counted bytes, the counters, versions), or
   ``status`` "absent" / "error" with the reason.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import torch

from . import contenders as ct
from .counters import snapshot, window


def prompt_ids(vocab: int, batch: int, prompt: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 7919 + prompt)
    return torch.randint(0, vocab, (batch, prompt), generator=gen)


def _spec_model(spec: dict):
    from .configs import CPU_MODELS, GPU_MODELS
    return (CPU_MODELS if spec.get("cpu") else GPU_MODELS)[spec["model"]]


def weight_bytes_read(model) -> int:
    """Parameter bytes a decode step reads: all but the input embedding table (a step gathers
    b rows of it), unless the output projection shares that table."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and out.weight is emb.weight:
        return total
    return total - emb.weight.numel() * emb.weight.element_size()


def _kvpr_forward(model, spec: dict, ratio: float | None, resident: float = 0.0,
                  cpu: float | None = 0.0):
    from ..plan.resolve import resolve_profile
    from .runners import backend
    # resident_ratio 0: the offloaded contenders keep the whole cache in CPU memory; cpu_ratio
    # 0: all attention on the device (None: the plan's CPU share, kvpr_cpu)
    options: dict = {"profile": resolve_profile(spec["profile"]), "resident_ratio": resident,
                     "cpu_ratio": cpu}
    for key in ("inner", "overlap"):
        if spec.get(key):
            options[key] = spec[key]
    if ratio is not None:
        options["ratio"] = float(ratio)
    return torch.compile(model.forward, backend=backend(), options=options)


def _decoder(spec: dict, device: torch.device, dtype: torch.dtype):
    """(decode(with_margins) -> Decode, facts) for the spec's contender."""
    name, steps = spec["contender"], spec["steps"]
    total = spec["prompt"] + steps + 1
    model_spec = _spec_model(spec)
    if name == ct.COPY_ONLY:
        pipe = ct.CopyPipeline(spec["layers"], spec["batch"], model_spec.kv_hidden_size, total,
                               dtype, device)
        facts = {"note": "" if device.type == "cuda" else "CPU: plain copies, no link"}
        return (lambda margins: ct.copy_decode(pipe, spec["prompt"], steps, device)), facts
    from transformers import DynamicCache, StaticCache

    from ..hf import KVPRCache, cache_kwargs
    from .configs import build_model
    model = build_model(model_spec, spec["layers"], dtype=dtype, device=device,
                        seed=spec["seed"], max_positions=total + 1)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    ids = prompt_ids(model_spec.vocab_size, spec["batch"], spec["prompt"], spec["seed"])
    ids = ids.to(device)
    config = model.config
    facts = {"weight_bytes": weight_bytes_read(model)}
    tie = ct.NEAR_TIE.get(spec["dtype"], 2e-2)

    def kvpr_cache():
        return KVPRCache(config, batch_size=spec["batch"], max_seq_len=total, dtype=dtype,
                         device=device)
    if name in (ct.RESIDENT_STATIC, ct.RESIDENT_DYNAMIC, ct.HF_LOOP):
        make = {ct.RESIDENT_STATIC: lambda: StaticCache(config=config, max_cache_len=total),
                ct.RESIDENT_DYNAMIC: lambda: DynamicCache(config=config),
                ct.HF_LOOP: lambda: DynamicCache(config=config, offloading=True)}[name]
        resident = name in ct.RESIDENTS
        return (lambda margins: ct.loop_decode(model, model.forward, make(), ids, steps, device,
                                               tie if margins and resident else None)), facts
    if name in (ct.KVPR_RATIO0, ct.KVPR):
        forward = _kvpr_forward(model, spec, 0.0 if name == ct.KVPR_RATIO0 else None)
        return (lambda margins, hook=None: ct.loop_decode(model, forward, kvpr_cache(), ids,
                                                          steps, device, hook=hook)), facts
    if name == ct.KVPR_CPU:
        forward = _kvpr_forward(model, spec, None, cpu=None)
        return (lambda margins, hook=None: ct.loop_decode(model, forward, kvpr_cache(), ids,
                                                          steps, device, hook=hook)), facts
    if name in ct.RESIDENT_SHARES:
        forward = _kvpr_forward(model, spec, 0.0, ct.RESIDENT_SHARES[name])
        return (lambda margins: ct.loop_decode(model, forward, kvpr_cache(), ids, steps,
                                               device)), facts
    if name == ct.HF_GENERATE:
        return (lambda margins: ct.generate_decode(
            model, lambda: {"cache_implementation": "offloaded"}, ids, steps, device)), facts
    if name == ct.KVPR_GENERATE:
        model.forward = _kvpr_forward(model, spec, None)
        return (lambda margins: ct.generate_decode(
            model, lambda: cache_kwargs(model, kvpr_cache()), ids, steps, device)), facts
    raise ValueError(f"unknown contender {name!r}; known: {', '.join(ct.ALL_NAMES)}")


def _split(spec: dict, dtype) -> dict:
    """The decode graph's per-layer ratios and CPU shares, and the cost model's step for that
    split at the timed steps' median past (the run's profile: what the plan promised)."""
    from .. import report
    from ..plan.resolve import resolve_profile
    from .prediction import predicted_ms
    from .yardsticks import median_past
    rep = report.decode_graph_report(report.reports())
    if rep is None:
        return {"split": None}
    layers = sorted(rep.layers, key=lambda e: e.layer)
    ratios, cpu = [e.ratio for e in layers], [e.cpu for e in layers]
    model = _spec_model(spec)
    predicted = predicted_ms(resolve_profile(spec["profile"]), ratios,
                             [median_past(spec["prompt"], spec["steps"])], batch=spec["batch"],
                             hidden=model.hidden_size, kv_hidden=model.kv_hidden_size,
                             dtype=dtype, overlap=spec.get("overlap"), cpu_ratios=cpu)
    return {"split": ratios, "cpu_split": cpu, "predicted_ms": predicted}


def _counted_kv_bytes(decode) -> int:
    """K,V bytes the runtime loads from the store over one more, untimed decode."""
    from ..runtime import traffic
    with traffic.counting() as counted:
        decode(False)
    return counted.by_kind["kv"]


def _traced(decode, spec: dict, device) -> dict:
    """The last ``trace_steps`` steps of one more, untimed decode under the profiler
    (step_trace.py); the numbers of its timeline."""
    from pathlib import Path

    from .step_trace import StepTrace
    count = min(int(spec.get("trace_steps") or 3), spec["steps"])
    path = Path(spec["trace_dir"]) / f"case{spec.get('case', 0)}-{spec['contender']}.json"
    trace = StepTrace(path, spec["steps"] - count, count, device.type == "cuda")
    decode(False, hook=trace)
    return trace.stats or {"note": "the trace did not finish"}


def versions() -> dict:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def run_spec(spec: dict) -> dict:
    """The protocol for one contender in this process; never raises (errors are recorded)."""
    started = time.perf_counter()
    name = spec["contender"]
    out = {"contender": name, "status": "ok", "reason": "", "spec": spec, "pid": os.getpid(),
           **versions()}
    device = torch.device(spec["device"])
    if device.type != "cuda" and name in ct.CUDA_ONLY:
        return {**out, "status": "absent", "reason": f"needs CUDA ({ct.CUDA_ONLY[name]})"}
    try:
        dtype = getattr(torch, spec["dtype"])
        decode, facts = _decoder(spec, device, dtype)
        out.update(facts)
        t0 = time.perf_counter()
        warm = decode(True)                          # untimed: compiles, grows the allocators
        out["warm_s"] = time.perf_counter() - t0
        out["first_ties"] = warm.first_ties
        del warm
        gc.collect()
        ct.sync(device)
        before = snapshot(device)
        runs = [decode(False) for _ in range(spec["repeats"])]
        out["counters"] = window(before, snapshot(device))
        out["kind"] = "generate" if name in (ct.HF_GENERATE, ct.KVPR_GENERATE) else \
            "copy" if name == ct.COPY_ONLY else "loop"
        out["step_ms"] = [r.step_ms for r in runs]
        out["host_ms"] = [r.host_ms for r in runs] if runs[0].host_ms is not None else None
        out["wall_ms"] = [r.wall_ms for r in runs]
        out["prefill_ms"] = [r.prefill_ms for r in runs]
        out["extra"] = [r.extra for r in runs]
        out["tokens"] = runs[0].tokens.tolist() if runs[0].tokens is not None else None
        if name in ct.KVPR_NAMES:
            out.update(_split(spec, dtype))
        if name in ct.COUNTED:   # after the window: the counter's bookkeeping is not timed
            out["kv_bytes_counted_per_step"] = _counted_kv_bytes(decode) / spec["steps"]
        if spec.get("trace_dir") and name in ct.TRACED and spec.get("round", 1) == 1:
            out["trace"] = _traced(decode, spec, device)
    except Exception as exc:  # noqa: BLE001 - the parent records the reason
        out.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(limit=-6))
    out["wall_s"] = time.perf_counter() - started
    return out


def preimport() -> None:
    """What every contender imports anyway, before it may touch the device (no CUDA call)."""
    import transformers  # noqa: F401
    from transformers import DynamicCache, StaticCache  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from transformers.models.opt import modeling_opt  # noqa: F401

    from .. import backend, hf  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wait = bool(argv) and argv[0] == "--wait"
    argv = argv[1:] if wait else argv
    if len(argv) != 2:
        print("usage: python -m kvpr_compile.bench.protocol [--wait] SPEC.json OUT.json",
              file=sys.stderr)
        return 2
    spec = json.loads(open(argv[0]).read())
    if wait:   # started early by the parent: import, then wait for the previous child to end
        preimport()
        if sys.stdin.readline().strip() != "go":
            return 3
    result = run_spec(spec)
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, argv[1])
    return 0 if result["status"] != "error" else 1


if __name__ == "__main__":
    sys.exit(main())
