"""Specialise a multi-token recompute slice to one token, so that graphs adding several tokens on a
non-empty past (chunked prefill, speculative verification, a chat's next turn) recompute K,V[:l]
of the past like decode graphs do.

A slice captured with n new tokens has n baked into its shape arguments (``view(b, n, h, d)``,
as an int or as the graph's symbolic token count). The past is recomputed from per-token records
read from the store (X and the side inputs *as stored for those positions*, never this call's),
each shaped like one token. Replacing n by 1 where it is the token count gives the same per-token
slice a decode graph captures; ``batch_tokens`` then adds the leading axis of l tokens.

n is replaced in shape arguments of ``view``/``reshape``/``expand`` at the token dim (traced from
K by token_dims, else the one dim whose size is n) and wherever the symbolic token count itself is
an argument. A size computed from n (``n * heads``), a token dim that cannot be told apart from
others of the same size, or a result that does not have one token's shape (checked on the meta
device, no FLOPs) raises Unsupported: the graph then loads the whole past (exact).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..ops.errors import Unsupported
from .graph_utils import example_value, hint
from .slices import RecomputeSlice, same

_SHAPED = {"view", "reshape", "expand"}


def _free_symbols(value) -> set:
    return set(value.node.expr.free_symbols) if isinstance(value, torch.SymInt) else set()


def _shape_args(nd: fx.Node):
    """(prefix args, shape entries, packed) for view/reshape/expand, else None."""
    method = nd.op == "call_method"
    if not ((method and nd.target in _SHAPED) or (not method and nd.target is torch.reshape)):
        return None
    prefix, rest = list(nd.args[:1]), list(nd.args[1:])
    packed = len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size))
    return prefix, list(rest[0]) if packed else rest, packed


class _OneToken:
    def __init__(self, sl: RecomputeSlice, n, traced: dict):
        self.sl, self.n, self.traced = sl, n, traced
        self.n_symbols = _free_symbols(n)
        self.g = fx.Graph()
        self.env: dict = {}

    def _is_n(self, value) -> bool:
        return same(value, self.n)

    def _const(self, c, ph: fx.Node):
        """One-token value of a slice input that is not a token input (None: itself)."""
        val = example_value(c) if isinstance(c, fx.Node) else c
        if (isinstance(val, (tuple, list, torch.Size))
                and any(_free_symbols(v) & self.n_symbols for v in val)):
            # a whole shape computed outside the slice (GPT-2: ``x.size()[:-1] + (nf,)``)
            return tuple(self._size_entry(v, c) if _free_symbols(v) & self.n_symbols
                         else v if isinstance(v, int)
                         else self.g.call_function(operator.getitem, (ph, i))
                         for i, v in enumerate(val))
        if isinstance(val, torch.SymInt) and _free_symbols(val) & self.n_symbols:
            return self._size_entry(val, c)
        return None

    def _size_entry(self, val, c) -> int:
        if self._is_n(val):
            return 1
        raise Unsupported(f"size {c} is computed from the token count ({val})")

    def _one_token_size(self, size):
        """A size of the n-token slice with n = 1 (``b * n`` -> ``b``) if that is a constant,
        else -1 (resolved by batch_tokens, or by the runtime)."""
        if isinstance(size, torch.SymInt) and self.n_symbols:
            one = size.node.expr.subs({sym: 1 for sym in self.n_symbols})
            return int(one) if one.is_number else -1
        return -1

    def _token_dim(self, nd: fx.Node):
        shape = example_value(nd).shape
        d = self.traced.get(nd)
        if d is not None and self._is_n(shape[d]):
            return d
        dims = [i for i, s in enumerate(shape) if self._is_n(s)]
        if len(dims) > 1:
            raise Unsupported(f"{nd.name} {tuple(shape)} has several dims of the token count; "
                              "its token dim is ambiguous")
        return dims[0] if dims else None

    def _shape_node(self, nd: fx.Node, layout):
        prefix, entries, packed = layout
        t = self._token_dim(nd)
        out = []
        for i, e in enumerate(entries):
            if i == t:
                out.append(1)
                continue
            if isinstance(e, int) and e == -1:   # batch_tokens makes it explicit from the meta
                e = self._one_token_size(example_value(nd).shape[i])   # (an l of 0 cannot infer it)
            val = example_value(e) if isinstance(e, fx.Node) else e
            if isinstance(val, torch.SymInt) and _free_symbols(val) & self.n_symbols:
                raise Unsupported(f"{nd.name}: size {e} at a dim other than the token dim "
                                  "depends on the token count")
            out.append(self.env[e] if isinstance(e, fx.Node) else e)
        args = [self.env[a] for a in prefix] + ([tuple(out)] if packed else out)
        return self.g.create_node(nd.op, nd.target, tuple(args),
                                  dict(fx.node.map_arg(nd.kwargs, self.env.__getitem__)))

    def run(self, k_new: fx.Node, v_new: fx.Node) -> fx.GraphModule:
        sl = self.sl
        for i, t in enumerate(sl.token_inputs):
            self.env[t] = self.g.placeholder(f"token_input_{i}")
            self.env[t].meta["example_value"] = example_value(t)   # ranks: as in a decode slice
        for i, c in enumerate(sl.consts):
            self.env[c] = self.g.placeholder(f"const_{i}")
            if isinstance(c, fx.Node) and "example_value" in c.meta:
                self.env[c].meta["example_value"] = c.meta["example_value"]
        for c in sl.consts:   # after every placeholder: may read parts of one
            one = self._const(c, self.env[c])
            if one is not None:
                self.env[c] = one
        for nd in sl.nodes:
            layout = _shape_args(nd)
            new = (self._shape_node(nd, layout) if layout
                   else self.g.node_copy(nd, self.env.__getitem__))
            new.meta = dict(nd.meta)
            self.env[nd] = new
        self._check_static_n()
        self.g.output((self.env[k_new], self.env[v_new]))
        return fx.GraphModule(torch.nn.Module(), self.g, class_name="KVRecomputeSlice")

    def _check_static_n(self):
        """A static token count baked into arguments other than shapes cannot be told apart
        from any other int of the same value: refuse when such an int appears."""
        if self.n_symbols or not isinstance(self.n, int):
            return
        for nd in self.sl.nodes:
            if _shape_args(nd) is not None:
                continue
            flat = []
            fx.node.map_aggregate((nd.args, nd.kwargs), flat.append)
            if any(isinstance(a, slice) and self.n in (a.start, a.stop) for a in flat):
                raise Unsupported(f"{nd.name} slices with the token count {self.n} baked in")


def one_token_slice(sl: RecomputeSlice, n, traced: dict, k_new: fx.Node, v_new: fx.Node
                    ) -> fx.GraphModule:
    """The per-token slice ``(token records..., consts...) -> K, V (b, hkv, 1, d)`` of a
    multi-token slice with token count ``n``."""
    return _OneToken(sl, n, traced).run(k_new, v_new)


def record_shape(value: torch.Tensor, tdim: int) -> list:
    """Shape of one token's record of a recompute input with token dim ``tdim`` (-1: none)."""
    shape = list(value.shape)
    if tdim >= 0:
        shape[tdim] = 1
    return shape


def check_batched(module: fx.GraphModule, sl: RecomputeSlice, kv: torch.Tensor) -> None:
    """Run the batched slice on the meta device for 0 and 2 tokens' records (sizes at their
    hints): it must give K,V of as many positions; anything else is Unsupported."""
    for tokens in (0, 2):
        _check_tokens(module, sl, kv, tokens)


def _check_tokens(module: fx.GraphModule, sl: RecomputeSlice, kv: torch.Tensor,
                  tokens: int) -> None:
    def meta(value):
        if isinstance(value, torch.Tensor):
            return torch.empty([hint(s) for s in value.shape], dtype=value.dtype, device="meta")
        if isinstance(value, (tuple, list, torch.Size)):   # a whole shape (GPT-2)
            return tuple(meta(v) for v in value)
        return hint(value) if isinstance(value, torch.SymInt) else value

    try:   # sizes without an example value (unbacked) raise too: Unsupported as well
        records = [torch.empty([tokens, *[hint(s) for s in record_shape(example_value(t), d)]],
                               dtype=example_value(t).dtype, device="meta")
                   for t, d in zip(sl.token_inputs, sl.tdims)]
        consts = [meta(example_value(c) if isinstance(c, fx.Node) else c) for c in sl.consts]
        want = (hint(kv.shape[0]), hint(kv.shape[1]), tokens, hint(kv.shape[3]))
        outs = module(*records, *consts)
    except Exception as err:  # noqa: BLE001 - any failure means the specialisation is wrong
        raise Unsupported(f"the slice specialised to one token does not run on {tokens} tokens' "
                          f"records ({type(err).__name__}: {err})") from err
    for o in outs:
        if tuple(o.shape) != want:
            raise Unsupported(f"the slice specialised to one token gives {tuple(o.shape)}, "
                              f"not {want}")
