"""Task graph of one decode step (networkx DiGraph) and its critical path.

Per layer i five tasks, each on one serial resource:
    ("x", i)     load X[:, r:r+l] H2D             link
    ("rc", i)    recompute K,V[:, r:r+l] from X    gpu
    ("kv", i)    load K,V[:, r+l:] H2D             link
    ("attn", i)  assemble + rest of the layer      gpu   (cost_model's M + rest)
    ("store", i) append the new tokens' X,K,V D2H  link
and, for a layer with u_i > 0 tokens attended on the host (CPU co-attention),
    ("cpu", i)   Q projection, query D2H, host attention over u_i tokens, result H2D   host
with edges attn_{i-1} -> cpu_i (the query needs the layer's input), cpu -> cpu (one host
worker) and cpu_i -> attn_i, whose weight is duration(cpu_i) - (duration(attn_i) -
post_merge_s): only the part of the layer after the merge waits for the host.
Edges: data (x->rc, rc->attn, kv->attn, attn->store), resource order (link: x_0 kv_0 x_1 kv_1
store_0 x_2 kv_2 store_1 ...; gpu: rc_0 attn_0 rc_1 attn_1 ...) and the prefetch window (layer
i+1's loads start once layer i's recompute is done for overlap="row", once layer i-1's attention
has freed its device slot for overlap="stream"), so layer i+1's loads overlap layer i's compute.

Node attribute "duration" (seconds); every edge u->v carries weight = duration(u), and a sink
"end" follows every task, so `networkx.dag_longest_path_length` is the step's makespan. This is
the same graph that `cost_model.finish_times` walks forward and that the LP in latency_lp.py
encodes row by row, so for a plan the longest path equals `plan.predicted_step_s` (up to float
rounding) and the LP optimum within the flooring of l, r to whole tokens.
"""
from __future__ import annotations

from typing import Sequence

import networkx as nx

from . import cost_model as cm

END = "end"


def build_task_graph(c: cm.LayerCoefficients, recompute_tokens: Sequence[float],
                     resident_tokens: Sequence[float] | None = None,
                     overlap: str = cm.DEFAULT_OVERLAP,
                     cpu_tokens: Sequence[float] | None = None) -> nx.DiGraph:
    """The step's DAG for per-layer recompute (l_i), resident (r_i) and host-attended (u_i)
    token counts."""
    cm.check_overlap(overlap)
    n = len(recompute_tokens)
    resident_tokens = list(resident_tokens) if resident_tokens is not None else [0] * n
    cpu_tokens = list(cpu_tokens) if cpu_tokens is not None else [0] * n
    if n == 0 or len(resident_tokens) != n or len(cpu_tokens) != n:
        raise ValueError("need one recompute, resident and CPU count per layer (at least one "
                         "layer)")
    cm.check_counts(c, recompute_tokens, resident_tokens, cpu_tokens)
    g = nx.DiGraph()

    def task(kind: str, i: int, resource: str, duration: float) -> None:
        g.add_node((kind, i), kind=kind, layer=i, resource=resource, duration=float(duration))

    for i, (l, r, u) in enumerate(zip(recompute_tokens, resident_tokens, cpu_tokens)):
        task("x", i, "link", c.x_load_s(l))
        task("rc", i, "gpu", c.recompute_s(l))
        task("kv", i, "link", c.kv_load_s(l, r, u))
        task("attn", i, "gpu", c.gpu_attention_s(u))
        task("store", i, "link", c.store_s)
        if u > 0:
            task("cpu", i, "host", c.cpu_s(u))

    def edge(u, v, why: str) -> None:
        if g.has_edge(u, v):
            g.edges[u, v]["why"] += "+" + why
        else:
            g.add_edge(u, v, why=why)

    for i in range(n):
        edge(("x", i), ("rc", i), "data")
        edge(("rc", i), ("attn", i), "data")
        edge(("kv", i), ("attn", i), "data")
        edge(("attn", i), ("store", i), "data")
        if overlap == "row" and i + 1 < n:
            edge(("rc", i), ("x", i + 1), "window")
        if overlap == "stream" and i + 2 < n:
            edge(("attn", i), ("x", i + 2), "window")
    host = [("cpu", i) for i in range(n) if cpu_tokens[i] > 0]
    for i in (node[1] for node in host):
        if i:
            edge(("attn", i - 1), ("cpu", i), "query")
        edge(("cpu", i), ("attn", i), "merge")
    for resource, order in (("link", link_order(n)), ("gpu", gpu_order(n)), ("host", host)):
        for u, v in zip(order, order[1:]):
            edge(u, v, resource)

    g.add_node(END, kind=END, layer=n, resource=None, duration=0.0)
    for node in list(g.nodes):
        if node != END:
            g.add_edge(node, END, why="end")
    for u, v in g.edges:
        g.edges[u, v]["weight"] = g.nodes[u]["duration"]
    for node in host:   # only the part of ATT after the merge follows the host's result
        attn = ("attn", node[1])
        g.edges[node, attn]["weight"] -= g.nodes[attn]["duration"] - c.post_merge_s
    return g


def link_order(num_layers: int) -> list[tuple[str, int]]:
    """Issue order on the host link: X_i, KV_i, then the previous layer's append."""
    order = []
    for i in range(num_layers):
        order += [("x", i), ("kv", i)]
        if i:
            order.append(("store", i - 1))
    order.append(("store", num_layers - 1))
    return order


def gpu_order(num_layers: int) -> list[tuple[str, int]]:
    return [(kind, i) for i in range(num_layers) for kind in ("rc", "attn")]


def plan_task_graph(plan) -> nx.DiGraph:
    """The task graph of a latency `Plan` (plan/latency_plan.py)."""
    return build_task_graph(plan.coefficients, plan.recompute_tokens, plan.resident_tokens,
                            plan.overlap, plan.cpu_tokens or None)


def predicted_step_time(plan_or_graph) -> float:
    """Makespan (seconds): the longest path of a task graph, or of a Plan's task graph."""
    g = plan_or_graph if isinstance(plan_or_graph, nx.DiGraph) else plan_task_graph(plan_or_graph)
    return float(nx.dag_longest_path_length(g, weight="weight"))


def critical_path(plan_or_graph) -> list:
    """The tasks on the longest path, in order (without the sink)."""
    g = plan_or_graph if isinstance(plan_or_graph, nx.DiGraph) else plan_task_graph(plan_or_graph)
    return [node for node in nx.dag_longest_path(g, weight="weight") if node != END]
