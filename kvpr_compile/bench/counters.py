"""Allocator and compile counters around a timed window, and whether the window was clean.

A timed decode is trusted only if nothing grew inside it: no new pinned host block
(``torch.cuda.host_memory_stats``: ``num_host_alloc``, with ``host_alloc_time.total`` reported
beside it, where the torch version has the call), no new device segment or allocator retry
(``torch.cuda.memory_stats``) and no new graph compiled by the kvpr backend
(``kvpr_compile.reports()``). Counters a torch version or a CPU run lacks are simply absent.
"""
from __future__ import annotations

import torch

# counters whose growth inside the window marks it "not clean"
GROWTH_KEYS = ("host.num_host_alloc", "device.segment.all.allocated", "device.num_alloc_retries",
               "device.num_device_alloc", "kvpr.graphs")
# reported beside them (time is not a count; its growth follows num_host_alloc)
INFO_KEYS = ("host.host_alloc_time.total", "host.allocated_bytes.current",
             "device.reserved_bytes.all.current")


def snapshot(device: torch.device) -> dict[str, float]:
    import kvpr_compile
    out: dict[str, float] = {"kvpr.graphs": float(len(kvpr_compile.reports()))}
    if device.type != "cuda" or not torch.cuda.is_available():
        return out
    torch.cuda.synchronize(device)
    host = getattr(torch.cuda, "host_memory_stats", None)
    if host is not None:
        try:
            stats = host()
        except (RuntimeError, AttributeError):
            stats = {}
        for key in ("num_host_alloc", "host_alloc_time.total", "allocated_bytes.current"):
            if key in stats:
                out[f"host.{key}"] = float(stats[key])
    stats = torch.cuda.memory_stats(device)
    for key in ("segment.all.allocated", "num_alloc_retries", "num_device_alloc",
                "reserved_bytes.all.current"):
        if key in stats:
            out[f"device.{key}"] = float(stats[key])
    return out


def window(before: dict, after: dict) -> dict:
    """{"before", "after", "grown": [keys], "clean": bool} for the record."""
    from .flags import grown
    keys = grown(before, after, GROWTH_KEYS)
    return {"before": before, "after": after, "grown": keys, "clean": not keys}
