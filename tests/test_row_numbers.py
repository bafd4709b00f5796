"""Row numbers (``arange(batch)``) under the throughput schedule (passes/row_numbers.py).

transformers 5.17's OPT builds its padding mask as ``mask[arange(b)[:, None, None, None], kv]``
(``sdpa_mask`` without vmap); the throughput schedule refused every such graph ("indexes along
the batch axis"), so the first GPU run's throughput rows were the latency schedule. RowPickModel
has the same pattern with a mask that differs per row: picking another row's mask, or numbering a
micro-batch's rows from 0 where the whole batch numbers them otherwise, would change the result.
"""
from __future__ import annotations

import pytest
import torch

import kvpr_compile
from helpers import decode_steps, worst_rel_err
from custom_models import FusedQKVModel, make_cache

TOL = 1e-5


class RowPickModel(FusedQKVModel):
    """FusedQKVModel whose attention mask is picked row by row with ``arange(batch)``: row i
    hides key position ``tokens[i, -1] % 3`` (the diagonal stays visible). ``misuse``: the
    row numbers also added to the logits ("values": ``arange(b)``; "range":
    ``arange(1, b + 1)``), or a pick that crosses rows ("crossed"), which the throughput
    schedule must refuse."""

    def __init__(self, misuse=None):
        torch.manual_seed(0)
        super().__init__(layers=2)
        self.misuse = misuse
        self.eval()

    def forward(self, tokens, cache):
        (b, n), pos = tokens.shape, cache.seq_len(0)
        total = pos + n
        hidden = (tokens[:, -1:] % 3) != torch.arange(total, device=tokens.device)[None, :]
        rows = torch.arange(b, device=tokens.device)
        kv = torch.arange(total, device=tokens.device)[None, None, None, :]
        q = torch.arange(pos, total, device=tokens.device)[None, None, :, None]
        mask = (kv <= q) & (hidden[rows[:, None, None, None], kv] | (kv == q))
        x = self.wte(tokens) + self.wpe(torch.arange(pos, total, device=tokens.device))
        for blk in self.blocks:
            x = blk(x, mask, cache)
        logits = self.head(x)
        if self.misuse == "values":
            logits = logits + rows[:, None, None].float()
        if self.misuse == "range":
            logits = logits + torch.arange(1, b + 1, device=tokens.device)[:, None, None].float()
        if self.misuse == "crossed":   # row i: every row's mask at row i's own position
            crossed = hidden[rows[None, :], (tokens[:, -1] % total)[:, None]]
            logits = logits + crossed.float().sum(1)[:, None, None]
        return logits


PROMPT = torch.randint(0, 97, (5, 6), generator=torch.Generator().manual_seed(5))


def _run(model, m, poison=False):
    """(worst error against eager, the notes of every graph compiled, the last report); the
    refusal's warning is given once per process, so its reason is read from the notes."""
    want = decode_steps(model, PROMPT, make_cache(model, 5), 2)
    compiled = torch.compile(model, backend="kvpr", dynamic=True,
                             options={"schedule": "throughput", "micro_batches": m, "ratio": 1.0})
    first = len(kvpr_compile.reports())
    got = decode_steps(compiled, PROMPT, make_cache(model, 5), 2, poison=poison)
    reports = kvpr_compile.reports()[first:]
    assert len(reports) == 2   # the prefill and the decode graph
    err = worst_rel_err([got[0], *got[1]], [want[0], *want[1]])
    assert torch.equal(got[2], want[2])
    return err, [note for r in reports for note in r.notes], reports[-1]


def test_own_row_mask_pick_runs_the_throughput_schedule_exactly():
    """Batch 5 as [3, 2], stored K,V poisoned after the prefill (ratio 1 recomputes them all):
    not refused, and equal to eager although each row's mask differs."""
    assert len(set((PROMPT[:, -1] % 3).tolist())) > 1   # the rows' prefill masks differ
    err, notes, report = _run(RowPickModel(), 2, poison=True)
    assert not [n for n in notes if "not applied" in n], notes
    assert report.schedule == "throughput" and report.micro_batches == [3, 2], str(report)
    assert err <= TOL


@pytest.mark.parametrize("misuse,why", [("values", "uses them as values"),
                                        ("range", "arange) numbers a range computed from"),
                                        ("crossed", "batch on more than one axis (rows crossed)")],
                         ids=["values", "range", "crossed"])
def test_row_numbers_as_values_keep_the_latency_schedule(misuse, why):
    """Row numbers differ between a micro-batch and the whole batch: refused, naming the node
    and why, and the latency schedule is exact."""
    err, notes, report = _run(RowPickModel(misuse), 2)
    assert any(why in n and "latency" in n for n in notes), notes
    assert report.schedule == "latency"
    assert err <= TOL
