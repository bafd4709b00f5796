"""`kvpr plan`: the planned per-layer split (latency LP, or throughput LP with `--schedule
throughput`) for a model shape (a preset, or a local config.json with --hf-config), batch,
length and profile, with the host and device bytes it takes (plan/footprint.py)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from ..plan.arch_presets import ARCH_PRESETS, Arch

# choices of --overlap: cost_model.OVERLAPS (cost_model imports torch, which --help must not)
OVERLAPS = ("stream", "row")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="print the per-layer recompute/transfer split and its predicted time",
        description="Solve the split LP for one decode step and print, per layer, the split "
                    "ratio, recomputed tokens, bytes over PCIe and predicted time, against "
                    "full-KV prefetch (ratio 0) and the link's physical limit.")
    parser.add_argument("--arch", default=None, choices=sorted(ARCH_PRESETS),
                        help="model shape (a preset; or give --hf-config)")
    parser.add_argument("--hf-config", default=None, metavar="PATH",
                        help="the model shape from a local Hugging Face config.json (or its "
                             "directory); nothing is downloaded")
    parser.add_argument("--batch", type=int, required=True, help="batch size")
    parser.add_argument("--seq", type=int, required=True, help="cached tokens per sequence")
    parser.add_argument("--profile", default=None,
                        help="preset name, profile JSON path or 'measure' (default: $KVPR_PROFILE, "
                             "else this GPU's cached measurement, else the h200-pcie5 preset)")
    parser.add_argument("--layers", type=int, default=None,
                        help="plan only this many layers (default: the model's)")
    parser.add_argument("--gpu-budget-gb", type=float, default=None,
                        help="GPU memory for the KV path in GB (1e9 bytes): staging slots and "
                             "resident prefixes; default: no resident prefix")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                        help="default: the --hf-config's dtype if it names one, else float16")
    parser.add_argument("--overlap", default=None, choices=OVERLAPS,
                        help="how loads overlap compute in the latency LP: 'stream' (layer-ahead "
                             "loads, the backend's default) or 'row' (the paper's)")
    parser.add_argument("--schedule", default="latency", choices=("latency", "throughput"),
                        help="'latency' (row by row, the KV path only; default) or 'throughput' "
                             "(column by column over micro-batches, weights streamed from CPU "
                             "memory too)")
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="throughput schedule: number of micro-batches (default: planned "
                             "under --gpu-budget-gb)")
    parser.add_argument("--cpu-attention-gbps", default=None, metavar="X",
                        help="the host's attention rate in GB/s of K,V (1e9 bytes/s), overriding "
                             "the profile's: the LP then attends part of each layer's past on "
                             "the CPU where it pays; 0: none (default: the profile's rate, none "
                             "without one)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..plan import cost_model as cm
    from ..plan.resolve import resolve_profile
    from ..plan.latency_lp import plan_split
    try:
        arch, args.dtype = _shape(args)
    except ValueError as exc:
        print(f"kvpr plan: error: {exc}", file=sys.stderr)
        return 2
    layers = arch.num_layers if args.layers is None else args.layers
    budget = None if args.gpu_budget_gb is None else args.gpu_budget_gb * 1e9
    try:
        cpu_rate = cpu_attention_rate(args.cpu_attention_gbps)
    except ValueError as exc:
        print(f"kvpr plan: error: {exc}", file=sys.stderr)
        return 2
    if args.schedule == "throughput":
        if cpu_rate is not None:
            print("kvpr plan: error: --cpu-attention-gbps plans the latency schedule's CPU "
                  "share; the throughput schedule has none", file=sys.stderr)
            return 2
        return run_throughput(args, arch, layers, budget)
    if args.micro_batches is not None:
        print("kvpr plan: error: --micro-batches needs --schedule throughput", file=sys.stderr)
        return 2
    try:
        profile = resolve_profile(args.profile)
        plan = plan_split(profile, num_layers=layers, batch_size=args.batch, seq_len=args.seq,
                          hidden_size=arch.hidden_size, kv_hidden_size=arch.kv_hidden_size,
                          dtype=args.dtype, gpu_budget_bytes=budget, mlp_params=arch.mlp_params,
                          overlap=args.overlap or cm.DEFAULT_OVERLAP,
                          cpu_attention_bytes_per_s=cpu_rate)
    except (ValueError, RuntimeError) as exc:
        print(f"kvpr plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan, arch, profile))
        print(memory_lines(plan, arch))
    return 0


def cpu_attention_rate(text: str | None) -> float | None:
    """--cpu-attention-gbps in bytes/s (None: not given); ValueError in words unless it is a
    finite number of GB/s >= 0."""
    if text is None:
        return None
    try:
        gbps = float(text)
    except ValueError:
        raise ValueError(f"--cpu-attention-gbps takes the host's attention rate in GB/s of K,V "
                         f"(a number >= 0), got {text!r}") from None
    if not math.isfinite(gbps) or gbps < 0:
        raise ValueError(f"--cpu-attention-gbps must be a finite number of GB/s >= 0 (0: no CPU "
                         f"share), got {text!r}")
    return gbps * 1e9


def _shape(args) -> tuple[Arch, str]:
    """(the model shape from --arch or --hf-config, the dtype to plan in)."""
    if (args.arch is None) == (args.hf_config is None):
        raise ValueError("give exactly one of --arch (a preset) and --hf-config (a local "
                         "config.json)")
    if args.arch is not None:
        return ARCH_PRESETS[args.arch], args.dtype or "float16"
    from ..plan.hf_config import arch_from_config
    arch, dtype = arch_from_config(args.hf_config)
    return arch, args.dtype or dtype or "float16"


def run_throughput(args, arch: Arch, layers: int, budget) -> int:
    from ..plan.throughput_lp import plan_throughput, step_shape
    from ..plan.throughput_table import format_throughput
    from ..plan.resolve import resolve_profile
    try:
        profile = resolve_profile(args.profile)
        plan = plan_throughput(profile, num_layers=layers, batch_size=args.batch, seq_len=args.seq,
                               hidden_size=arch.hidden_size, kv_hidden_size=arch.kv_hidden_size,
                               dtype=args.dtype, micro_batches=args.micro_batches,
                               gpu_budget_bytes=budget, mlp_params=arch.mlp_params)
    except (ValueError, RuntimeError) as exc:
        print(f"kvpr plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    shape = step_shape(profile, num_layers=layers, micro_batches=plan.micro_batches,
                       seq_len=args.seq, hidden_size=arch.hidden_size,
                       kv_hidden_size=arch.kv_hidden_size, dtype=args.dtype,
                       mlp_params=arch.mlp_params)
    print(f"kvpr plan: {arch.name} (h={arch.hidden_size}, h_kv={arch.kv_hidden_size}, "
          f"{arch.attention_kind}), {layers} of {arch.num_layers} layers, effective batch "
          f"{args.batch}, {args.seq} cached tokens, {args.dtype}, throughput schedule")
    print(f"profile: {profile.summary()}\n         {profile.source}\n")
    print(format_throughput(plan, shape))
    from ..plan.footprint import host_line
    print(host_line(plan.ratios, batch=args.batch, seq_len=args.seq, hidden=arch.hidden_size,
                    kv_hidden=arch.kv_hidden_size, dtype=args.dtype,
                    weights=layers * shape.layer_weight_bytes))
    return 0


def format_plan(plan, arch: Arch, profile) -> str:
    """The plan as text: header, profile, per-layer table (plan/latency_table.py), GPU budget."""
    from ..plan import cost_model as cm
    from ..plan.footprint import why_not_closed_form
    from ..plan.latency_table import format_layers
    c = plan.coefficients
    ms = 1e3
    p = cm.bytes_per_element(plan.dtype)
    dims = (plan.seq_len, plan.hidden_size, plan.kv_hidden_size, p, profile.h2d_bytes_per_s,
            profile.flops(plan.dtype))
    paper = cm.closed_form_recompute_tokens(*dims)
    balanced = cm.closed_form_recompute_tokens(*dims, profile.mem_copy_bytes_per_s)
    lines = [
        f"kvpr plan: {arch.name} (h={arch.hidden_size}, h_kv={arch.kv_hidden_size}, "
        f"{arch.attention_kind}), {plan.num_layers} of {arch.num_layers} layers, "
        f"batch {plan.batch_size}, {plan.seq_len} cached tokens, {plan.dtype}, "
        f"{plan.overlap} overlap",
        f"profile: {profile.summary()}",
        f"         {profile.source}",
        f"paper closed form l*/s = {paper / plan.seq_len:.3f} (GEMMs only), "
        f"{balanced / plan.seq_len:.3f} with the recompute's elementwise pass; "
        f"LP solved in {plan.solve_s * ms:.1f} ms",
        why_not_closed_form(plan),
        "",
    ]
    lines.append(format_layers(plan))
    lines += cpu_lines(plan)
    if plan.gpu_budget_bytes is not None:
        used = plan.working_set_bytes + sum(plan.resident_tokens) * c.kv_bytes_per_token
        lines.append(f"GPU budget {plan.gpu_budget_bytes / 1e9:.2f} GB: working set "
                     f"{plan.working_set_bytes / 1e9:.2f} GB + resident "
                     f"{sum(plan.resident_tokens) * c.kv_bytes_per_token / 1e9:.2f} GB = "
                     f"{used / 1e9:.2f} GB")
    return "\n".join(lines)


def cpu_lines(plan) -> list[str]:
    """The CPU share: the host rate planned with and the step against the full-K,V link limit
    (nothing without a host rate, but the note saying so)."""
    if plan.cpu_attention_bytes_per_s is None:
        return [f"CPU share: none ({plan.cpu_note.removeprefix('no CPU share: ')})"]
    share = sum(plan.cpu_tokens) / (plan.num_layers * plan.seq_len)
    trip = plan.cpu_round_trip_s or 0.0
    lines = [f"CPU share: {share:.3f} of the past on average attended on the host at "
             f"{plan.cpu_attention_bytes_per_s / 1e9:.2f} GB/s (round trip {trip * 1e6:.1f} us; "
             f"per layer in the 'cpu' column); predicted step {plan.predicted_step_s * 1e3:.3f} "
             f"ms = {plan.predicted_step_s / plan.baseline_link_limit_s:.2f}x the full-K,V link "
             f"limit {plan.baseline_link_limit_s * 1e3:.3f} ms"]
    if plan.cpu_note:
        lines.append(f"           {plan.cpu_note}")
    return lines


def memory_lines(plan, arch: Arch) -> str:
    """Host bytes of the store (K,V, X where kept) and the device bytes of this plan."""
    from ..plan.footprint import device_line, host_line
    return "\n".join([
        host_line(plan.ratios, batch=plan.batch_size, seq_len=plan.seq_len,
                  hidden=plan.hidden_size, kv_hidden=plan.kv_hidden_size, dtype=plan.dtype),
        device_line(plan, arch.mlp_params)])
