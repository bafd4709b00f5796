"""The backend's per-layer CPU share from the latency LP: the fraction of each layer's past to
attend on the host, with the recompute ratios and resident tokens of the same plan (they are
chosen together, so a backend takes all of them from here or none).

Like latency_ratios.py: one solve at the representative cached length, cached on the profile's
rates (host attention rate and round trip included) and the model's dims. Without a host rate
(a preset, an old profile file, a CPU-only machine's default) the CPU share is 0 in every layer
and the plan is latency_ratios.py's.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from . import cost_model as cm
from .cpu_terms import check_rate
from .latency_lp import Plan, plan_split
from .profile import HardwareProfile, dtype_key
from .resolve import resolve_profile


@dataclasses.dataclass(frozen=True)
class CpuSplit:
    """Per layer: l_i / s recomputed, u_i / s attended on the host; where they come from."""

    ratios: list[float]
    cpu_ratios: list[float]
    how: str
    plan: Plan
    warning: str = ""   # the plan counts on a host rate the worker may not reach


@functools.lru_cache(maxsize=128)
def _cached_plan(profile_json: str, rate: float | None, dims: tuple, overlap: str) -> Plan:
    profile = HardwareProfile.from_json(profile_json)
    dtype, batch_size, hidden_size, kv_hidden_size, num_layers = dims
    return plan_split(profile, num_layers=num_layers, batch_size=batch_size,
                      seq_len=cm.REPRESENTATIVE_SEQ_LEN, hidden_size=hidden_size,
                      kv_hidden_size=kv_hidden_size, dtype=dtype, overlap=overlap,
                      cpu_attention_bytes_per_s=rate)


def choose_cpu_ratios(*, profile, num_layers: int, batch_size: int, hidden_size: int,
                      kv_hidden_size: int, dtype: torch.dtype | str,
                      overlap: str = cm.DEFAULT_OVERLAP, device=None,
                      cpu_attention_bytes_per_s: float | None = None) -> CpuSplit:
    """The CPU share per layer (and the recompute ratios planned with it) for ``profile`` (a
    preset name, JSON path, HardwareProfile or None, resolved for ``device`` as
    resolve_profile does); ``cpu_attention_bytes_per_s`` overrides the profile's host rate
    (0: none). The plan is shared between callers: treat it as read-only."""
    cm.check_overlap(overlap)
    rate = check_rate(cpu_attention_bytes_per_s)
    profile = resolve_profile(profile, device=device)
    dims = (dtype_key(dtype), int(batch_size), int(hidden_size), int(kv_hidden_size),
            int(num_layers))
    plan = _cached_plan(profile.to_json(), rate, dims, overlap)
    label = "preset" if profile.source.startswith("preset: ") else profile.source
    if plan.cpu_attention_bytes_per_s is None or not any(plan.cpu_tokens):
        why = plan.cpu_note.removeprefix("no CPU share: ")
    else:
        given = "given" if rate is not None else "the profile's"
        why = f"host attention {plan.cpu_attention_bytes_per_s / 1e9:.3g} GB/s ({given})"
    how = f"profile {profile.name} ({label}), {overlap} overlap; CPU share: {why}"
    return CpuSplit(list(plan.ratios), list(plan.cpu_ratios), how, plan,
                    threads_warning(profile, rate, plan))


def threads_warning(profile: HardwareProfile, rate: float | None, plan: Plan) -> str:
    """Said where a CPU share is planned from a host rate measured at another thread count
    than the worker attends with."""
    from ..ops.attention import worker_threads
    measured, worker = profile.cpu_attention_threads, worker_threads()
    if rate is not None or measured is None or measured == worker or not any(plan.cpu_tokens):
        return ""
    return (f"kvpr: the CPU share is planned from profile {profile.name}'s host attention rate, "
            f"measured at {measured} torch threads, but the CPU worker attends with {worker} "
            f"(set kvpr_compile.ops.attention.WORKER_THREADS = {measured}, or measure at "
            f"{worker} with `kvpr profile --host`)")
