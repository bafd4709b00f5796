"""Sanity flags of benchmark protocol 2: pure functions over numbers a run recorded.

Each check says whether a recorded figure is one a skeptic should distrust, and needs nothing but
the numbers (no torch, no device): the tests doctor timings to make each one fire and feed clean
ones to keep it quiet. ``assemble.py`` applies them per contender; a headline ratio is printed
only where neither side carries a flag. The thresholds are the protocol's, named here once.
"""
from __future__ import annotations

from typing import Iterable, Sequence

HOST_BOUND = "host_bound"               # median host ms >= 0.8 x device ms
SPREAD = "spread"                       # (p90 - p10) / p50 > 10%
ROUNDS_DIFFER = "rounds_differ"         # the two rounds' medians differ by > 10%
ONE_ROUND = "one_round"                 # only one round ran: the order effect is not bounded
EVENT_VS_WALL = "event_vs_wall"         # CUDA-event median vs wall clock / N differ by > 10%
NOT_CLEAN = "window_not_clean"          # an allocator or compile counter grew in the window
OVER_BYTES_BOUND = "over_bytes_bound"   # HF offloaded > 1.5 x its bytes bound
RATIO0_SLOW = "ratio0_slow"             # kvpr ratio 0 > 1.3 x max(kv_link, resident)
BELOW_FLOOR = "below_bytes_floor"       # an offloaded contender < 0.97 x its bytes / H2D
RESIDENT_SLOW = "resident_slow"         # resident > 3 x (weights + K,V) / device-memory rate
T_STAR_ORDER = "t_star_order"           # resident <= T* <= kvpr violated
TOKENS = "token_agreement"              # agreement below what fp16 near-ties explain
GENERATE_VS_LOOP = "generate_vs_loop"   # HF's loop figure vs its generate figure > 15% apart
NO_MICRO_BATCHES = "micro_batches_not_named"   # a throughput row that names no micro-batches
BYTES_OFF = "counted_bytes_off"         # traffic counted per step vs the yardstick's > 2% apart

HOST_SHARE = 0.8
SPREAD_LIMIT = 0.10
ROUNDS_LIMIT = 0.10
WALL_LIMIT = 0.10
HF_BOUND_FACTOR = 1.5
RATIO0_FACTOR = 1.3
FLOOR_FACTOR = 0.97
RESIDENT_FACTOR = 3.0
GENERATE_LIMIT = 0.15
BYTES_LIMIT = 0.02


def _positive(*values) -> bool:
    return all(v is not None and v > 0 for v in values)


def host_bound(host_ms: float | None, device_ms: float | None) -> bool:
    """The host's time to enqueue a step is most of the step: the device waits on the host."""
    return _positive(device_ms) and host_ms is not None and host_ms >= HOST_SHARE * device_ms


def spread(p10: float | None, p50: float | None, p90: float | None) -> bool:
    return _positive(p50) and p10 is not None and p90 is not None \
        and (p90 - p10) / p50 > SPREAD_LIMIT


def rounds_differ(medians: Sequence[float]) -> bool:
    """Medians of the same contender in round 1 and round 2 (its position reversed)."""
    done = [m for m in medians if m is not None and m > 0]
    return len(done) >= 2 and (max(done) - min(done)) / min(done) > ROUNDS_LIMIT


def event_vs_wall(event_median_ms: float | None, wall_per_step_ms: float | None) -> bool:
    """Events measure the device timeline; wall clock / N the whole decode as a user waits."""
    return _positive(event_median_ms, wall_per_step_ms) and \
        abs(event_median_ms - wall_per_step_ms) / wall_per_step_ms > WALL_LIMIT


def grown(before: dict, after: dict, keys: Iterable[str]) -> list[str]:
    """The counters among ``keys`` that grew between two snapshots (missing ones are ignored)."""
    out = []
    for key in keys:
        a, b = before.get(key), after.get(key)
        if a is not None and b is not None and b > a:
            out.append(key)
    return out


def over_bytes_bound(ms: float | None, bound_ms: float | None) -> bool:
    return _positive(ms, bound_ms) and ms > HF_BOUND_FACTOR * bound_ms


def ratio0_slow(r0_ms: float | None, kv_link_ms: float | None, resident_ms: float | None) -> bool:
    floor = max([v for v in (kv_link_ms, resident_ms) if v is not None], default=None)
    return _positive(r0_ms, floor) and r0_ms > RATIO0_FACTOR * floor


def below_floor(ms: float | None, floor_ms: float | None) -> bool:
    """Faster than its own bytes allow over the measured link: the accounting is wrong."""
    return _positive(ms, floor_ms) and ms < FLOOR_FACTOR * floor_ms


def resident_slow(ms: float | None, bytes_per_step: float | None,
                  mem_bytes_per_s: float | None) -> bool:
    if not _positive(ms, bytes_per_step, mem_bytes_per_s):
        return False
    return ms > RESIDENT_FACTOR * bytes_per_step / mem_bytes_per_s * 1e3


def t_star_order(resident_ms: float | None, t_star_ms: float | None, kvpr_ms: float | None
                 ) -> tuple[bool, bool]:
    """(resident above T*, kvpr below T*): either breaks resident <= T* <= kvpr. T* is built on
    the fastest resident step, so only its kvpr side can fire in a real row."""
    if t_star_ms is None:
        return False, False
    return (resident_ms is not None and resident_ms > t_star_ms,
            kvpr_ms is not None and kvpr_ms < t_star_ms)


def explained_agreement(first_ties: Sequence[int | None], tokens_per_row: int) -> float:
    """The token agreement near-ties cannot take away: per row, every token before the reference
    run's first near-tied argmax (index into the generated tokens; None: no near tie) must agree,
    after it the sequences may part. The mean of those shares over rows."""
    if not first_ties or tokens_per_row <= 0:
        return 1.0
    return sum((tokens_per_row if t is None else min(t, tokens_per_row)) / tokens_per_row
               for t in first_ties) / len(first_ties)


def tokens_low(agreement: float | None, explained: float | None) -> bool:
    return agreement is not None and explained is not None and agreement < explained - 1e-9


def generate_vs_loop(generate_ms: float | None, loop_ms: float | None) -> bool:
    return _positive(generate_ms, loop_ms) and \
        abs(loop_ms - generate_ms) / generate_ms > GENERATE_LIMIT


def micro_batches_named(micro_batches) -> bool:
    """A throughput row counts as micro-batched only if it lists more than one micro-batch."""
    return isinstance(micro_batches, (list, tuple)) and len(micro_batches) > 1


def bytes_off(counted: float | None, expected: float | None) -> bool:
    """The bytes the runtime counted per step are not the bytes the yardstick charges it (a
    count of 0 where bytes are due fires too)."""
    if counted is None or expected is None:
        return False
    if expected <= 0:
        return counted > 0
    return abs(counted - expected) / expected > BYTES_LIMIT
