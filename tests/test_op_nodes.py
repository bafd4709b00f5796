"""ops/nodes.py: one named view per kvpr:: op, its fields the op's schema arguments in order."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import fx

from kvpr_compile.ops import nodes


@pytest.mark.parametrize("op", list(nodes.VIEWS), ids=lambda op: op.name())
def test_view_fields_are_the_schema_arguments(op):
    view = nodes.VIEWS[op]
    schema = op._schema.arguments
    assert list(view._fields) == [a.name for a in schema]
    defaults = {a.name: a.default_value for a in schema if a.has_default_value()}
    assert dict(view._field_defaults) == defaults


def test_args_of_binds_positions_keywords_and_defaults():
    graph = fx.Graph()
    handle, k, v = (graph.placeholder(name) for name in ("handle", "k", "v"))
    store = graph.call_function(nodes.STORE_TOKENS, (handle, 3, 7, k, v, [k], [1]))
    load = graph.call_function(nodes.LOAD_KV, (handle, 3, 0, 7, 2, 4, 8),
                               {"dtype": torch.float32, "device": torch.device("cpu")})
    assert nodes.args_of(store).layer == 3 and nodes.args_of(store).shared is None
    assert nodes.args_of(load).device == torch.device("cpu") and nodes.args_of(load).owned is False
    ready = graph.call_function(torch.ops.kvpr.weights_ready, (handle, 5))   # the packet
    assert nodes.is_kvpr(ready) and nodes.args_of(ready).layer == 5
    other = graph.call_function(torch.add, (k, v))
    assert not nodes.is_kvpr(other)
    with pytest.raises(TypeError, match="not a kvpr:: op"):
        nodes.args_of(other)


def test_an_op_run_without_the_runtime_says_what_to_import():
    code = ("import torch, kvpr_compile.ops\n"
            "try:\n    torch.ops.kvpr.weights_ready(torch.zeros(2, dtype=torch.int64), 0)\n"
            "except RuntimeError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert "kvpr::weights_ready has no implementation" in out
    assert "kvpr_compile.runtime.kernels" in out
