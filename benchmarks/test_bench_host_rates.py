"""The host-side rates on tiny shapes: the CPU attention is the exact attention (with its
log-sum-exp), the command writes every rate, and the round trip says why it is absent on a CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import host_rates as cli
from kvpr_compile.bench import host_rates as hr

pytestmark = pytest.mark.quick


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attend_is_sdpa_for_one_query_and_returns_the_logsumexp(kv_heads):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 8, generator=gen)
    k, v = torch.randn(2, kv_heads, 10, 8, generator=gen), torch.randn(2, kv_heads, 10, 8,
                                                                      generator=gen)
    out, lse = hr.attend(q, k, v)
    rep = 4 // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


def test_thread_counts_double_up_to_every_core():
    assert hr.thread_counts(1) == [1] and hr.thread_counts(6) == [1, 2, 4, 6]
    assert hr.thread_counts(16) == [1, 2, 4, 8, 16]


def test_quick_rates_from_the_command(tmp_path, capsys):
    path = tmp_path / "rates.json"
    assert cli.main(["--quick", "--json", str(path)]) == 0
    rates = json.loads(path.read_text())
    assert {(a["dtype"], a["shape"]) for a in rates["attention"]} == {
        (d, s["name"]) for d in hr.DTYPES for s in hr.QUICK_SHAPES}
    assert all(a["gb_per_s"] > 0 and a["kv_bytes"] > 0 for a in rates["attention"])
    assert rates["memory"]["copy_gb_per_s"] > 0 and rates["memory"]["read_gb_per_s"] > 0
    if not torch.cuda.is_available():
        assert "needs CUDA" in rates["round_trip"]["absent"]
    assert "GB/s of K,V" in capsys.readouterr().out


def test_attention_past_the_budget_is_recorded_absent():
    rates = hr.measure(quick=True, max_s=0.0)
    assert rates["attention"][0]["gb_per_s"] > 0            # the first always runs
    assert all("past the 0 s budget" in a["absent"] for a in rates["attention"][1:])
