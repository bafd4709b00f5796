"""The backend's options: one frozen, typed object, checked once when it is made.

``torch.compile(model, backend="kvpr", options={...})`` hands the backend a plain mapping;
``Options.parse`` turns it into an ``Options`` (unknown names are a ValueError listing the known
ones) and every field is checked in ``__post_init__``, so an ``Options`` is always valid, also
one made directly or by ``dataclasses.replace``. Errors are ValueErrors naming the option and the
value (``kvpr: options['ratio'] must be ...``). Nothing downstream reads the mapping: the stages
read the fields, and plan/ receives them as typed arguments.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Mapping

from .inner import INNER
from .plan.cost_model import DEFAULT_OVERLAP, OVERLAPS

if TYPE_CHECKING:
    from .plan.profile import HardwareProfile

SCHEDULES = ("latency", "throughput")


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclass(frozen=True)
class Options:
    """What the ``kvpr`` backend is asked to do with each graph it compiles."""

    ratio: float | None = None
    """Forces the split ratio of every layer (l = floor(ratio * past)): a number in [0, 1].
    None: the planner picks per-layer ratios from ``profile`` (and, for the throughput schedule,
    from the throughput LP)."""

    profile: HardwareProfile | str | os.PathLike | None = None
    """The hardware profile the planners use: a preset name, a profile JSON path, ``"measure"``
    or a ``HardwareProfile`` (plan/resolve.py ``resolve_profile``). None: ``$KVPR_PROFILE``,
    else this GPU's cached measurement, else the ``h200-pcie5`` preset. Resolved at planning
    time (it may need the graph's device), not here."""

    overlap: str = DEFAULT_OVERLAP
    """How the latency LP models layer i+1's loads overlapping layer i (plan/cost_model.py):
    ``"stream"`` (default; layer-ahead loads, two device slots) or ``"row"`` (the paper's
    per-layer max(A+R, A+K))."""

    inner: str | None = None
    """What runs the rewritten graph (inner.py): ``"eager"`` (the FX graph with the kvpr steps
    as direct calls, in program order), ``"piecewise"`` (inductor between the steps) or
    ``"inductor"`` (the whole graph). None: chosen by device when a graph is compiled."""

    schedule: str = "latency"
    """``"latency"`` (the rewritten graph runs as one step over the whole batch) or
    ``"throughput"`` (the batch as micro-batches in column order, runtime/column_runner.py). A
    graph the column order cannot run keeps the latency schedule, with a warning."""

    micro_batches: int | None = None
    """Throughput schedule only: the number of micro-batches, an int >= 1. None: the throughput
    LP's split of the graph's example batch (capped at a call's batch). A count larger than a
    call's batch is a ValueError naming both, before anything is written."""

    gpu_budget_bytes: float | str | None = None
    """Device memory the step may use for the cache, a positive number or ``"auto"``.
    Throughput schedule: the working set (two layers' weights, the batch's hidden states, two
    micro-batch K,V slots); None there: no limit. Latency schedule: the load slots and the
    working set included, what is left holds a resident share of every layer's past
    (stages/residency.py); None or ``"auto"``: on CUDA the free device memory at the first
    compiled call less a margin, on a CPU device nothing resident. A budget below the working
    set is a ValueError naming the numbers, at planning or before the first step writes
    anything."""

    resident_ratio: float | None = None
    """Forces the fraction of each layer's past kept in device memory at every step
    (r = floor(resident_ratio * past)), a number in [0, 1]; ``ratio + resident_ratio`` must not
    exceed 1. The resident rows are copied to the device as tokens are stored and read there;
    only the rest of the past is recomputed or loaded (runtime/resident.py). None: nothing
    resident. Latency schedule only."""

    cpu_ratio: float | None = None
    """Forces the fraction of each layer's past the CPU attends to where its K,V lie, in the
    store (c = floor(cpu_ratio * past) tokens, the past's last ones): those K,V never cross the
    link; the CPU sends back a partial output and its log-sum-exp, merged exactly with the
    device's attention (passes/cpu_attention.py). A number in [0, 1]; ``ratio + resident_ratio
    + cpu_ratio`` must not exceed 1; 0: everything attended on the device. None (default): the
    latency LP chooses it with the split, from the profile's host attention rate (0 where the
    profile measured none, where ``ratio`` is forced and where there is no link). A layer whose
    attention cannot be split exactly keeps 0 (the report says why). Latency schedule only."""

    def __post_init__(self) -> None:
        self._share("ratio")
        self._check_resident()
        self._check_cpu()
        if self.inner is not None and self.inner not in INNER:
            raise ValueError(f"kvpr: options['inner'] must be one of {INNER}, got {self.inner!r}")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"kvpr: options['overlap'] must be one of {OVERLAPS}, "
                             f"got {self.overlap!r}")
        self._check_schedule()

    def _share(self, name: str) -> bool:
        """Check the fraction ``name`` (None allowed) and store it as a float; whether set."""
        share = getattr(self, name)
        if share is None:
            return False
        if not _is_number(share) or not 0.0 <= float(share) <= 1.0:   # also rejects NaN
            raise ValueError(f"kvpr: options[{name!r}] must be a number in [0, 1], "
                             f"got {share!r}")
        object.__setattr__(self, name, float(share))
        return True

    def _check_resident(self) -> None:
        if not self._share("resident_ratio"):
            return
        if self.ratio is not None and self.ratio + self.resident_ratio > 1.0 + 1e-12:
            raise ValueError(f"kvpr: options['ratio'] ({self.ratio!r}) + "
                             f"options['resident_ratio'] ({self.resident_ratio!r}) must not "
                             f"exceed 1: together they are fractions of one past")
        if self.schedule == "throughput" and self.resident_ratio > 0:
            raise ValueError(f"kvpr: options['resident_ratio'] ({self.resident_ratio!r}) applies "
                             f"to schedule='latency' only: the throughput schedule keeps no "
                             f"resident share of the cache")

    def _check_cpu(self) -> None:
        if not self._share("cpu_ratio"):
            return
        total = (self.ratio or 0.0) + (self.resident_ratio or 0.0) + self.cpu_ratio
        if self.cpu_ratio > 0 and total > 1.0 + 1e-12:
            raise ValueError(f"kvpr: options['ratio'] ({self.ratio!r}) + "
                             f"options['resident_ratio'] ({self.resident_ratio!r}) + "
                             f"options['cpu_ratio'] ({self.cpu_ratio!r}) = {total:g} must not "
                             f"exceed 1: they are fractions of one past")
        if self.schedule == "throughput" and self.cpu_ratio > 0:
            raise ValueError(f"kvpr: options['cpu_ratio'] ({self.cpu_ratio!r}) applies to "
                             f"schedule='latency' only")

    def _check_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"kvpr: options['schedule'] must be one of {SCHEDULES}, "
                             f"got {self.schedule!r}")
        m = self.micro_batches
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"kvpr: options['micro_batches'] must be an int >= 1 or None, "
                             f"got {m!r}")
        budget = self.gpu_budget_bytes
        if budget is not None and budget != "auto" and (
                not _is_number(budget) or not budget > 0 or budget == float("inf")):
            raise ValueError(f"kvpr: options['gpu_budget_bytes'] must be a positive number or "
                             f"'auto', got {budget!r}")
        if self.schedule == "throughput" and budget == "auto":
            raise ValueError("kvpr: options['gpu_budget_bytes']='auto' applies to "
                             "schedule='latency' only; the throughput schedule takes a number")
        if self.schedule == "latency" and self.micro_batches is not None:
            raise ValueError(f"kvpr: options['micro_batches'] applies to schedule='throughput' "
                             f"only (schedule is {self.schedule!r})")

    @classmethod
    def parse(cls, options: Mapping | Options | None) -> Options:
        """The checked options of a ``torch.compile(..., options=...)`` mapping (None: all
        defaults; an ``Options`` is returned as it is)."""
        if isinstance(options, Options):
            return options
        options = dict(options or {})
        unknown = set(options) - set(KNOWN)
        if unknown:
            raise ValueError(f"kvpr: unknown option(s) {sorted(unknown)}; known: {sorted(KNOWN)}")
        return cls(**options)


KNOWN = tuple(f.name for f in fields(Options))
parse_options = Options.parse
