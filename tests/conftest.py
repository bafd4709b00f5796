"""Shared fixtures: fresh Dynamo state per test, comparison helpers, --run-slow."""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --run-slow"))
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no cache entries or recompile budget carried over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the eager reference); ``inf`` if either side has a NaN or an
    inf, so that no comparison built on it can pass while a non-finite value leaks."""
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def worst_rel_err(outs, refs) -> float:
    """The worst ``max_rel_err`` over paired outputs; ``inf`` as soon as any pair is non-finite
    (a plain ``max()`` would skip a NaN that follows a finite value)."""
    outs, refs = list(outs), list(refs)
    assert len(outs) == len(refs) and outs, "compare at least one output, the same count on each side"
    worst = 0.0
    for a, b in zip(outs, refs):
        err = max_rel_err(a, b)
        if not err <= worst:   # also true for NaN, which then wins
            worst = err
    return worst
