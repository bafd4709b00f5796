"""`kvpr profile`: measure this GPU's PCIe bandwidth and GEMM rates (cached), or show a preset;
`--host` measures the host's CPU-attention rate and round trip on any machine and attaches them."""
from __future__ import annotations

import argparse
import sys

# preset names for --preset's help; plan/presets.py holds them (it imports torch, --help must not)
PRESET_NAMES = ("a100-pcie4", "h100-pcie5", "h200-pcie5")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "profile", help="measure or show a hardware profile (PCIe bandwidth, GEMM rate)",
        description="Measure pinned H2D/D2H bandwidth and GEMM rates on this CUDA device (cached "
                    "per device; --refresh re-measures), or show a preset or a profile file.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME",
                        help=f"show this preset ({', '.join(PRESET_NAMES)}; --list shows them)")
    source.add_argument("--file", metavar="PATH", help="show the profile in this JSON file")
    source.add_argument("--list", action="store_true", help="list the presets")
    parser.add_argument("--device", default="cuda", help="CUDA device to measure (default: cuda)")
    parser.add_argument("--refresh", action="store_true",
                        help="measure even if a cached one exists")
    parser.add_argument("--host", action="store_true",
                        help="measure this host's attention rate (bytes of K,V attended per "
                             "second at decode shapes, per dtype) and the D2H + H2D round trip "
                             "(CUDA only), and attach them to the profile shown (on a machine "
                             "without CUDA: --preset/--file, default the h200-pcie5 preset)")
    parser.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                        help="--host: torch threads to measure at (default: the CPU "
                             "worker's, kvpr_compile.ops.attention.WORKER_THREADS, else half "
                             "the cores)")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")
    parser.add_argument("-o", "--output", metavar="PATH", help="also write the profile's JSON here")
    parser.set_defaults(func=run)
    return parser


def format_profile(profile) -> str:
    rows = [("name", profile.name), ("device", profile.device_name),
            ("H2D (pinned)", f"{profile.h2d_bytes_per_s / 1e9:.1f} GB/s"),
            ("D2H (pinned)", f"{profile.d2h_bytes_per_s / 1e9:.1f} GB/s")]
    rows += [(f"GEMM {key}", f"{value / 1e12:.1f} TFLOP/s")
             for key, value in profile.flops_per_s.items()]
    rows += host_rows(profile)
    rows += [("torch", profile.torch_version), ("date", profile.date), ("source", profile.source)]
    if profile.notes:
        rows.append(("notes", profile.notes))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def host_rows(profile) -> list[tuple[str, str]]:
    """The host's CPU-attention rates and round trip, where the profile has them."""
    if not profile.cpu_attention_bytes_per_s:
        return [("host attention", "not measured (kvpr profile --host); no CPU share planned")]
    rows = [(f"host attention {key}", f"{value / 1e9:.2f} GB/s of K,V "
                                      f"({profile.cpu_attention_threads} threads)")
            for key, value in profile.cpu_attention_bytes_per_s.items()]
    trip = ("not measured (needs CUDA): planned as 0" if profile.round_trip_s is None
            else f"{profile.round_trip_s * 1e6:.1f} us (small D2H + H2D, host waits)")
    return rows + [("round trip", trip)]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..plan.presets import PRESETS
    from ..plan.resolve import cache_path, load_or_measure, resolve_profile
    if args.list:
        for name, profile in PRESETS.items():
            print(f"{name:<12} {profile.summary().split(': ', 1)[1]}")
        return 0
    if args.preset and args.preset not in PRESETS:
        print(f"kvpr profile: error: unknown preset {args.preset!r}; presets: "
              f"{', '.join(PRESETS)}", file=sys.stderr)
        return 2
    if args.cpu_threads is not None and (not args.host or args.cpu_threads < 1):
        print(f"kvpr profile: error: --cpu-threads takes an integer >= 1 with --host, got "
              f"{args.cpu_threads}" + ("" if args.host else " without --host"), file=sys.stderr)
        return 2
    cuda = torch.device(args.device).type == "cuda" and torch.cuda.is_available()
    try:
        if args.preset or args.file:
            profile = resolve_profile(args.preset or args.file)
        elif args.host and not cuda:
            from ..plan.presets import DEFAULT_PRESET
            profile = resolve_profile(DEFAULT_PRESET)
            print(f"kvpr profile: no CUDA device here: the GPU and link rates are the "
                  f"{DEFAULT_PRESET} preset's (--preset or --file to choose); the host's rates "
                  f"are measured here", file=sys.stderr)
        else:
            if not cuda:
                print(f"kvpr profile: measuring needs a CUDA device and there is none here "
                      f"(device={args.device!r}, torch.cuda.is_available()="
                      f"{torch.cuda.is_available()}). Show a preset instead: kvpr profile --preset "
                      f"{{{','.join(PRESETS)}}} (--host adds this host's CPU-attention rates)",
                      file=sys.stderr)
                return 2
            profile = load_or_measure(args.device, refresh=args.refresh)
            print(f"cache: {cache_path(profile.device_name)}", file=sys.stderr)
        if args.host:
            from ..plan.host_measure import measure_host, with_host_rates
            profile = with_host_rates(profile, measure_host(threads=args.cpu_threads))
    except (ValueError, RuntimeError) as exc:
        print(f"kvpr profile: error: {exc}", file=sys.stderr)
        return 2
    print(profile.to_json() if args.json else format_profile(profile))
    if args.output:
        profile.save(args.output)
    return 0
