"""`kvpr demo`: what kvpr does to a small built-in Llama, shown in terms that hold on any machine.

Three greedy generations from the same prompt: uncompiled (the reference), compiled with the
planned split, compiled at ratio 0 (full K,V loads). It prints
- exactness: max relative error of logits against the reference, and whether tokens match;
- the bytes each decode step loads from the CPU store, counted by the runtime
  (runtime/traffic.py) for kvpr and for ratio 0, and their ratio: on a GPU, what crosses PCIe;
- the latency LP's plan the kvpr run used (at the one length the backend plans at), with the
  profile named: on a CPU, where the backend alone plans ratio 0 (no link to save), the demo
  names the default preset unless --profile is given;
- tokens/s on a GPU only (on a CPU the cache and the compute share one memory, so no rate
  measured there says anything about the link).
"""
from __future__ import annotations

import time

from ..bench.configs import INNER_CHOICES


def add_parser(sub):
    p = sub.add_parser(
        "demo", help="exactness and bytes per decode step of kvpr on a small built-in model",
        description="Greedy decoding on a small built-in Llama (seeded random weights): eager, "
                    "kvpr-compiled with the planned split, and kvpr at ratio 0 (full K,V). "
                    "Prints exactness against eager, the bytes each decode step loads from the "
                    "CPU store (counted by the runtime) and the plan for these sizes.")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8, help="< --heads for grouped-query attention")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32, help="tokens to generate")
    p.add_argument("--ratio", type=float, default=None,
                   help="force the split ratio (default: planned from the hardware profile)")
    p.add_argument("--profile", default=None, help="hardware profile preset or JSON path")
    p.add_argument("--inner", choices=INNER_CHOICES, default=None,
                   help="kvpr backend option 'inner' (default: the backend's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _generate(model, tokens, cache, steps, device):
    """Prefill, then ``steps`` greedy decode steps, only those counted and timed:
    (new tokens, logits per step, decode seconds, traffic of the decode steps)."""
    import torch

    from ..runtime import traffic
    with torch.no_grad():
        logits = model(tokens, cache)[:, -1]
        out, all_logits = [], []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with traffic.counting() as counted:
            for _ in range(steps):
                nxt = logits.argmax(-1, keepdim=True)
                out.append(nxt)
                logits = model(nxt, cache)[:, -1]
                all_logits.append(logits)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return torch.cat(out, dim=1), all_logits, seconds, counted


def _ratios_text(rep) -> str:
    if rep is None:
        return "no decode graph was rewritten (see the warnings above)"
    ratios = sorted((e.layer, e.ratio) for e in rep.layers)
    values = sorted({r for _, r in ratios})
    per_layer = (f"ratio {values[0]:.3f} in every layer" if len(values) == 1 else
                 "ratios " + ", ".join(f"layer {i}: {r:.3f}" for i, r in ratios))
    at = f", planned at s={rep.plan.seq_len}" if getattr(rep.plan, "seq_len", None) else ""
    return f"{per_layer} ({rep.ratio_source or 'forced'}{at})"


def _mb(n: float) -> str:
    """Bytes, three significant digits: 1.42 MB, 12.3 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def run(args) -> int:
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kvpr demo: --device cuda requested but CUDA is not available")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, cfg, tokens = _build_model(args, device, dtype)
    _print_model(args, cfg, device, dtype)

    def fresh_cache():
        return model.make_cache(args.batch, device=device)

    if args.profile is None and device.type == "cpu":
        # the backend plans ratio 0 on a CPU unless a profile is named (no link to save): name
        # the default preset, so the demo shows the split that GPU would get
        from ..plan.presets import DEFAULT_PRESET
        args.profile = DEFAULT_PRESET
    reference = _generate(model, tokens, fresh_cache(), args.new, device)
    runs = {"kvpr": _compiled_run(model, tokens, fresh_cache(), args, device, args.ratio),
            "ratio 0": _compiled_run(model, tokens, fresh_cache(), args, device, 0.0)}
    torch.compiler.reset()
    ok = _print_exactness(runs, reference, args.new, dtype)
    _print_traffic(runs, args.new)
    _print_plan(args, cfg, device, dtype, runs["kvpr"][4])
    _print_rates(runs, reference, args, device)
    return 0 if ok else 1


def _build_model(args, device, dtype):
    """The seeded tiny Llama of the demo's sizes and its prompt tokens."""
    import torch

    from ..models import TinyLlamaConfig, build_tiny_llama
    cfg = TinyLlamaConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                          num_kv_heads=args.kv_heads, intermediate_size=2 * args.hidden,
                          max_seq_len=args.prompt + args.new + 1)
    model = build_tiny_llama(cfg, seed=args.seed, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=gen).to(device)
    return model, cfg, tokens


def _print_model(args, cfg, device, dtype) -> None:
    kind = "MHA" if cfg.num_kv_heads == cfg.num_heads else \
        f"GQA {cfg.num_heads // cfg.num_kv_heads}:1"
    layers = f"{cfg.num_layers} layer{'s' if cfg.num_layers > 1 else ''}"
    print(f"model: Llama-architecture, {layers}, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads ({kind}), "
          f"{str(dtype).removeprefix('torch.')}, {device}; seeded random weights")
    print(f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens; "
          "KV cache in CPU memory")


def _compiled_run(model, tokens, cache, args, device, ratio):
    """The generation compiled with kvpr (``ratio`` None: the planned split), and the report of
    its decode graph."""
    import torch

    from .. import reports
    from ..report import decode_graph_report
    torch.compiler.reset()   # each run compiles its own graphs
    options = {"inner": args.inner} if args.inner else {}
    if ratio is not None:
        options["ratio"] = ratio
    if args.profile is not None:
        options["profile"] = args.profile
    first = len(reports())
    compiled = torch.compile(model, backend="kvpr", options=options)
    out = _generate(compiled, tokens, cache, args.new, device)
    return (*out, decode_graph_report(reports()[first:]))


def _print_exactness(runs, reference, steps, dtype) -> bool:
    """Each run's logits and greedy tokens against the uncompiled model; True if all match."""
    import torch
    ref_tokens, ref_logits = reference[0], reference[1]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ok = True
    print()
    print(f"exactness against the uncompiled model, {steps} decode steps "
          f"(tolerance {tol:g}):")
    for name, label in (("kvpr", "kvpr"), ("ratio 0", "kvpr at ratio 0 (full K,V)")):
        out_tokens, out_logits = runs[name][0], runs[name][1]
        err = max(((a - b).abs().max() / b.abs().max()).item()
                  for a, b in zip(out_logits, ref_logits))
        same = torch.equal(out_tokens, ref_tokens)
        ok = ok and same and err <= tol
        print(f"  {label + ':':<28} max relative error of logits {err:.1e}, "
              f"greedy tokens identical: {same}")
    return ok


def _print_traffic(runs, new_tokens: int) -> None:
    """The bytes each decode step loaded from the CPU store, kvpr against ratio 0."""
    kvpr_traffic, full_traffic = runs["kvpr"][3], runs["ratio 0"][3]
    steps = max(new_tokens, 1)
    per_step, full_per_step = kvpr_traffic.bytes / steps, full_traffic.bytes / steps
    print()
    print(f"loaded from the CPU store per decode step (counted by the runtime, mean over "
          f"{new_tokens} steps; on a GPU this is what crosses PCIe):")
    share = f"{per_step / full_per_step:.2f}x" if full_per_step else "-"
    print(f"  H2D per step: {_mb(per_step)} kvpr vs {_mb(full_per_step)} full K,V ({share})")
    print(f"  kvpr: {_mb(kvpr_traffic.by_kind['tokens'] / steps)} X and side inputs (RoPE "
          f"cos/sin) + {_mb(kvpr_traffic.by_kind['kv'] / steps)} K,V")
    print(f"  split: {_ratios_text(runs['kvpr'][4])}")


def _print_plan(args, cfg, device, dtype, rep) -> None:
    """The latency LP's plan the kvpr run used (its report's), or with a forced ratio the one
    the backend would make for these sizes: at the length the backend plans at."""
    from ..plan.latency_ratios import plan_for
    from ..plan.latency_table import format_layers
    from ..plan.resolve import resolve_profile
    profile = resolve_profile(args.profile, device=device)
    kv_hidden = cfg.num_kv_heads * cfg.head_dim
    plan = getattr(rep, "plan", None)
    used = plan is not None and hasattr(plan, "seq_len")
    if not used:
        plan = plan_for(profile, args.batch, cfg.hidden_size, kv_hidden, dtype, cfg.num_layers)
    where = profile.source if profile.source == "measured" else \
        ("preset" if profile.source.startswith("preset: ") else profile.source)
    print()
    print(f"{'the plan of the kvpr run' if used else 'the plan the backend would make'} "
          f"(b={args.batch}, h={cfg.hidden_size}, h_kv={kv_hidden}, {plan.dtype}) with profile "
          f"{profile.name} ({where}), at s={plan.seq_len} cached tokens: the backend plans at "
          f"one length and applies its ratios l/s to every length (here {args.prompt}.."
          f"{args.prompt + args.new - 1}):")
    if device.type != "cuda":
        print(f"  (no CUDA here: {profile.name}'s rates are not this machine's; times below are "
              "that profile's predictions)")
    print("\n".join(("  " + line).rstrip() for line in format_layers(plan).splitlines()))


def _print_rates(runs, reference, args, device) -> None:
    """Decode tokens/s, on a GPU only."""
    import torch
    print()
    n = args.batch * args.new
    if device.type == "cuda":
        print(f"decode tokens/s on {torch.cuda.get_device_name(device)}: eager (offloaded "
              f"cache) {n / reference[2]:.1f}, kvpr {n / runs['kvpr'][2]:.1f}, kvpr at ratio 0 "
              f"{n / runs['ratio 0'][2]:.1f}")
    else:
        print("tokens/s: not shown on a CPU (cache and compute share one memory here, so no "
              "rate measured on it says anything about PCIe); run with --device cuda on a GPU")
