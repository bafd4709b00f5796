"""The host's rates for CPU co-attention, measured on this machine (a CPU-only one too), and
attached to a hardware profile.

The timing itself is host_timing.py's, shared with the benchmark's bench/host_rates.py: the CPU
worker's own attention (runtime/cpu_attention.py) timed on token-major store rows, one decode
query per sequence, GQA heads sharing a K,V head; a small D2H + H2D with the host waiting for
each. This module picks the shapes and the thread count the CPU worker attends with
(``ops.attention.worker_threads``), and keeps, per dtype, the slowest of the shapes
(bytes of K+V attended per second), so a plan never counts on the host's best case nor on a
kernel the worker does not run.
Without CUDA the round trip is not measured: it is recorded as None and the profile's notes say
so.
"""
from __future__ import annotations

import dataclasses

from ..ops.attention import worker_threads
from . import host_timing
from .profile import DTYPE_KEYS, HardwareProfile

# Decode shapes (one query token per sequence): GQA 4:1 and MHA, K,V of 16 MiB each in fp16,
# large enough to leave the caches and small enough to time in about a second per dtype.
HOST_SHAPES = ({"name": "GQA 32:8 b4 past 1024", "batch": 4, "heads": 32, "kv_heads": 8,
                "head_dim": 128, "past": 1024},
               {"name": "MHA 32:32 b4 past 256", "batch": 4, "heads": 32, "kv_heads": 32,
                "head_dim": 128, "past": 256})
QUICK_SHAPES = host_timing.QUICK_SHAPES


@dataclasses.dataclass(frozen=True)
class HostRates:
    """What `measure_host` found: bytes/s per dtype, the threads used, the round trip."""

    attention_bytes_per_s: dict[str, float]
    threads: int
    round_trip_s: float | None
    notes: str


def _threads(threads: int | None) -> int:
    n = worker_threads() if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the CPU worker's thread count must be an integer >= 1, got {n!r}")
    return n


def measure_host(*, threads: int | None = None, dtypes: tuple[str, ...] = DTYPE_KEYS,
                 quick: bool = False, repeats: int = 3, budget_s: float = 0.5) -> HostRates:
    """Time the worker's decode attention per dtype at ``threads`` torch threads (default: the
    worker's count) over a few shapes (``quick``: toy shapes, for tests), and the round trip."""
    n = _threads(threads)
    shapes = QUICK_SHAPES if quick else HOST_SHAPES
    rates = {}
    for dtype in dtypes:
        measured = [host_timing.attention_rate(shape, dtype, n, repeats=repeats,
                                               budget_s=budget_s) for shape in shapes]
        rates[dtype] = min(m["kv_bytes"] / (m["ms"] / 1e3) for m in measured)
    trip = host_timing.round_trip(repeats=5 if quick else 50)
    round_trip_s = trip["median_us"] / 1e6 if "median_us" in trip else None
    names = ", ".join(shape["name"] for shape in shapes)
    why = (f"round trip of {trip['bytes']} bytes D2H + H2D with host waits, median of "
           f"{trip['repeats']}" if round_trip_s is not None
           else f"round trip not measured: {trip.get('absent', 'no CUDA')}")
    notes = (f"host attention: the CPU worker's kernel on token-major store rows, {n} torch "
             f"threads, slowest of [{names}], median of {repeats}; {why}")
    return HostRates(rates, n, round_trip_s, notes)


def with_host_rates(profile: HardwareProfile, rates: HostRates) -> HardwareProfile:
    """A copy of ``profile`` carrying ``rates`` (its source and notes say they were measured
    here)."""
    note = f"host rates measured on this machine ({rates.notes})"
    return dataclasses.replace(
        profile, flops_per_s=dict(profile.flops_per_s),
        cpu_attention_bytes_per_s=dict(rates.attention_bytes_per_s),
        cpu_attention_threads=rates.threads, round_trip_s=rates.round_trip_s,
        notes=f"{profile.notes}; {note}" if profile.notes else note)
