"""A torch.profiler trace of a few decode steps of one protocol-2 contender, after its timed
window, and what it says about the compute stream.

``StepTrace`` is the hook ``contenders.loop_decode`` calls before each step (and once after the
last): it starts the profiler before step ``first``, wraps each traced step in a
``record_function("decode step i")`` (kineto mirrors it on the GPU timeline: step_marks), and
stops after ``count`` steps, writing the chrome trace and the timeline's numbers
(timeline.py): busy time per stream, the share of H2D time under kernels, and the compute
stream's idle time inside the traced window (``compute_idle``): what a host that stops queuing
(the CPU co-attention's merge waits on the host for the worker) costs the GPU. The traced decode
is untimed; on a CPU there is no GPU activity, and the numbers say so.
"""
from __future__ import annotations

from pathlib import Path

import torch


class StepTrace:
    """Profile steps [first, first + count) of a decode into ``path`` (a .json)."""

    def __init__(self, path: Path, first: int, count: int, cuda: bool):
        self.path, self.first, self.count, self.cuda = Path(path), first, count, cuda
        self.prof = self.range = None
        self.stats: dict | None = None

    def __call__(self, step: int) -> None:
        from torch.profiler import ProfilerActivity, profile, record_function
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None
        if step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()
        if self.prof is None:
            return
        if step < self.first + self.count:
            self.range = record_function(f"decode step {step - self.first}")
            self.range.__enter__()
            return
        self._finish()

    def _finish(self) -> None:
        from .timeline import write_timeline
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.path))
        self.prof = None
        self.stats = {"json": str(self.path), "steps": self.count,
                      **write_timeline(self.path, self.path.with_suffix(".png"))}
