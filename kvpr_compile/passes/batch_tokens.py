"""Batch a single-token recompute slice over past tokens by adding a leading token axis.

The slice captured from a decode graph maps one token's records (X as ``(b, 1, h)``, side inputs
as the program computed them) to that token's ``(b, hkv, 1, d)`` K and V, with every shape baked
in for one token. Re-emitting each op with a leading axis of size l (the number of tokens to
recompute) gives one batched computation: the projection becomes a single GEMM over l·b rows and
RoPE a broadcast over the stored cos/sin. This is what ``vmap`` does, written as a graph transform
over a known op set so that the result is plain FX that inductor traces with a symbolic l (vmap's
own batching rules add guards on l, which would recompile every decode step). An op without a
rule raises Unsupported, and the site is left as a plain cache read.
"""
from __future__ import annotations

import operator
import string

import torch
import torch.nn.functional as F
from torch import fx

from ..ops.errors import Unsupported
from .graph_utils import (ADDMM, BINARY_FUNCTIONS, BINARY_METHODS, COMPLEX_VIEWS, LINEAR, MATMUL,
                          TRAILING_NORMS, UNARY_FUNCTIONS, UNARY_METHODS, einsum_operands,
                          example_value, is_einsum)

_TRAILING_FUNCTIONS = TRAILING_NORMS  # act on trailing dims only
_DIM_REDUCTIONS = {"sum", "mean", "amax", "amin", "var", "norm", "softmax", "cumsum"}


def _rank(node: fx.Node) -> int:
    val = example_value(node)
    if not isinstance(val, torch.Tensor):
        raise Unsupported(f"{node.name}: no tensor metadata")
    return val.dim()


def _shift(dim: int) -> int:
    return dim + 1 if dim >= 0 else dim


class _Batcher:
    def __init__(self, module: fx.GraphModule, num_token_inputs: int):
        self.src = module
        self.g = fx.Graph()
        self.env: dict[fx.Node, object] = {}
        self.batched: dict[fx.Node, bool] = {}
        self.num_token_inputs = num_token_inputs
        self.L = None

    def _emit(self, kind, target, args, kwargs=None):
        return self.g.create_node(kind, target, tuple(args), dict(kwargs or {}))

    def _m(self, a):
        return fx.node.map_arg(a, lambda n: self.env[n])

    def _is_b(self, a) -> bool:
        return isinstance(a, fx.Node) and self.batched.get(a, False)

    def _align(self, new, old, rank: int):
        """Give a tensor operand the leading token axis at logical rank ``rank``."""
        if not self._is_b(old) or not isinstance(example_value(old), torch.Tensor):
            return new  # scalars and shared tensors broadcast right-aligned, below the token axis
        r = _rank(old)
        if r < rank:  # lift to the output rank so its token axis lines up with the others'
            return self._emit("call_method", "reshape",
                              (new, self.L, *([1] * (rank - r)), *self._emit_shape(new, r)))
        return new

    def _emit_shape(self, new, r):
        return [self._emit("call_method", "size", (new, i + 1)) for i in range(r)]

    def run(self):
        src_nodes = list(self.src.graph.nodes)
        placeholders = [n for n in src_nodes if n.op == "placeholder"]
        for i, ph in enumerate(placeholders):
            self.env[ph] = self.g.placeholder(ph.name)
            self.batched[ph] = i < self.num_token_inputs
        self.L = self._emit("call_method", "size", (self.env[placeholders[0]], 0))
        for nd in src_nodes:
            if nd.op == "placeholder":
                continue
            if nd.op == "output":
                k, v = nd.args[0]
                outs = []
                for t in (k, v):
                    if not self._is_b(t):
                        raise Unsupported("recomputed K/V do not depend on the stored X")
                    moved = self._emit("call_method", "movedim", (self.env[t], 0, 2))
                    outs.append(self._emit("call_method", "squeeze", (moved, 3)))
                self.g.output(tuple(outs))
                continue
            if not any(self._is_b(a) for a in nd.all_input_nodes):
                self.env[nd] = self.g.node_copy(nd, lambda a: self.env[a])
                self.batched[nd] = False
                continue
            self.env[nd] = self._rule(nd)
            self.batched[nd] = not self._is_size(nd)
        gm = fx.GraphModule(self.src, self.g, class_name="KVRecomputeBatched")
        return gm

    @staticmethod
    def _is_size(nd) -> bool:
        return (nd.op == "call_method" and nd.target in ("size", "dim")) or (
            nd.op == "call_function"
            and nd.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size))

    def _rule(self, nd: fx.Node):
        """The batched node(s) for ``nd``: the rule for its target (``_RULES``), or Unsupported."""
        rule = _RULES.get((nd.op == "call_method", nd.target))
        if rule is None and is_einsum(nd):
            rule = _Batcher._einsum
        if rule is None:
            t = nd.target
            raise Unsupported(f"no token-batching rule for {nd.op} {getattr(t, '__name__', t)} "
                              f"({nd.name})")
        return rule(self, nd, list(nd.args), dict(nd.kwargs))

    def _size(self, nd, args, kwargs):
        m, x = self._m, args[0]
        if nd.op == "call_method" and nd.target == "dim":
            return _rank(x)
        if len(args) > 1 or "dim" in kwargs:
            d = args[1] if len(args) > 1 else kwargs["dim"]
            return self._emit("call_method", "size", (m(x), _shift(d)))
        full = self._emit("call_method", "size", (m(x),))
        return self._emit("call_function", operator.getitem, (full, slice(1, None)))

    def _pointwise(self, nd, args, kwargs):
        """Unary ops, complex views and trailing-dim norms: the same call on the batched input."""
        t, x = nd.target, args[0] if args else None
        if t in _TRAILING_FUNCTIONS and any(self._is_b(a) for a in nd.all_input_nodes
                                            if a is not x):
            raise Unsupported(f"{t} with a per-token weight")
        return self._emit(nd.op, t, self._m(args), self._m(kwargs))

    def _clamp(self, nd, args, kwargs):
        """clamp / clip (DBRX's ``clip_qkv``) with bounds that do not depend on the token: the
        same elementwise call on the batched input."""
        if any(self._is_b(a) for a in [*args[1:], *kwargs.values()]):
            raise Unsupported(f"{getattr(nd.target, '__name__', nd.target)} with per-token bounds")
        return self._emit(nd.op, nd.target, self._m(args), self._m(kwargs))

    def _normalize(self, nd, args, kwargs):   # normalize(input, p=2, dim=1, eps=1e-12)
        names = ("p", "dim", "eps")
        kw = {**dict(zip(names, args[1:])), **kwargs}
        if any(self._is_b(a) for a in kw.values()):
            raise Unsupported("normalize with a per-token argument")
        kw["dim"] = _shift(kw.get("dim", 1))
        return self._emit(nd.op, nd.target, (self._m(args[0]),), self._m(kw))

    def _dropout(self, nd, args, kwargs):
        """Dropout in eval (``training`` the constant False) or of ``p`` 0 is the identity. In
        training it draws a new random mask per call: the recomputed K/V would not be the stored
        ones (recompute_slice.py refuses such a slice first)."""
        flag = "train" if nd.target is torch.dropout else "training"
        training = args[2] if len(args) > 2 else kwargs.get(flag, True)
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        if training is False or (not isinstance(p, fx.Node) and p == 0):
            return self._m(args[0] if args else kwargs["input"])
        if isinstance(training, fx.Node):
            raise Unsupported(f"dropout with a training flag computed in the graph ({nd.name})")
        raise Unsupported(f"dropout in training mode ({nd.name}): the recomputed K/V would draw "
                          "other random masks than the stored ones (call model.eval())")

    def _binary(self, nd, args, kwargs):
        rank = _rank(nd)
        operands = [self._align(self._m(a), a, rank) for a in args]
        return self._emit(nd.op, nd.target, operands, self._m(kwargs))

    def _linear(self, nd, args, kwargs):
        if any(self._is_b(a) for a in args[1:]) or any(self._is_b(a) for a in kwargs.values()):
            raise Unsupported("projection weight depends on the token")
        return self._emit(nd.op, nd.target, self._m(args), self._m(kwargs))

    def _addmm(self, nd, args, kwargs):
        m = self._m
        bias, m1, m2 = args[:3]
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or self._is_b(m2) \
                or self._is_b(bias):
            raise Unsupported("addmm with scaling or a per-token weight")
        mm = self._emit("call_function", torch.matmul, (m(m1), m(m2)))
        return self._emit("call_function", torch.add, (mm, m(bias)))

    def _matmul(self, nd, args, kwargs):
        if self._is_b(args[1]):
            raise Unsupported("matmul of two per-token operands")
        return self._emit("call_function", torch.matmul, (self._m(args[0]), self._m(args[1])))

    def _reshape(self, nd, args, kwargs):
        shape = args[1:] if nd.op == "call_method" else [args[1]]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = list(shape[0])
        elif len(shape) == 1 and isinstance(shape[0], fx.Node) and not isinstance(
                example_value(shape[0]), (int, torch.SymInt)):
            # a whole size computed in the graph (GPT-2 under dynamic=True): not batched
            raise Unsupported(f"{nd.name}: reshape to a size computed in the graph")
        shape = _explicit(shape, nd)   # a -1 cannot be resolved when l = 0 (no elements)
        return self._emit("call_method", "reshape",
                          (self._m(args[0]), self.L, *self._m(list(shape))))

    def _reshape_as(self, nd, args, kwargs):
        """``x.reshape_as(other)`` (RoFormer's rotate-half): as is when both carry the token
        axis, else a reshape to the token axis and ``other``'s sizes."""
        x, other = args[0], args[1]
        if not self._is_b(x):
            raise Unsupported(f"reshape_as of a tensor shared by the tokens ({nd.name})")
        if self._is_b(other):
            return self._emit("call_method", "reshape_as", (self._m(x), self._m(other)))
        sizes = [self._emit("call_method", "size", (self._m(other), i))
                 for i in range(_rank(other))]
        return self._emit("call_method", "reshape", (self._m(x), self.L, *sizes))

    def _transpose(self, nd, args, kwargs):
        return self._emit("call_method", "transpose",
                          (self._m(args[0]), _shift(args[1]), _shift(args[2])))

    def _permute(self, nd, args, kwargs):
        x = args[0]
        dims = args[1:] if nd.op == "call_method" else args[1]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        r = _rank(x)
        return self._emit("call_method", "permute", (self._m(x), 0, *[(d % r) + 1 for d in dims]))

    def _along_dim(self, nd, args, kwargs):
        name = nd.target if nd.op == "call_method" else nd.target.__name__
        return self._dim_rule(nd, name, args, kwargs)

    def _getitem(self, nd, args, kwargs):
        m, x, idx = self._m, args[0], args[1]
        if not isinstance(example_value(x), torch.Tensor):
            return self._emit("call_function", operator.getitem, (m(x), idx))
        idx = idx if isinstance(idx, tuple) else (idx,)
        lists = [i for i in idx if isinstance(i, list)]
        if any(isinstance(i, (fx.Node, torch.Tensor)) for i in idx) or len(lists) > 1 or any(
                not all(isinstance(j, int) for j in lst) for lst in lists):
            # one constant list index keeps its dim in place; anything else may move dims
            raise Unsupported("advanced indexing in the recompute slice")
        return self._emit("call_function", operator.getitem, (m(x), (slice(None), *idx)))

    def _concat(self, nd, args, kwargs):
        tensors = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        parts = []
        for a in tensors:
            if self._is_b(a):
                parts.append(self._m(a))
            else:
                u = self._emit("call_method", "unsqueeze", (self._m(a), 0))
                parts.append(self._emit("call_method", "expand", (u, self.L, *([-1] * _rank(a)))))
        return self._emit("call_function", nd.target, (parts, _shift(dim)))

    def _einsum(self, nd, args=None, kwargs=None):
        """One more subscript, a letter the equation does not use, leads every batched operand
        and the output: the same contraction for each token."""
        equation, operands = nd.args[0], einsum_operands(nd)
        if "->" not in equation or "." in equation:
            raise Unsupported(f"einsum without an explicit output or with an ellipsis ({nd.name})")
        inputs, output = equation.replace(" ", "").split("->")
        letter = next(c for c in string.ascii_letters if c not in equation)
        subs = [letter + sub if self._is_b(a) else sub
                for sub, a in zip(inputs.split(","), operands)]
        return self._emit("call_function", torch.einsum,
                          (",".join(subs) + "->" + letter + output,
                           *[self._m(a) for a in operands]))

    def _dim_rule(self, nd, name, args, kwargs):
        m = self._m
        x = args[0]
        rest, kw = list(args[1:]), dict(kwargs)
        if name == "expand":
            sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            if len(sizes) != _rank(x):
                raise Unsupported("expand that adds dimensions")
            return self._emit("call_method", "expand", (m(x), -1, *m(list(sizes))))
        if name == "movedim":
            return self._emit("call_method", "movedim", (m(x), _shift(rest[0]), _shift(rest[1])))
        if name == "flatten":
            start = rest[0] if rest else kw.pop("start_dim", 0)
            end = rest[1] if len(rest) > 1 else kw.pop("end_dim", -1)
            return self._emit("call_method", "flatten", (m(x), _shift(start), _shift(end)))
        if name in ("split", "chunk", "tensor_split"):
            size = rest[0]
            dim = rest[1] if len(rest) > 1 else kw.pop("dim", 0)
            return self._emit("call_method", name, (m(x), m(size)), {"dim": _shift(dim)})
        if name == "unbind" and not rest and "dim" not in kw:
            kw["dim"] = 0   # unbind's default dim
        # unsqueeze / squeeze / unbind / reductions: the dim is the first extra argument or `dim=`
        if rest:
            dim, rest = rest[0], rest[1:]
        elif "dim" in kw:
            dim = kw.pop("dim")
        else:
            raise Unsupported(f"{name} without an explicit dim would reach the token axis")
        dim = tuple(_shift(d) for d in dim) if isinstance(dim, (tuple, list)) else _shift(dim)
        return self._emit("call_method", name, (m(x), dim, *m(rest)), m(kw))


def _rule_table() -> dict:
    """(is a method call, target) -> rule; where sets overlap the first rule listed wins."""
    b, rules = _Batcher, {}

    def add(method: bool, targets, rule):
        for target in targets:
            rules.setdefault((method, target), rule)

    add(True, ("size", "dim"), b._size)
    add(False, (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size), b._size)
    add(True, UNARY_METHODS, b._pointwise)
    add(False, UNARY_FUNCTIONS | COMPLEX_VIEWS | _TRAILING_FUNCTIONS, b._pointwise)
    add(False, (F.normalize,), b._normalize)
    add(False, (F.dropout, torch.dropout), b._dropout)
    add(True, ("clamp", "clip"), b._clamp)
    add(False, (torch.clamp, torch.clip), b._clamp)
    add(True, BINARY_METHODS, b._binary)
    add(False, BINARY_FUNCTIONS, b._binary)
    add(False, LINEAR, b._linear)
    add(False, ADDMM, b._addmm)
    add(False, MATMUL, b._matmul)
    add(True, ("matmul", "mm"), b._matmul)
    add(True, ("view", "reshape"), b._reshape)
    add(False, (torch.reshape,), b._reshape)
    add(True, ("reshape_as",), b._reshape_as)
    add(True, ("transpose",), b._transpose)
    add(False, (torch.transpose,), b._transpose)
    add(True, ("permute",), b._permute)
    add(False, (torch.permute,), b._permute)
    add(True, ("unsqueeze", "squeeze", "flatten", "movedim", "split", "chunk", "tensor_split",
               "expand", "unbind", *_DIM_REDUCTIONS), b._along_dim)
    add(False, (torch.unsqueeze, torch.squeeze, torch.flatten, torch.split, torch.chunk,
                torch.unbind, torch.softmax, F.softmax, torch.sum, torch.mean), b._along_dim)
    add(False, (operator.getitem,), b._getitem)
    add(False, (torch.cat, torch.stack, torch.concat), b._concat)
    return rules   # einsum (any function named einsum with an equation) is matched apart


_RULES = _rule_table()


def batch_over_tokens(module: fx.GraphModule, num_token_inputs: int) -> fx.GraphModule:
    """(token records with a leading axis l, consts...) -> K, V ``(b, hkv, l, d)``."""
    return _Batcher(module, num_token_inputs).run()


def _explicit(shape: list, nd: fx.Node) -> list:
    """``shape`` with each ``-1`` replaced by the static size the traced single-token node had
    there: the batched graph also runs with l = 0 tokens (a cached length under 1/ratio), where
    reshape cannot infer a -1."""
    value = nd.meta.get("example_value")
    if value is None or -1 not in shape or len(shape) != value.dim():
        return shape
    return [value.shape[i] if s == -1 and isinstance(value.shape[i], int) else s
            for i, s in enumerate(shape)]
