"""The batch size other than as the batch axis's size, under the throughput schedule
(passes/batch_values.py).

Each micro-batch sees its own size, so a graph that divides by the batch size, slices a table
with it or builds a second axis from it computes something else per micro-batch than the whole
batch does. Before batch_values.py these graphs ran micro-batched and silently wrong (``x / b``
and ``table[:b]`` passed the row analysis). Each must keep the latency schedule, name the node
and the reason, and stay exact.
"""
from __future__ import annotations

import pytest
import torch

import kvpr_compile
from helpers import decode_steps, worst_rel_err
from custom_models import FusedQKVModel, make_cache

TOL = 1e-5


class BatchSizeModel(FusedQKVModel):
    """FusedQKVModel whose logits also depend on the batch size (``use``): divided by it
    ("value"), a per-row bias read from a table's first b rows ("slice"), or each row's mean over
    a (b, b) matrix of all rows' hidden states ("square"); "shape" only views with it (allowed)."""

    def __init__(self, use):
        torch.manual_seed(0)
        super().__init__(layers=2)
        self.use = use
        self.bias = torch.nn.Parameter(torch.randn(16, 1, 97))
        self.eval()

    def forward(self, tokens, cache):
        logits = super().forward(tokens, cache)
        b, n = tokens.shape
        if self.use == "value":
            logits = logits / b
        elif self.use == "slice":
            logits = logits + self.bias[:b]
        elif self.use == "square":
            col = logits[:, -1, :1]                       # (b, 1)
            square = col - col.t()                        # (b, b): every pair of rows
            logits = logits + square.mean(1)[:, None, None]
        elif self.use == "shape":
            logits = logits.reshape(b * n, -1).view(b, n, -1)
        return logits


PROMPT = torch.randint(0, 97, (5, 6), generator=torch.Generator().manual_seed(7))


def _run(model):
    want = decode_steps(model, PROMPT, make_cache(model, 5), 2)
    compiled = torch.compile(model, backend="kvpr", dynamic=True,
                             options={"schedule": "throughput", "micro_batches": 2, "ratio": 1.0})
    first = len(kvpr_compile.reports())
    got = decode_steps(compiled, PROMPT, make_cache(model, 5), 2, poison=True)
    reports = kvpr_compile.reports()[first:]
    err = worst_rel_err([got[0], *got[1]], [want[0], *want[1]])
    assert torch.equal(got[2], want[2])
    return err, [note for r in reports for note in r.notes], reports[-1]


@pytest.mark.parametrize("use,why", [("value", "uses the batch size as a value"),
                                     ("slice", "indexes or slices with the batch size"),
                                     ("square", "has the batch size in 2 axes")])
def test_batch_size_beyond_the_batch_axis_keeps_the_latency_schedule(use, why):
    err, notes, report = _run(BatchSizeModel(use))
    assert any(why in n and "latency" in n for n in notes), notes
    assert report.schedule == "latency"
    assert err <= TOL


def test_batch_size_as_a_shape_runs_micro_batched():
    """Views sized by the batch (flattening batch and tokens and back) are per row: allowed."""
    err, notes, report = _run(BatchSizeModel("shape"))
    assert not [n for n in notes if "not applied" in n], notes
    assert report.schedule == "throughput" and report.micro_batches == [3, 2], str(report)
    assert err <= TOL
