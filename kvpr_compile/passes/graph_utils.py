"""Small facts about nodes of Dynamo's torch-level FX graph, shared by the passes."""
from __future__ import annotations

import operator
import weakref

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx

from ..ops.nodes import CACHE_UPDATE

LINEAR = {torch._C._nn.linear, F.linear}
ADDMM = {torch.addmm}
MATMUL = {torch.matmul, operator.matmul, torch.mm}
SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
SOFTMAX = {torch.softmax, F.softmax, torch.nn.functional.softmax}

# Elementwise ops, as Dynamo records them (methods by name, functions by object).
UNARY_METHODS = {"contiguous", "float", "half", "bfloat16", "double", "to", "type", "type_as",
                 "neg", "exp", "sigmoid", "tanh", "relu", "sqrt", "rsqrt", "abs", "clone",
                 "detach", "reciprocal", "sin", "cos", "square"}
UNARY_FUNCTIONS = {torch.neg, operator.neg, F.silu, F.gelu, F.relu, torch.sigmoid, torch.tanh,
                   torch.rsqrt, torch.sqrt, torch.exp, torch.clone, torch.abs, torch.square,
                   torch.reciprocal}
BINARY_METHODS = {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "__add__", "__mul__",
                  "__sub__", "__truediv__", "__radd__", "__rmul__"}
BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
                    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.maximum,
                    torch.minimum, torch.where}
COMPLEX_VIEWS = {torch.view_as_real, torch.view_as_complex}   # change only the trailing dim
# Row-wise norms (RMSNorm, LayerNorm, F.normalize qk-norms): each row of the trailing dim(s) on
# its own, so they batch over tokens and keep every other dim in place.
TRAILING_NORMS = {F.rms_norm, F.layer_norm, torch.rms_norm, torch.layer_norm}
NORMS = TRAILING_NORMS | {F.normalize}


def projection_args(node: fx.Node) -> tuple[int, int, int | None, int] | None:
    """For a projection (``linear``, ``addmm``, ``x @ W``): argument positions of the activation,
    the weight and the bias (None if it has none), and the weight dim that indexes outputs."""
    if is_call(node, LINEAR) and len(node.args) >= 2:
        return 0, 1, 2 if len(node.args) > 2 else None, 0
    if is_call(node, ADDMM) and len(node.args) >= 3:
        return 1, 2, 0, 1
    if is_call(node, MATMUL, ("matmul", "mm")) and len(node.args) >= 2:
        return 0, 1, None, 1
    return None


def is_einsum(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "einsum" \
        and bool(node.args) and isinstance(node.args[0], str)


def einsum_operands(node: fx.Node) -> list:
    """The operands of ``einsum(equation, *operands)`` (or of ``einsum(equation, [operands])``)."""
    ops = list(node.args[1:])
    return list(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops


def is_pointwise(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in UNARY_METHODS or node.target in BINARY_METHODS
    return node.op == "call_function" and (node.target in UNARY_FUNCTIONS
                                           or node.target in BINARY_FUNCTIONS)


def is_call(node: fx.Node, targets=(), methods=()) -> bool:
    if node.op == "call_function":
        return node.target in targets or getattr(node.target, "overloadpacket", None) in targets
    return node.op == "call_method" and node.target in methods


def is_cache_update(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (CACHE_UPDATE, torch.ops.kvpr.cache_update)


def is_sdpa(node: fx.Node) -> bool:
    return is_call(node, SDPA)


def is_softmax(node: fx.Node) -> bool:
    return is_call(node, SOFTMAX, ("softmax",))


def is_matmul(node: fx.Node) -> bool:
    return is_call(node, MATMUL, ("matmul", "mm"))


def example_value(node):
    """The fake tensor (or SymInt) Dynamo recorded for ``node``; plain values pass through."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def hint(value) -> int:
    """A concrete example of a size, read without adding a guard (``int()`` on a symbolic size
    would specialize the compiled graph to that value)."""
    if isinstance(value, torch.SymInt):
        known = value.node.maybe_as_int()
        if known is not None:
            return known
        example = value.node.hint
        if example is None:
            raise ValueError(f"size {value} has no example value")
        return int(example)
    return int(value)


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data-flow graph; ``g.graph["order"]`` holds each node's position in graph
    (topological) order, so that walks can be bounded to a range of it."""
    g = nx.DiGraph()
    order = g.graph["order"] = {}
    for i, node in enumerate(graph.nodes):
        order[node] = i
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def reachable(nxg: nx.DiGraph, source, keep, span: int, reverse: bool = False) -> set:
    """Nodes reachable from ``source`` (upwards if ``reverse``) through nodes for which ``keep``
    holds, on paths of at most ``span`` edges. The walk only visits kept nodes (plus one rejected
    look at each edge leaving them): its cost is the size of the region, not of the graph.
    (A walk over a filtered ``subgraph_view`` would count the whole view to size its queue.)"""
    step = nxg.predecessors if reverse else nxg.successors

    def neighbors(node):
        return (n for n in step(node) if keep(n))

    return {v for _, v in nx.generic_bfs_edges(nxg, source, neighbors, depth_limit=max(span, 1))}


def between(nxg: nx.DiGraph, lo: int, hi: int):
    """``keep`` for ``reachable``: positions ``[lo, hi]`` of ``nxg`` (built by ``to_networkx``).
    No path from a node at ``lo`` to one at ``hi`` leaves that range."""
    order = nxg.graph["order"]
    return lambda n: lo <= order[n] <= hi


def _placeholder_is_param(node: fx.Node) -> bool:
    """Whether a Dynamo placeholder is a module parameter or buffer (not a user input)."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return False
    example = getattr(grapharg, "example", None)
    if isinstance(example, torch.nn.Parameter):
        return True
    source = getattr(grapharg, "source", None)
    guard_source = getattr(source, "guard_source", None)
    guard_source = guard_source() if callable(guard_source) else guard_source
    for check in ("is_unspecialized_nn_module", "is_specialized_nn_module"):
        fn = getattr(guard_source, check, None)
        if fn is not None and fn():
            return True
    name = getattr(source, "name", "")
    name = name() if callable(name) else name
    return "._parameters[" in str(name) or "._buffers[" in str(name)


def param_derived(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from module parameters/buffers alone (no user input, no factory op such
    as arange): the same for every token and every step. One pass in graph (topological) order."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            ok = _placeholder_is_param(n)
        elif n.op == "get_attr":
            ok = True
        elif n.op in ("call_function", "call_method"):
            ins = n.all_input_nodes
            ok = bool(ins) and all(i in out for i in ins)
        else:
            ok = False
        if ok:
            out.add(n)
    return out


def size_arg(graph: fx.Graph, value, tensor_node: fx.Node, dim: int):
    """A size usable as a node argument: ints as they are; a symbolic size as the graph input
    that carries it (available from the start, so loads using it can be hoisted), else as
    ``sym_size(tensor_node, dim)`` inserted at the current insertion point."""
    if not isinstance(value, torch.SymInt):
        return value
    node = _symbolic_inputs(graph).get(value.node.expr)
    if node is not None:
        return node
    return graph.call_function(torch.ops.aten.sym_size.int, (tensor_node, dim))


_SYMBOLIC_INPUTS: "weakref.WeakKeyDictionary[fx.Graph, dict]" = weakref.WeakKeyDictionary()


def _symbolic_inputs(graph: fx.Graph) -> dict:
    """{symbol expression: the first placeholder carrying it}, scanned once per graph (the
    passes add no placeholders, and rescanning them per site grew with the layer count)."""
    table = _SYMBOLIC_INPUTS.get(graph)
    if table is None:
        table = {}
        for node in graph.nodes:
            if node.op != "placeholder":
                break
            val = example_value(node)
            if isinstance(val, torch.SymInt):
                table.setdefault(val.node.expr, node)
        _SYMBOLIC_INPUTS[graph] = table
    return table
