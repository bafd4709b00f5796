"""The backend's per-layer ratios from the latency LP: one solve at a representative cached
length (cost_model.REPRESENTATIVE_SEQ_LEN), cached on the profile's rates and the model's dims.

Under the cost model l*/s hardly depends on s: the append D (about a token) and the weight reads
of rest (constant in s) are the only terms not proportional to s, so one solve serves every
sequence length of a graph that is dynamic in it.
"""
from __future__ import annotations

import functools

import torch

from . import cost_model as cm
from .latency_lp import Plan, plan_split
from .profile import HardwareProfile, dtype_key
from .resolve import resolve_profile

REPRESENTATIVE_SEQ_LEN = cm.REPRESENTATIVE_SEQ_LEN


@functools.lru_cache(maxsize=256)
def _cached_plan(name: str, source: str, h2d: float, d2h: float, flops: float, mem_copy: float,
                 mem_read: float, dtype: str, batch_size: int, hidden_size: int,
                 kv_hidden_size: int, num_layers: int, overlap: str) -> Plan:
    profile = HardwareProfile(name=name, device_name=name, h2d_bytes_per_s=h2d,
                              d2h_bytes_per_s=d2h, flops_per_s={dtype: flops}, torch_version="",
                              date="", source=source, mem_copy_bytes_per_s=mem_copy,
                              mem_read_bytes_per_s=mem_read)
    return plan_split(profile, num_layers=num_layers, batch_size=batch_size,
                      seq_len=REPRESENTATIVE_SEQ_LEN, hidden_size=hidden_size,
                      kv_hidden_size=kv_hidden_size, dtype=dtype, overlap=overlap)


def plan_for(profile: HardwareProfile, batch_size: int, hidden_size: int, kv_hidden_size: int,
             dtype: torch.dtype | str, num_layers: int, overlap: str = cm.DEFAULT_OVERLAP
             ) -> Plan:
    """The plan at the representative length, cached on the profile's name, source and rates
    (link, GEMM, device memory) and on the dims (shared: treat it as read-only)."""
    key = dtype_key(dtype)
    return _cached_plan(profile.name, profile.source, float(profile.h2d_bytes_per_s),
                        float(profile.d2h_bytes_per_s), float(profile.flops(dtype)),
                        float(profile.mem_copy_bytes_per_s), float(profile.mem_read_bytes_per_s),
                        key, int(batch_size), int(hidden_size), int(kv_hidden_size),
                        int(num_layers), cm.check_overlap(overlap))


def ratio_for(profile: HardwareProfile, batch_size: int, hidden_size: int, kv_hidden_size: int,
              dtype: torch.dtype | str, num_layers: int, overlap: str = cm.DEFAULT_OVERLAP
              ) -> list[float]:
    """Per-layer l/s at the representative length, cached (see plan_for)."""
    return list(plan_for(profile, batch_size, hidden_size, kv_hidden_size, dtype, num_layers,
                         overlap).ratios)


def choose_ratios(*, profile, overlap: str = cm.DEFAULT_OVERLAP, num_layers: int,
                  batch_size: int, hidden_size: int, kv_hidden_size: int,
                  dtype: torch.dtype | str, device=None) -> tuple[list[float], str, Plan]:
    """The backend's entry when no ratio is forced: (per-layer ratios, where they come from,
    the Plan). ``profile`` (a preset name, JSON path, HardwareProfile or None) is resolved for
    ``device`` (see resolve_profile); the description names the profile, its source and the
    ``overlap`` the LP modelled ("stream" by default, or "row"; see cost_model)."""
    cm.check_overlap(overlap)
    profile = resolve_profile(profile, device=device)
    plan = plan_for(profile, batch_size, hidden_size, kv_hidden_size, dtype, num_layers, overlap)
    label = "preset" if profile.source.startswith("preset: ") else profile.source
    return list(plan.ratios), f"profile {profile.name} ({label}), {overlap} overlap", plan


def choose_placement(*, profile, overlap: str = cm.DEFAULT_OVERLAP, num_layers: int,
                     batch_size: int, seq_len: int, hidden_size: int, kv_hidden_size: int,
                     dtype: torch.dtype | str, gpu_budget_bytes: float, device=None,
                     cpu_attention_bytes_per_s: float | None = None,
                     no_resident: tuple = ()) -> tuple[Plan, str]:
    """The backend's entry when a budget decides what is resident and the split is planned:
    the LP solved at the cache's full length ``seq_len`` under ``gpu_budget_bytes`` (device
    bytes for the load slots, X slots and resident rows), choosing r_i with l_i per layer.
    With a host attention rate (the profile's; ``cpu_attention_bytes_per_s`` overrides it, 0:
    none) it places a CPU share u_i too; ``no_resident``: the layers (0-based, in the plan's
    order) that keep nothing resident (sliding windows). Returns the Plan and where it comes
    from (as choose_ratios)."""
    cm.check_overlap(overlap)
    resolved = resolve_profile(profile, device=device)
    plan = plan_split(resolved, num_layers=num_layers, batch_size=batch_size, seq_len=seq_len,
                      hidden_size=hidden_size, kv_hidden_size=kv_hidden_size, dtype=dtype,
                      gpu_budget_bytes=float(gpu_budget_bytes), overlap=overlap,
                      cpu_attention_bytes_per_s=cpu_attention_bytes_per_s,
                      no_resident=tuple(no_resident))
    label = "preset" if resolved.source.startswith("preset: ") else resolved.source
    return plan, (f"profile {resolved.name} ({label}), {overlap} overlap, placed under a "
                  f"budget of {gpu_budget_bytes / 2**20:.1f} MiB at s={seq_len}")

