"""Solving a python-mip model quietly: shared by the latency LP and the throughput LP."""
from __future__ import annotations

import contextlib
import os
import sys

import mip


@contextlib.contextmanager
def quiet_stdout():
    """CBC/Clp print LP status lines on fd 1 even with verbose=0; point fd 1 at /dev/null for
    the solve. Process-wide for those milliseconds."""
    try:
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve(model: mip.Model) -> None:
    """Optimise ``model`` in place; ValueError unless the solution is optimal."""
    with quiet_stdout():
        status = model.optimize()
    if status != mip.OptimizationStatus.OPTIMAL:
        raise ValueError(f"the split LP has no optimal solution (status {status.name})")
