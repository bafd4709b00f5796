"""``kvpr bench --schedule throughput``: tokens/s of the throughput schedule with the layer
weights in pinned CPU memory, kvpr (planned split) against the same schedule at ratio 0 (the
FlexGen-equivalent baseline, its cache pinned too) and against the link limit.

Per case (model, effective batch, prompt, new tokens, micro-batches): the model is built once on
the device (random fp16 weights, ``layers`` decoder layers), its layer weights go to pinned host
memory with ``stream_weights`` (two layers' worth of device slots), and each contender decodes
``new_tokens`` greedily over its own ``KVPRCache``:

- ``tput-r0``: ``torch.compile(model.forward, backend="kvpr", dynamic=True,
  options={"schedule": "throughput", "micro_batches": m, "ratio": 0.0})`` (what
  ``kvpr_compile.compile_throughput`` does; called directly here so that both contenders share
  one model and its streamed weights)
- ``tput-kvpr``: the same without ``ratio`` (the throughput planner's per-layer split)

Measured per timed decode step: its time (CUDA events), the bytes the runtime loaded from the
cache store (``runtime.traffic``) and the layer weights streamed (every layer once per step).
The link limit of a contender is (its weight bytes + its cache bytes) / the H2D bandwidth
measured now: no schedule moving those bytes over that link can be faster. Tokens/s = effective
batch / median step time. Tokens agree when the greedy tokens of kvpr and ratio 0 match (fp16
recompute may flip a near-tied argmax; the fraction is reported, not asserted).

Without CUDA only ``--cpu-smoke`` runs (toy models, fp32; its timings say nothing).
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from .configs import CPU_MODELS, GPU_MODELS, TPUT_KVPR, TPUT_R0, build_model
from .loop import GreedyDecoder
from .runners import backend
from .timing import step_timer

MODELS = ("opt-6.7b", "opt-13b", "opt-30b")
BATCHES = (64, 128)
PROMPT, NEW_TOKENS, LAYERS = 256, 32, 4
CPU = dict(models=("opt-6.7b", "llama-7b", "llama-3-8b"), batches=(5,), prompt=12, new_tokens=5,
           layers=3, micro_batches=2)
TARGET_SPEEDUP, TARGET_LIMIT = 1.45, 1.15   # issue targets: >= 1.45x vs r0 (MHA, batch >= 128),
                                            # <= 1.15x the link limit


@dataclass
class Run:
    name: str
    status: str = "ok"
    reason: str = ""
    step_ms: list[float] = field(default_factory=list)
    cache_bytes_per_step: float = 0.0
    weight_bytes_per_step: int = 0
    micro_batches: list[int] | None = None
    ratios: list[float] | None = None
    tokens: torch.Tensor | None = None

    @property
    def ms(self) -> float | None:
        return statistics.median(self.step_ms) if self.status == "ok" and self.step_ms else None

    def limit_ms(self, h2d_bytes_per_s: float) -> float:
        return (self.weight_bytes_per_step + self.cache_bytes_per_step) / h2d_bytes_per_s * 1e3

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("tokens")
        d["ms_per_step"] = self.ms
        return d


@dataclass
class CaseResult:
    model: str
    attention: str
    batch: int
    prompt: int
    new_tokens: int
    micro_batches: int | None
    runs: dict[str, Run]
    agreement: float | None = None

    def tokens_per_s(self, name: str) -> float | None:
        ms = self.runs[name].ms
        return None if ms is None else self.batch / ms * 1e3


def one_line(exc: BaseException) -> str:
    """The exception's message on one line, without Dynamo's advice footer."""
    lines = [ln.strip() for ln in str(exc).splitlines()
             if ln.strip() and not ln.startswith(("Set TORCHDYNAMO", "You can suppress"))]
    return f"{type(exc).__name__}: {' '.join(lines)}"[:300]


def _decode(name, model, ids, case, env, options, warmup) -> Run:
    from .. import report as kvpr_report
    from ..hf import KVPRCache
    from ..runtime import traffic
    torch.compiler.reset()
    first = len(kvpr_report.reports())
    try:
        forward = torch.compile(model.forward, backend=backend(), dynamic=True, options=options)
        cache = KVPRCache(model.config, batch_size=case["batch"],
                          max_seq_len=case["prompt"] + case["new_tokens"], dtype=env["dtype"],
                          device=env["device"])
        decoder = GreedyDecoder(model, forward, cache)
        decoder.prefill(ids)
        for _ in range(warmup):
            decoder.step()
        timer = step_timer(env["device"])
        steps = case["new_tokens"] - 1 - warmup
        with traffic.counting() as counted:
            for _ in range(steps):
                timer.start()
                decoder.step()
                timer.stop()
        run = Run(name, step_ms=timer.times_ms(), cache_bytes_per_step=counted.bytes / steps,
                  weight_bytes_per_step=env["weight_bytes"], tokens=decoder.tokens())
        for rep in reversed(kvpr_report.reports()[first:]):
            if rep.layers:
                run.ratios = [e.ratio for e in sorted(rep.layers, key=lambda e: e.layer)]
                run.micro_batches = getattr(rep, "micro_batches", None)
                break
        return run
    except Exception as exc:  # noqa: BLE001  (recorded; the run goes on)
        return Run(name, status="error", reason=one_line(exc))
    finally:
        torch.compiler.reset()


def run_case(spec, case: dict, env: dict, layers: int, warmup: int) -> CaseResult:
    from ..runtime.weight_stream import stream_weights
    model = build_model(spec, layers, dtype=env["dtype"], device=env["device"], seed=env["seed"],
                        max_positions=case["prompt"] + case["new_tokens"])
    stream = stream_weights(model)
    env = {**env, "weight_bytes": stream.bytes_on_host() if layers > stream.num_slots else 0}
    gen = torch.Generator().manual_seed(env["seed"])
    ids = torch.randint(3, spec.vocab_size, (case["batch"], case["prompt"]), generator=gen)
    ids = ids.to(env["device"])
    base = {"schedule": "throughput", "micro_batches": case["micro_batches"],
            "profile": env["profile"]}
    runs = {TPUT_R0: _decode(TPUT_R0, model, ids, case, env, {**base, "ratio": 0.0}, warmup),
            TPUT_KVPR: _decode(TPUT_KVPR, model, ids, case, env, base, warmup)}
    result = CaseResult(spec.name, spec.attention, case["batch"], case["prompt"],
                        case["new_tokens"], case["micro_batches"], runs)
    a, b = runs[TPUT_R0].tokens, runs[TPUT_KVPR].tokens
    if a is not None and b is not None:
        result.agreement = float((a == b).float().mean())
    del model, stream
    if env["device"].type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return result


def format_table(results: list[CaseResult], h2d: float, note: str = "") -> str:
    head = ("| model | attention | batch | m | r0 tok/s | kvpr tok/s | kvpr / r0 | kvpr ms / "
            "limit ms | r0 ms / limit ms | tokens agree | split |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        r0, kv = r.runs[TPUT_R0], r.runs[TPUT_KVPR]
        t0, t1 = r.tokens_per_s(TPUT_R0), r.tokens_per_s(TPUT_KVPR)
        fmt = lambda x, f="{:.1f}": "-" if x is None else f.format(x)  # noqa: E731
        speed = None if not (t0 and t1) else t1 / t0
        lim = lambda run: None if run.ms is None else run.ms / run.limit_ms(h2d)  # noqa: E731
        mb = kv.micro_batches or r0.micro_batches or r.micro_batches
        split = "-" if not kv.ratios else f"{statistics.fmean(kv.ratios):.2f} mean ratio"
        errors = "; ".join(f"{x.name}: {x.reason}" for x in (r0, kv) if x.status != "ok")
        lines.append(f"| {r.model} | {r.attention} | {r.batch} | {mb if mb else '-'} | "
                     f"{fmt(t0)} | {fmt(t1)} | {fmt(speed, '{:.2f}x')} | "
                     f"{fmt(lim(kv), '{:.2f}')} | "
                     f"{fmt(lim(r0), '{:.2f}')} | {fmt(r.agreement, '{:.0%}')} | "
                     f"{errors or split} |")
    out = "\n".join(lines)
    out += (f"\n\nlink limit: (streamed weights + cache bytes loaded per step) / H2D "
            f"{h2d / 1e9:.1f} GB/s; targets: kvpr / r0 >= {TARGET_SPEEDUP}x (MHA, batch >= 128), "
            f"kvpr ms / limit ms <= {TARGET_LIMIT}")
    return out + (f"\n{note}" if note else "")


def run(args, device: torch.device, profile, h2d: float, h2d_source: str) -> int:
    """The ``--schedule throughput`` mode of ``kvpr bench`` (main.py has parsed and checked)."""
    import json
    cpu = device.type != "cuda"
    models = CPU["models"] if cpu and args.models is None else (args.models or MODELS)
    specs = CPU_MODELS if cpu else GPU_MODELS
    batches = args.batch or (CPU["batches"] if cpu else BATCHES)
    prompt = (args.prompt or [CPU["prompt"] if cpu else PROMPT])[0]
    new_tokens = args.new_tokens or (CPU["new_tokens"] if cpu else NEW_TOKENS)
    layers = args.layers or (CPU["layers"] if cpu else LAYERS)
    m = (args.micro_batches if args.micro_batches is not None
         else (CPU["micro_batches"] if cpu else None))
    if new_tokens - 1 <= args.warmup:
        print(f"kvpr bench: error: {new_tokens} new tokens leave no timed step after "
              f"{args.warmup} warm-up steps", file=sys.stderr)
        return 2
    env = {"device": device,
           "dtype": getattr(torch, args.dtype or ("float32" if cpu else "float16")),
           "profile": profile, "seed": args.seed}
    results = []
    for name in models:
        if name not in specs:
            print(f"kvpr bench: no {'toy CPU ' if cpu else ''}shape for {name}; left out",
                  file=sys.stderr)
            continue
        for batch in batches:
            case = {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "micro_batches": m}
            started = time.perf_counter()
            result = run_case(specs[name], case, env, layers, args.warmup)
            print(f"  {name} b{batch}: {time.perf_counter() - started:.1f} s", file=sys.stderr,
                  flush=True)
            results.append(result)
            if args.json:
                meta = {"schedule": "throughput", "device": str(device), "cpu": cpu,
                        "layers": layers, "h2d_gbps": h2d / 1e9, "h2d_source": h2d_source,
                        "torch": torch.__version__, "argv": sys.argv[1:]}
                if not cpu:
                    meta["device_name"] = torch.cuda.get_device_name(device)
                rows = [{**{k: v for k, v in asdict(r).items() if k != "runs"},
                         "runs": {k: x.to_dict() for k, x in r.runs.items()},
                         "tokens_per_s": {k: r.tokens_per_s(k) for k in r.runs},
                         "limit_ms": {k: x.limit_ms(h2d) for k, x in r.runs.items()}}
                        for r in results]
                with open(args.json, "w") as fh:
                    json.dump({"meta": meta, "cases": rows}, fh, indent=2)
    note = (f"H2D {h2d / 1e9:.1f} GB/s ({h2d_source}); {layers} layers; weights streamed from "
            "pinned host memory, caches pinned")
    if cpu:
        note += "; CPU smoke run: timings meaningless for GPU claims"
    print(format_table(results, h2d, note))
    return 1 if any(x.status != "ok" for r in results for x in r.runs.values()) else 0
