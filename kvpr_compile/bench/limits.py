"""The physical limit of a decode step: bytes the plan moves host-to-device over the link's rate.

Per layer with split ratio r and ``past`` cached tokens, the backend recomputes
l = floor(r * past) tokens (r as a fraction with denominator <= 1000, exactly as the rewrite
does) and ships X for them (b*h*p bytes per token) and K,V for the rest (2*b*h_kv*p per token);
ratio 0 ships all K,V. A sliding-window layer (``windows``: one window per layer, 0: none)
reads only its window's past, the last ``w - 1`` tokens once it holds ``w``, split the same
way. The step's bytes are summed over layers and divided by the measured pinned H2D bandwidth.
The small per-token side inputs (RoPE cos/sin records) and the device-to-host append are left
out: this is the floor the host link sets, not a model of the step.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

from ..ops.split import recompute_tokens


def split_tokens(ratio: float, past: int) -> int:
    """Tokens recomputed (X shipped) out of ``past`` at ``ratio`` (the rewrite's rule)."""
    return recompute_tokens(ratio, past)


def window_past(past: int, window: int) -> int:
    """Past tokens a layer with sliding window ``window`` (0: none) reads: the ``window - 1``
    before the new token once it holds that many (as the cache returns them)."""
    return window - 1 if window and past >= window else past


def step_h2d_bytes(ratios: Sequence[float], past: int, *, batch: int, hidden: int,
                   kv_hidden: int, elem_bytes: int, windows: Sequence[int] = (),
                   cpu_ratios: Sequence[float] = ()) -> int:
    """Host-to-device bytes of one decode step, summed over layers (one ratio per layer;
    ``windows``: one sliding window per layer, none where empty; ``cpu_ratios``: the share of
    each layer's past the CPU attends to where it lies, none where empty)."""
    x_tok, kv_tok = batch * hidden * elem_bytes, 2 * batch * kv_hidden * elem_bytes
    total = 0
    for i, ratio in enumerate(ratios):
        read = window_past(past, windows[i]) if windows else past
        l = split_tokens(ratio, read)
        c = min(split_tokens(cpu_ratios[i], read), read - l) if cpu_ratios else 0
        total += l * x_tok + (read - l - c) * kv_tok
    return total


@dataclass(frozen=True)
class Limit:
    ms: float                # per step (median over the timed steps' past lengths)
    per_layer_ms: float
    bytes: int               # per step, at the median past length
    h2d_bytes_per_s: float

    def to_dict(self) -> dict:
        return {"ms": self.ms, "per_layer_ms": self.per_layer_ms, "bytes": self.bytes,
                "h2d_bytes_per_s": self.h2d_bytes_per_s}


def limit(ratios: Sequence[float], pasts: Sequence[int], *, batch: int, hidden: int,
          kv_hidden: int, elem_bytes: int, h2d_bytes_per_s: float,
          windows: Sequence[int] = ()) -> Limit:
    """The limit for the steps whose cache held ``pasts`` tokens (the same median as the timing)."""
    if not ratios or not pasts:
        raise ValueError("limit() needs at least one layer ratio and one past length")
    per_step = [step_h2d_bytes(ratios, p, batch=batch, hidden=hidden, kv_hidden=kv_hidden,
                               elem_bytes=elem_bytes, windows=windows) for p in pasts]
    ms = statistics.median(b / h2d_bytes_per_s * 1e3 for b in per_step)
    return Limit(ms=ms, per_layer_ms=ms / len(ratios), bytes=int(statistics.median(per_step)),
                 h2d_bytes_per_s=h2d_bytes_per_s)
