"""`kvpr profile`: measure this GPU's PCIe bandwidth and GEMM rates (cached), or show a preset."""
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
    rows += [("torch", profile.torch_version), ("date", profile.date), ("source", profile.source)]
    if profile.notes:
        rows.append(("notes", profile.notes))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


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
    try:
        if args.preset or args.file:
            profile = resolve_profile(args.preset or args.file)
        else:
            if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
                print(f"kvpr profile: measuring needs a CUDA device and there is none here "
                      f"(device={args.device!r}, torch.cuda.is_available()="
                      f"{torch.cuda.is_available()}). Show a preset instead: kvpr profile --preset "
                      f"{{{','.join(PRESETS)}}}", file=sys.stderr)
                return 2
            profile = load_or_measure(args.device, refresh=args.refresh)
            print(f"cache: {cache_path(profile.device_name)}", file=sys.stderr)
    except (ValueError, RuntimeError) as exc:
        print(f"kvpr profile: error: {exc}", file=sys.stderr)
        return 2
    print(profile.to_json() if args.json else format_profile(profile))
    if args.output:
        profile.save(args.output)
    return 0
