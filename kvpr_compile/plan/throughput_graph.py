"""Task graph of one decode step under the throughput schedule (column by column over
micro-batches, weights streamed from CPU memory), with task durations linear in each layer's
recompute length.

One step runs layer j for every micro-batch k before layer j+1 (column order), so layer j's
weights cross the link once per step however many micro-batches there are. Tasks of layer j,
micro-batch k (b_k rows), with l_j recomputed tokens out of s cached ones:

    ("w", j)        load layer j's weights W                       link   W / v_h2d
    ("x", j, k)     load X[:l_j] of micro-batch k                  link   b_k*l_j*h*p / v_h2d
    ("kv", j, k)    load K,V[l_j:]                                 link   2*b_k*(s-l_j)*h_kv*p
                                                                          / v_h2d
    ("rc", j, k)    recompute K,V[:l_j] from X                     gpu    4*b_k*l_j*h*h_kv / v_gpu
                                                                          + elementwise passes
    ("att", j, k)   assemble + the layer for micro-batch k         gpu    M(b_k) + rest(b_k)
    ("st", j, k)    append the new token's X, K, V (D2H)            link   b_k*(h+2*h_kv)*p / v_d2h

The recompute, assemble (M) and rest terms are cost_model's (its docstring has the formulas):
the rest of a micro-batch reads the layer's weights and its K,V from device memory, so at small
micro-batches it is bound by the device-memory read rate v_read, not FLOPs: that is what makes
fewer, larger micro-batches pay, and what the micro-batch choice trades against pipelining. The
assemble and the recompute's elementwise passes run at the strided-copy rate v_copy.

Order and slots:
- link (one copy queue; the append is charged on it too, as concurrent D2H slows H2D): W_0, then
  per (j, k) in column order: X, KV, the previous compute unit's append; W_{j+1} right after
  micro-batch (j, 1)'s loads (after (j, 0)'s when m = 1): the next micro-batch's cache is needed
  sooner than the next layer's weights.
- gpu: rc, att per (j, k) in column order.
- data: x -> rc -> att, kv -> att, att -> st; w_j -> rc (j, k) and att (j, k).
- two weight slots: W_{j+1} waits for layer j-1's last compute; two cache slots: the loads of the
  n-th (j, k) in column order wait for the compute of the (n-2)-th.

A duration is ``(constant, per-token coefficient, layer)``: constant + coefficient * l_layer.
`throughput_lp` encodes the same edges as LP rows; `makespan` evaluates the DAG for fixed l.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import networkx as nx

from . import cost_model as cm

END = "end"


@dataclass(frozen=True)
class StepShape:
    """Everything the throughput step's durations depend on (times in seconds, rates per s)."""

    num_layers: int
    micro_batches: tuple[int, ...]     # rows per micro-batch, in order (uneven allowed)
    seq_len: int                       # cached tokens s
    hidden: int                        # h
    kv_hidden: int                     # h_kv
    bytes_per_element: int             # p
    layer_weight_bytes: int            # W
    mlp_params: int | None
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    flops_per_s: float
    device_mem_bytes_per_s: float      # v_read: streaming reads (weights, K,V)
    copy_bytes_per_s: float            # v_copy: strided copies (assemble, elementwise passes)

    def x_s_per_token(self, b: int) -> float:
        return cm.x_bytes_per_token(b, self.hidden, self.bytes_per_element) / self.h2d_bytes_per_s

    def kv_s_per_token(self, b: int) -> float:
        return (cm.kv_bytes_per_token(b, self.kv_hidden, self.bytes_per_element)
                / self.h2d_bytes_per_s)

    def recompute_s_per_token(self, b: int) -> float:
        return cm.recompute_s_per_token(b, self.hidden, self.kv_hidden, self.bytes_per_element,
                                        self.flops_per_s, self.copy_bytes_per_s)

    def weight_s(self) -> float:
        return self.layer_weight_bytes / self.h2d_bytes_per_s

    def store_s(self, b: int) -> float:
        return (cm.store_bytes(b, self.hidden, self.kv_hidden, self.bytes_per_element)
                / self.d2h_bytes_per_s)

    def compute_s(self, b: int) -> float:
        """The layer for b rows after its loads and recompute: assemble + rest (cost_model's
        M + rest; each part FLOP-bound or device-memory-bound)."""
        p = self.bytes_per_element
        return (cm.assemble_s(b, self.seq_len, self.kv_hidden, p, self.copy_bytes_per_s)
                + cm.rest_s(b, self.seq_len, self.hidden, self.kv_hidden, p, self.flops_per_s,
                            self.device_mem_bytes_per_s, 1, self.mlp_params))


def units(shape: StepShape) -> list[tuple[int, int]]:
    """(layer, micro-batch) compute units in column order."""
    return [(j, k) for j in range(shape.num_layers) for k in range(len(shape.micro_batches))]


def tasks(shape: StepShape) -> dict:
    """task -> (resource, constant seconds, seconds per recomputed token of its layer, layer)."""
    s, out = shape.seq_len, {}
    for j in range(shape.num_layers):
        out[("w", j)] = ("link", shape.weight_s(), 0.0, j)
    for j, k in units(shape):
        b = shape.micro_batches[k]
        kv = shape.kv_s_per_token(b)
        out[("x", j, k)] = ("link", 0.0, shape.x_s_per_token(b), j)
        out[("kv", j, k)] = ("link", kv * s, -kv, j)
        out[("rc", j, k)] = ("gpu", 0.0, shape.recompute_s_per_token(b), j)
        out[("att", j, k)] = ("gpu", shape.compute_s(b), 0.0, j)
        out[("st", j, k)] = ("link", shape.store_s(b), 0.0, j)
    return out


def link_order(shape: StepShape) -> list:
    m = len(shape.micro_batches)
    order, previous = [("w", 0)], None
    for j, k in units(shape):
        order += [("x", j, k), ("kv", j, k)]
        if previous is not None:
            order.append(("st", *previous))
        if k == min(1, m - 1) and j + 1 < shape.num_layers:
            order.append(("w", j + 1))
        previous = (j, k)
    order.append(("st", *previous))
    return order


def gpu_order(shape: StepShape) -> list:
    return [(kind, j, k) for j, k in units(shape) for kind in ("rc", "att")]


def edges(shape: StepShape) -> list[tuple]:
    """(u, v, why): v starts after u finishes."""
    m, out = len(shape.micro_batches), []
    seq = units(shape)
    for n, (j, k) in enumerate(seq):
        out += [(("x", j, k), ("rc", j, k), "data"), (("rc", j, k), ("att", j, k), "data"),
                (("kv", j, k), ("att", j, k), "data"), (("att", j, k), ("st", j, k), "data"),
                (("w", j), ("rc", j, k), "weights")]
        if n >= 2:   # two cache slots
            out += [(("att", *seq[n - 2]), ("x", j, k), "cache slot"),
                    (("att", *seq[n - 2]), ("kv", j, k), "cache slot")]
    for j in range(2, shape.num_layers):   # two weight slots
        out.append((("att", j - 2, m - 1), ("w", j), "weight slot"))
    for resource, order in (("link", link_order(shape)), ("gpu", gpu_order(shape))):
        out += [(u, v, resource) for u, v in zip(order, order[1:])]
    return out


def durations(shape: StepShape, recompute_tokens: Sequence[float]) -> dict:
    if len(recompute_tokens) != shape.num_layers:
        raise ValueError(f"need {shape.num_layers} recompute lengths, got {len(recompute_tokens)}")
    for l in recompute_tokens:
        if not 0 <= l <= shape.seq_len:
            raise ValueError(f"recompute length {l} outside [0, s={shape.seq_len}]")
    return {t: const + per_token * recompute_tokens[layer]
            for t, (_, const, per_token, layer) in tasks(shape).items()}


def build_graph(shape: StepShape, recompute_tokens: Sequence[float]) -> nx.DiGraph:
    """The step's DAG; edge weight = the source task's duration, so the longest path to END is
    the makespan."""
    dur = durations(shape, recompute_tokens)
    g = nx.DiGraph()
    for t, d in dur.items():
        g.add_node(t, duration=d)
    for u, v, why in edges(shape):
        g.add_edge(u, v, why=why)
    g.add_node(END, duration=0.0)
    for t in dur:
        g.add_edge(t, END, why="end")
    for u, v in g.edges:
        g.edges[u, v]["weight"] = g.nodes[u]["duration"]
    if not nx.is_directed_acyclic_graph(g):
        raise AssertionError("throughput task graph has a cycle")
    return g


def makespan(shape: StepShape, recompute_tokens: Sequence[float]) -> float:
    return float(nx.dag_longest_path_length(build_graph(shape, recompute_tokens), weight="weight"))


def link_limit_s(shape: StepShape, recompute_tokens: Sequence[float]) -> float:
    """Physical limit: every byte the step moves (weights, X, K,V, appends) over the link."""
    dur = durations(shape, recompute_tokens)
    return sum(d for t, d in dur.items() if tasks(shape)[t][0] == "link")


def even_split(batch: int, m: int) -> tuple[int, ...]:
    """m micro-batches of batch rows, sizes differing by at most one (larger first)."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {m!r}")
    if m > batch:
        raise ValueError(f"micro_batches={m} is larger than the batch ({batch} rows)")
    q, r = divmod(batch, m)
    return tuple(q + 1 if i < r else q for i in range(m))
