"""kvpr_compile: a torch.compile backend ("kvpr") for decoders whose KV cache lives in CPU memory.

Partial KV recomputation (KVPR, Jiang et al., ACL Findings 2025): for the first l cached tokens
of each layer ship the layer input X and recompute K,V on the device while the rest of K,V streams in.
"""
from .cache import OffloadedKVCache
from .report import last_report, reports

__all__ = ["OffloadedKVCache", "last_report", "reports"]
__version__ = "0.1.0"
