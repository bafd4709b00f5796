"""The backend's slice walks are bounded to each layer's region: the nodes they look at grow
linearly with the number of layers (whole-graph walks per site made compiling quadratic).
Timings live in ``benchmarks/pass_time.py``; this counts visits instead."""
from __future__ import annotations

import torch

from kvpr_compile.backend import kvpr_backend
from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama
from kvpr_compile.passes import recompute_slice


def _visits_per_node(layers: int, monkeypatch) -> list[float]:
    """Nodes the slice walks looked at, per graph node, for the prefill and the decode graph."""
    real, looked = recompute_slice.reachable, [0]

    def counting(nxg, source, keep, span, reverse=False):
        def counted(node):
            looked[0] += 1
            return keep(node)
        return real(nxg, source, counted, span, reverse)

    monkeypatch.setattr(recompute_slice, "reachable", counting)
    ratios = []

    def backend(gm, example_inputs, **kwargs):
        looked[0], nodes = 0, len(gm.graph.nodes)
        out = kvpr_backend(gm, example_inputs, **kwargs)
        ratios.append(looked[0] / nodes)
        return out

    cfg = TinyLlamaConfig(vocab_size=50, hidden_size=16, num_layers=layers, num_heads=2,
                          num_kv_heads=2, intermediate_size=16, max_seq_len=16)
    model = build_tiny_llama(cfg)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, options={"ratio": 0.5})
    cache = model.make_cache(1, 16)
    with torch.no_grad():
        compiled(torch.zeros(1, 4, dtype=torch.long), cache)
        compiled(torch.zeros(1, 1, dtype=torch.long), cache)
    assert len(ratios) == 2
    return ratios


def test_slice_walks_visit_each_node_a_bounded_number_of_times(monkeypatch):
    small, large = _visits_per_node(2, monkeypatch), _visits_per_node(16, monkeypatch)
    for s, l in zip(small, large):
        assert 0 < l <= 2.0       # a few looks per node, whatever the depth
        assert l <= 1.25 * s      # not growing with the layer count
