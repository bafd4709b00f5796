"""peft-style LoRA on the K and V projections, with its dropout module: in eval the dropout is
the identity, so the token batching passes it through and every layer recomputes, exactly; in
training it draws random masks, so the layers are refused with the reason.

The adapter is written here (no peft dependency) the way peft's ``LoraLayer`` computes it:
``base(x) + lora_B(lora_A(dropout(x))) * scaling``, with lora_B non-zero so it counts."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import kvpr_compile
from helpers import decode_steps, tiny_llama, worst_rel_err
from kvpr_compile import report as report_mod
from kvpr_compile.ops.errors import Unsupported
from kvpr_compile.passes.batch_tokens import batch_over_tokens

TOL = 1e-5
PROMPT = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(7))
LEFT = "left as a plain offloaded-cache read"


@pytest.fixture(autouse=True)
def fresh_warnings():
    report_mod._WARNED.clear()


class LoraLinear(nn.Module):
    """A linear layer with a rank-``r`` LoRA adapter behind a dropout, as peft wraps it."""

    def __init__(self, base: nn.Linear, r=4, alpha=8, dropout=0.1):
        super().__init__()
        self.base_layer = base
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def lora_llama():
    model = tiny_llama()
    torch.manual_seed(1)
    for block in model.layers:
        block.attn.wk, block.attn.wv = LoraLinear(block.attn.wk), LoraLinear(block.attn.wv)
    return model.eval()


def compiled_decode(model, ratio, poison=False):
    """The compiled decode (prefill + 5 steps), its kvpr warnings and its reports."""
    first = len(kvpr_compile.reports())
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_steps(compiled, PROMPT, model.make_cache(2, 96), 5, poison=poison)
    kvpr = [str(w.message) for w in caught if str(w.message).startswith("kvpr:")]
    return out, kvpr, kvpr_compile.reports()[first:]


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_lora_with_dropout_in_eval_recomputes_every_layer_exactly(ratio):
    model = lora_llama()
    ref = decode_steps(model, PROMPT, model.make_cache(2, 96), 5)
    # at ratio 1 every past K/V is recomputed: NaN in the stored ones must not reach the output
    out, kvpr, reports = compiled_decode(model, ratio, poison=ratio == 1.0)
    assert worst_rel_err([out[0], *out[1]], [ref[0], *ref[1]]) <= TOL
    assert torch.equal(out[2], ref[2])
    assert not [m for m in kvpr if LEFT in m], kvpr
    decode = report_mod.decode_graph_report(reports)
    assert decode is not None and not decode.skipped
    assert decode.ratios == {layer: pytest.approx(ratio) for layer in range(4)}


def test_lora_with_dropout_in_training_is_refused_with_the_reason():
    model = lora_llama().train()
    _, kvpr, reports = compiled_decode(model, 0.5)
    skipped = [reason for r in reports for _, reason in r.skipped]
    assert skipped and all("random" in s and "dropout" in s and LEFT in s for s in skipped)
    assert not any(r.layers for r in reports)
    assert any("dropout" in m and LEFT in m for m in kvpr)


def _dropout_slice(training) -> fx.GraphModule:
    """A one-token slice X -> (K, V) through a dropout with this ``training`` flag."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.randn(2, 1, 8)
    y = g.call_function(F.dropout, (x, 0.1, training, False))
    y.meta["example_value"] = torch.randn(2, 1, 8)
    kv = g.call_method("view", (y, 2, 1, 2, 4))
    kv.meta["example_value"] = torch.randn(2, 1, 2, 4)
    t = g.call_method("transpose", (kv, 1, 2))
    t.meta["example_value"] = torch.randn(2, 2, 1, 4)
    g.output((t, t))
    return fx.GraphModule(nn.Module(), g)


@pytest.mark.quick
def test_dropout_batches_as_the_identity_in_eval_and_refuses_in_training():
    batched = batch_over_tokens(_dropout_slice(False), 1)
    x = torch.randn(3, 2, 1, 8)   # three tokens' X
    k, v = batched(x)
    one = [x[t].view(2, 1, 2, 4).transpose(1, 2) for t in range(3)]
    assert torch.equal(k, torch.cat(one, 2)) and torch.equal(v, k)
    assert not any(n.target is F.dropout for n in batched.graph.nodes)
    with pytest.raises(Unsupported, match="dropout in training mode"):
        batch_over_tokens(_dropout_slice(True), 1)
