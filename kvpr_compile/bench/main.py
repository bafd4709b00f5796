"""Command line of the decode comparison: ``kvpr bench`` and ``python -m benchmarks.decode``.

``add_arguments(parser)`` declares the flags, ``run(args)`` does the work (progress to stderr, the
table to stdout, ``--json`` and ``--trace`` files), ``main(argv)`` wraps both. Modes:

- CUDA, default: the paper's case plus the batch x prompt sweep for OPT-6.7B, Llama-7B (MHA) and
  Llama-3-8B (GQA) shapes, ``--layers`` (8) layers, fp16;
- ``--quick``: one small case per model at full width, 2 layers;
- no CUDA: a message saying so and exit status 2 (nothing a CPU measures here says anything
  about the link the benchmark is about);
- ``--cpu-smoke``: the same three families at toy width, 2 layers, fp32, on the CPU, so the code
  path runs end to end anywhere; labelled as meaningless for GPU claims, HF offloaded skipped.

``--json`` is rewritten after every case, so a run cut short keeps the cases it finished.
Exit status 1 if any contender failed, 2 for unusable arguments or no CUDA, 0 otherwise (missed
targets are reported, not fatal). Flags are declared without importing torch (``--help`` is quick).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import configs as cf
from .configs import CONTENDERS, INNER_CHOICES
from .device import NO_CUDA, device_of


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("what to run")
    g.add_argument("--schedule", choices=("latency", "throughput"), default="latency",
                   help="latency (default): the decode comparison below; throughput: "
                        "micro-batched column order with the layer weights streamed from pinned "
                        "CPU memory, kvpr vs ratio 0 vs the link limit (OPT-6.7B/13B/30B shapes, "
                        "prompt 256 + 32 new tokens, batches 64 and 128, 4 layers by default)")
    g.add_argument("--micro-batches", type=int, default=None, metavar="M",
                   help="throughput schedule: micro-batches per step (default: planned)")
    g.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   choices=sorted(cf.GPU_MODELS),
                   help=f"model shapes (default: {' '.join(cf.DEFAULT_MODELS)}; "
                        f"any of {', '.join(sorted(cf.GPU_MODELS))})")
    g.add_argument("--batch", nargs="+", type=int, default=None, metavar="B",
                   help=f"sweep batch sizes (default {' '.join(map(str, cf.DEFAULT_BATCHES))})")
    g.add_argument("--prompt", nargs="+", type=int, default=None, metavar="P",
                   help=f"sweep prompt lengths (default {' '.join(map(str, cf.DEFAULT_PROMPTS))})")
    g.add_argument("--new-tokens", type=int, default=None, metavar="N",
                   help=f"tokens generated per sweep case, the first by the prefill (default "
                        f"{cf.DEFAULT_NEW_TOKENS}; the paper's case always generates "
                        f"{cf.PAPER[2]})")
    g.add_argument("--no-paper", action="store_true",
                   help=f"leave out the paper's case (batch {cf.PAPER[0]}, prompt {cf.PAPER[1]}, "
                        f"{cf.PAPER[2]} new tokens)")
    g.add_argument("--paper-only", action="store_true", help="run only the paper's case")
    g.add_argument("--layers", type=int, default=None,
                   help=f"decoder layers per model (default {cf.DEFAULT_LAYERS}; 2 with --quick "
                        "or on the CPU)")
    g.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS,
                   metavar="NAME", help=f"subset of {', '.join(CONTENDERS)} (default: all)")
    g.add_argument("--quick", action="store_true",
                   help="one small case per model (batch 4, prompt 256, 8 new tokens, 2 layers)")
    g.add_argument("--cpu-smoke", "--cpu", dest="cpu", action="store_true",
                   help="smoke run on the CPU: toy-width models, fp32, timings meaningless "
                        "(also where CUDA is available)")
    h = parser.add_argument_group("how")
    h.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: cuda if available)")
    h.add_argument("--dtype", choices=cf.DTYPE_NAMES, default=None,
                   help="weights and cache dtype (default float16 on CUDA, float32 on the CPU)")
    h.add_argument("--warmup", type=int, default=2,
                   help="decode steps run before timing starts (Dynamo compiles there; default 2)")
    h.add_argument("--profile", default=None,
                   help="hardware profile for the scheduler: preset, JSON path or 'measure' "
                        "(default: measured now on CUDA, the h200-pcie5 preset on the CPU); the "
                        "physical limit always uses the H2D bandwidth measured now")
    h.add_argument("--inner", choices=INNER_CHOICES, default=None,
                   help="kvpr backend option 'inner' (default: the backend's, see inner.py)")
    h.add_argument("--overlap", choices=("row", "stream"), default=None,
                   help="kvpr backend option 'overlap' (how the latency LP overlaps loads)")
    h.add_argument("--seed", type=int, default=0, help="seed of weights and prompts")
    o = parser.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", default=None,
                   help="write every number, the device and the versions as JSON")
    o.add_argument("--trace", metavar="DIR", default=None,
                   help="after timing, profile a few kvpr decode steps per case: chrome trace "
                        "JSON + PNG timeline of the CUDA streams in DIR")
    o.add_argument("--trace-steps", type=int, default=3, help="decode steps traced (default 3)")
    _protocol2_arguments(parser)
    return parser


V2_CONTENDERS = ("resident_static", "resident_dynamic", "hf_generate_offloaded",
                 "hf_loop_offloaded", "kvpr_ratio0", "kvpr", "kvpr_generate", "copy_only")
V2_OPT_IN = ("kvpr_resident_third", "kvpr_resident_two_thirds", "kvpr_cpu")   # only with --only


def _protocol2_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("protocol 2 (--protocol 2: one process per contender, two "
                                  "rounds, sanity flags; bench/v2.py)")
    p.add_argument("--protocol", type=int, choices=(1, 2), default=1,
                   help="1 (default): the one-process table above; 2: the protocol-2 run")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="timed decode steps per decode (default 32; 6 with --cpu-smoke)")
    p.add_argument("--repeats", type=int, default=None, metavar="R",
                   help="timed decodes per process (default 3; 2 with --cpu-smoke)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds (default 2: shuffled, then reversed)")
    p.add_argument("--order-seed", type=int, default=None,
                   help="seed of round 1's order (default: drawn and recorded)")
    p.add_argument("--only", nargs="+", default=None, choices=V2_CONTENDERS + V2_OPT_IN,
                   metavar="NAME",
                   help=f"contenders (default all: {', '.join(V2_CONTENDERS)})")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="seconds for the whole run; a contender that cannot finish is absent")
    p.add_argument("--workdir", default=None, help="children's specs, results and stderr")
    p.add_argument("--no-prestart", action="store_true",
                   help="start each child only when the previous one has ended (default: the "
                        "next child imports while the current one runs, then waits)")
    p.add_argument("--in-process", action="store_true",
                   help="run the children as calls in this process (a quick test mode)")
    p.add_argument("--results-dir", default=None,
                   help="also write <date>-<card>-v2.json there (never overwriting)")
    p.add_argument("--also-check", nargs="*", default=None, metavar="DIR",
                   help="folders whose file names --results-dir must not reuse")
    p.add_argument("--junit", default=None, help="test counts from this junit XML")
    p.add_argument("--call-id", default=None,
                   help="tag of the device call (default $KVPR_CALL_ID): parts of one file "
                        "must share it")


def plan_cases(args, cpu: bool) -> tuple[list[cf.Case], dict[str, cf.ModelSpec], int, str]:
    """(cases, model specs by key, layers, note) for the mode the arguments select."""
    if cpu:
        base, kind, specs = cf.CPU, "cpu", cf.CPU_MODELS
    elif args.quick:
        base, kind, specs = cf.QUICK, "quick", cf.GPU_MODELS
    else:
        base = dict(batches=cf.DEFAULT_BATCHES, prompts=cf.DEFAULT_PROMPTS,
                    new_tokens=cf.DEFAULT_NEW_TOKENS, layers=cf.DEFAULT_LAYERS)
        kind, specs = "sweep", cf.GPU_MODELS
    wanted = args.models or list(cf.DEFAULT_MODELS)
    models = [m for m in wanted if m in specs]
    note = cf.CPU_NOTE if cpu else ""
    dropped = [m for m in wanted if m not in specs]
    if dropped:
        note += f"; no toy CPU shape for {', '.join(dropped)} (left out)"
    paper = kind == "sweep" and not args.no_paper
    batches = [] if args.paper_only else (args.batch or base["batches"])
    new_tokens = base["new_tokens"] if args.new_tokens is None else args.new_tokens
    cases = cf.build_cases(models, batches, args.prompt or base["prompts"], new_tokens,
                           paper=paper or args.paper_only, kind=kind)
    return cases, specs, base["layers"] if args.layers is None else args.layers, note


def _check(args, cases: list[cf.Case], layers: int) -> str:
    """Why the arguments cannot run, or ""."""
    if not cases:
        return "nothing to run (check --models/--batch/--prompt)"
    if args.warmup < 0 or args.trace_steps < 1 or layers < 1:
        return "--warmup must be >= 0, --trace-steps and --layers >= 1"
    if any(c.batch < 1 or c.prompt < 1 for c in cases):
        return "batch sizes and prompt lengths must be >= 1"
    short = sorted({c.new_tokens for c in cases if c.new_tokens - 1 <= args.warmup})
    if short:
        return (f"{short[0]} new tokens leave no timed decode step after the prefill and "
                f"{args.warmup} warm-up steps; raise --new-tokens or lower --warmup")
    return ""


def _profiles(args, device):
    """(scheduler profile, H2D bytes/s for the limit, where that number comes from)."""
    from ..plan.measure import measure
    from ..plan.presets import DEFAULT_PRESET
    from ..plan.resolve import resolve_profile
    if device.type == "cuda":
        print("measuring pinned H2D bandwidth and GEMM rates ...", file=sys.stderr, flush=True)
        measured = measure(device)
        sched = resolve_profile(args.profile, device=device) if args.profile else measured
        return sched, measured.h2d_bytes_per_s, "measured now, pinned"
    sched = resolve_profile(args.profile or DEFAULT_PRESET, device=device)
    return sched, sched.h2d_bytes_per_s, f"{sched.name}: not measured, no CUDA"


def _throughput(args, device) -> int:
    from . import throughput
    if args.micro_batches is not None and args.micro_batches < 1:
        print(f"kvpr bench: error: --micro-batches must be >= 1, got {args.micro_batches}",
              file=sys.stderr)
        return 2
    try:
        profile, h2d, h2d_source = _profiles(args, device)
    except (ValueError, RuntimeError) as exc:
        print(f"kvpr bench: error: {exc}", file=sys.stderr)
        return 2
    return throughput.run(args, device, profile, h2d, h2d_source)


def run(args: argparse.Namespace) -> int:
    import torch

    from .runners import BenchEnv
    from .suite import run_suite
    from .table import environment, format_report, write_json
    device = device_of(args)
    cpu = device.type != "cuda"
    if getattr(args, "protocol", 1) == 2:
        from . import v2
        return v2.run(args)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kvpr bench: error: CUDA is not available", file=sys.stderr)
        return 2
    if cpu and not args.cpu:
        print(NO_CUDA, file=sys.stderr)
        return 2
    if args.schedule == "throughput":
        return _throughput(args, device)
    cases, specs, layers, note = plan_cases(args, cpu)
    problem = _check(args, cases, layers)
    if problem:
        print(f"kvpr bench: error: {problem}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("float32" if cpu else "float16"))
    try:
        profile, h2d, h2d_source = _profiles(args, device)
    except (ValueError, RuntimeError) as exc:
        print(f"kvpr bench: error: {exc}", file=sys.stderr)
        return 2
    env = BenchEnv(device=device, dtype=dtype, profile=profile, h2d_bytes_per_s=h2d,
                   h2d_source=h2d_source, warmup=args.warmup, inner=args.inner,
                   overlap=args.overlap, trace_dir=Path(args.trace) if args.trace else None,
                   trace_steps=args.trace_steps, seed=args.seed)
    if note:
        print(f"kvpr bench: {note}", file=sys.stderr)
    meta = {**environment(device), "dtype": str(dtype).removeprefix("torch."), "cpu": cpu,
            "layers": layers, "warmup": args.warmup, "note": note, "profile": profile.to_dict(),
            "profile_summary": profile.summary(), "h2d_gbps": h2d / 1e9, "h2d_source": h2d_source,
            "inner": args.inner, "overlap": args.overlap, "argv": sys.argv[1:]}

    def save(done):   # after every case: a run cut short keeps what it measured
        if args.json:
            write_json(args.json, done, meta)

    results = run_suite(cases, specs, env, layers=layers, contenders=args.contenders,
                        on_case=save)
    print(format_report(results, meta))
    if args.json:
        print(f"kvpr bench: wrote {args.json}", file=sys.stderr)
    return 1 if any(r.errors for r in results) else 0


def build_parser(prog: str = "python -m benchmarks.decode") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    return add_arguments(parser)


DESCRIPTION = ("Decode-step comparison of GPU-resident eager, HF offloaded, kvpr at ratio 0 and "
               "kvpr at the scheduler's ratio against the physical host-to-device limit.")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
