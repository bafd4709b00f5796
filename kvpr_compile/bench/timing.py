"""Per-step timers: CUDA events on a GPU (no host sync inside the loop), ``perf_counter`` on CPU.

Usage::

    timer = step_timer(device)
    for ...:
        timer.start(); work(); timer.stop()
    times = timer.times_ms()      # one entry per start/stop pair, synchronising once at the end

A CUDA event pair measures the device timeline from the moment the start event is enqueued; if
the host is the bottleneck the device idles in between and that idle time is counted too, so the
number is the step's real duration either way. ``host_ms()`` is the host's time from start to stop
(enqueueing the step, no sync): close to the device time means the step is host-bound (the first
GPU run's ratio-0 timeline had the GPU idle for tens of ms per step; this says where next time).
"""
from __future__ import annotations

import statistics
import time

import torch


class CpuTimer:
    def __init__(self):
        self._spans: list[tuple[float, float]] = []
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._spans.append((self._t0, time.perf_counter()))

    def times_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in self._spans]

    def host_ms(self) -> list[float]:
        return self.times_ms()


class CudaTimer:
    def __init__(self, device):
        self.device = torch.device(device)
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._host = CpuTimer()

    def start(self) -> None:
        self._host.start()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self._pairs.append((event, None))

    def stop(self) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self._pairs[-1] = (self._pairs[-1][0], event)
        self._host.stop()

    def host_ms(self) -> list[float]:
        return self._host.times_ms()

    def times_ms(self) -> list[float]:
        torch.cuda.synchronize(self.device)
        return [a.elapsed_time(b) for a, b in self._pairs]


def step_timer(device) -> CpuTimer | CudaTimer:
    return CudaTimer(device) if torch.device(device).type == "cuda" else CpuTimer()


def summarize(times_ms: list[float]) -> dict:
    """Median (the headline number), mean, min, max and stdev of a list of step times."""
    if not times_ms:
        return {"n": 0}
    return {"n": len(times_ms), "median": statistics.median(times_ms),
            "mean": statistics.fmean(times_ms), "min": min(times_ms), "max": max(times_ms),
            "stdev": statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0}
