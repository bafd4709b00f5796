"""kvpr_compile: a torch.compile backend ("kvpr") for decoders whose KV cache lives in CPU memory.

Partial KV recomputation (KVPR, Jiang et al., ACL Findings 2025): for the first l cached tokens
of each layer ship the layer input X and recompute K,V on the device while the rest of K,V
streams in.

``OffloadedKVCache``, ``stream_weights`` and ``compile_throughput`` are imported on first use, so
that ``import kvpr_compile`` (and with it the ``kvpr`` command's ``--help``) does not import torch.
"""
from .report import last_report, reports

__all__ = ["OffloadedKVCache", "compile_throughput", "last_report", "reports", "stream_weights"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "OffloadedKVCache":
        from .cache import OffloadedKVCache
        globals()[name] = OffloadedKVCache
        return OffloadedKVCache
    if name == "stream_weights":
        from .runtime.weight_stream import stream_weights
        globals()[name] = stream_weights
        return stream_weights
    if name == "compile_throughput":
        from .throughput import compile_throughput
        globals()[name] = compile_throughput
        return compile_throughput
    raise AttributeError(f"module 'kvpr_compile' has no attribute {name!r}")
