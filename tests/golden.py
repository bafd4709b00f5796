"""Golden listings of rewritten graphs: ``kvpr_listing(gm)`` prints the nodes the kvpr rewrite put
into an FX graph, normalised so that only what the rewrite decides shows, and ``assert_golden``
compares a listing with the expected text written in the test, inline.

``KVPR_ACCEPT=1 python -m pytest tests/test_golden_graphs.py`` rewrites each expected text that
differs with what the code now produces (the test then passes); review the diff and commit it.

A listing is not the graph's Python code (``gm.code``): that code also holds every node of the
model, whose names and count move with transformers' modelling code and Dynamo's tracing (an
extra ``_log_api_usage_once`` node renumbers every ``getitem_N`` after it). The listing holds:

- every node the rewrite inserted (``node.meta["custom"]["kvpr_role"]``) and, in a lowered graph,
  every call into kvpr_compile (the store's ``resolve``), in program order, as
  ``name = target(args, key=value)`` under a ``# role`` line where the role changes. Their names
  are renumbered in the listing (``getitem``, ``getitem_1``, ... by first appearance), so that
  nodes of the model before them do not shift them;
- the model's nodes they read, as ``%name``: Dynamo's names of the variables in transformers'
  code (``%k_embed``, ``%hidden_states_2``), parameters by their module path
  (``%layers.0.self_attn.k_proj.weight``) and the cache's inputs under ``%cache.``, whichever
  keyword (``cache=`` or ``past_key_values=``) the installed transformers takes;
- then the model's nodes that read what the rewrite produced, with their positional arguments
  only (keyword arguments of SDPA differ between transformers versions).

Targets print as ``kvpr.<op>`` for the custom ops, ``<module tail>.<function>`` for Python
functions of kvpr_compile (``direct.cpu_load_kv``) and the bare name for torch functions; tensor
methods as ``x.method(...)``, ``getitem`` as a subscript (``x[:, ..., :4]``), devices as
``cpu``, Dynamo's size symbols as ``s?``. Long calls wrap between arguments.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import operator
import os
import re
import textwrap
from pathlib import Path

import torch
from torch import fx

WIDTH = 88   # listing lines wrap here: with the test's indentation they stay within 100


def _is_rewrite(node: fx.Node) -> bool:
    if (node.meta.get("custom") or {}).get("kvpr_role"):
        return True
    module = getattr(node.target, "__module__", None) or ""
    return node.op == "call_function" and module.startswith("kvpr_compile")


def _outside_name(node: fx.Node) -> str:
    name = node.name
    if node.op in ("placeholder", "get_attr"):
        name = re.sub(r"^[lL]_", "", name).rstrip("_")
        if "_modules_" in name:   # a parameter or buffer: its module path
            path = name.split("_modules_", 1)[1]
            name = re.sub(r"_(modules|parameters|buffers)_", ".", path)
            name = re.sub(r"^model\.", "", name)
        name = re.sub(r"^kwargs_(cache|past_key_values)_", "cache.", name)
    return "%" + name


def _target(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    if module.startswith("kvpr_compile"):
        return f"{module.rsplit('.', 1)[-1]}.{name}"
    return name


def _slice(value) -> str | None:
    """A slice or Ellipsis as written in a subscript (``:4``, ``...``); None for anything else."""
    if isinstance(value, slice):
        start, stop = ("" if v is None else str(v) for v in (value.start, value.stop))
        return f"{start}:{stop}" if value.step is None else f"{start}:{stop}:{value.step}"
    return "..." if value is Ellipsis else None


def _value(value, names) -> str:
    if isinstance(value, fx.Node):
        return names.get(value) or _outside_name(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_value(v, names) for v in value)
        if isinstance(value, tuple):
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        return f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_value(v, names)}" for k, v in value.items()) + "}"
    if isinstance(value, torch.device):
        return str(value)
    return _slice(value) or repr(value)


def _index(value, names) -> str:
    """An index as written in a subscript: ``0``, ``:, ..., :4``."""
    items = value if isinstance(value, tuple) else (value,)
    return ", ".join(_slice(v) or _value(v, names) for v in items)


def _pieces(text: str, value, names) -> list[str]:
    """``text`` (a rendered argument) as pieces a line may break between: a list or tuple longer
    than a line is split between its elements."""
    if len(text) <= WIDTH - 8 or not isinstance(value, (list, tuple)) or len(value) < 2:
        return [text]
    open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
    items = [_value(v, names) for v in value]
    return [open_ + items[0] + ",", *[i + "," for i in items[1:-1]], items[-1] + close]


def _call(node: fx.Node, names, kwargs=True) -> list[str]:
    """The call as pieces: the head (up to its first argument), then the rest of the arguments,
    each piece ending where a line may break."""
    args = list(node.args)
    if node.target is operator.getitem and len(args) == 2:
        return [f"{_value(args[0], names)}[{_index(args[1], names)}]"]
    parts = [[_value(a, names), a] for a in args]
    if kwargs:
        parts += [[f"{k}={_value(v, names)}", v] for k, v in node.kwargs.items()]
    if node.op == "call_method" and parts:   # x.method(args)
        head, parts = f"{parts[0][0]}.{node.target}(", parts[1:]
    else:
        head = f"{_target(node)}("
    if not parts:
        return [head + ")"]
    pieces = []
    for i, (text, value) in enumerate(parts):
        split = _pieces(text, value, names) if "=" not in text else [text]
        split[-1] += ")" if i == len(parts) - 1 else ","
        pieces += split
    return [head + pieces[0], *pieces[1:]]


def _line(lhs: str, pieces: list[str]) -> str:
    """``lhs = `` and the pieces, filled up to WIDTH, continuation lines indented by 4."""
    lines, current = [], f"{lhs} = {pieces[0]}"
    for piece in pieces[1:]:
        if len(current) + 1 + len(piece) > WIDTH:
            lines.append(current)
            current = "    " + piece
        else:
            current += " " + piece
    return "\n".join([*lines, current])


def _normalise(text: str) -> str:
    text = re.sub(r"\bs\d+\b", "s?", text)              # Dynamo's size symbols
    return re.sub(r"0x[0-9a-fA-F]+", "0x?", text)       # addresses in reprs


def kvpr_listing(gm: fx.GraphModule) -> str:
    """The normalised listing of the rewrite's nodes in ``gm`` (see the module docstring)."""
    ours = [n for n in gm.graph.nodes if _is_rewrite(n)]
    names, counts = {}, {}
    for node in ours:
        base = re.sub(r"(_default)?(_\d+)?$", "", node.name)
        k = counts.get(base, 0)
        counts[base] = k + 1
        names[node] = base if k == 0 else f"{base}_{k}"
    lines, role = [], None
    for node in ours:
        now = (node.meta.get("custom") or {}).get("kvpr_role", "")
        if now != role:
            lines.append(f"# {now or 'kvpr_compile'}")
            role = now
        lines.append(_line(names[node], _call(node, names)))
    readers = [n for n in gm.graph.nodes if n not in names and n.op != "output"
               and any(a in names for a in n.all_input_nodes)]
    if readers:
        lines.append("# the model's nodes that read them")
        lines += [_line(_outside_name(n), _call(n, names, kwargs=False)) for n in readers]
    outputs = [a for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes
               if a in names]
    if outputs:
        lines.append("# graph outputs: " + ", ".join(names[a] for a in outputs))
    return _normalise("\n".join(lines))


def assert_golden(actual: str, expected: str) -> None:
    """``actual`` equals ``expected`` (dedented, surrounding blank lines dropped). With
    ``KVPR_ACCEPT=1``, a difference rewrites ``expected`` where the calling test writes it (a
    string literal as this call's second argument) instead of failing."""
    want = textwrap.dedent(expected).strip("\n")
    if actual == want:
        return
    if os.environ.get("KVPR_ACCEPT") != "1":
        diff = difflib.unified_diff(want.splitlines(), actual.splitlines(), "expected", "actual",
                                    lineterm="")
        raise AssertionError("golden listing differs (KVPR_ACCEPT=1 rewrites the expected text):\n"
                             + "\n".join(diff))
    caller = inspect.stack()[1]
    _rewrite_literal(Path(caller.filename), caller.lineno, expected, actual)


def _rewrite_literal(path: Path, lineno: int, old: str, new: str) -> None:
    """Replace the string literal ``old``, the second argument of an ``assert_golden`` call in
    ``path``, by ``new`` as an indented triple-quoted block. The call is found by its literal's
    value (line numbers move as earlier goldens in the file are rewritten), by ``lineno`` among
    equal ones."""
    source = path.read_text()
    calls = [c for c in ast.walk(ast.parse(source))
             if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "assert_golden"
             and len(c.args) == 2 and isinstance(c.args[1], ast.Constant)
             and c.args[1].value == old]
    assert calls, f"no assert_golden call with this expected text in {path}"
    call = min(calls, key=lambda c: abs(c.lineno - lineno))
    literal = call.args[1]
    lines = source.splitlines(keepends=True)
    indent = " " * (len(lines[call.lineno - 1]) - len(lines[call.lineno - 1].lstrip()) + 4)
    assert '"""' not in new and "\\" not in new, "the listing cannot go in a plain literal"
    block = '"""\n' + textwrap.indent(new, indent) + "\n" + indent + '"""'
    start = sum(len(line) for line in lines[:literal.lineno - 1]) + \
        len(lines[literal.lineno - 1].encode()[:literal.col_offset].decode())
    end = sum(len(line) for line in lines[:literal.end_lineno - 1]) + \
        len(lines[literal.end_lineno - 1].encode()[:literal.end_col_offset].decode())
    path.write_text(source[:start] + block + source[end:])
