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
    assert {(a["dtype"], a["shape"], a["kernel"]) for a in rates["attention"]} == {
        (d, s["name"], k) for d in hr.DTYPES for s in hr.QUICK_SHAPES for k in hr.KERNELS}
    assert all(a["gb_per_s"] > 0 and a["kv_bytes"] > 0 for a in rates["attention"])
    assert rates["memory"]["copy_gb_per_s"] > 0 and rates["memory"]["read_gb_per_s"] > 0
    if not torch.cuda.is_available():
        assert "needs CUDA" in rates["round_trip"]["absent"]
    assert "GB/s of K,V" in capsys.readouterr().out


def test_attention_past_the_budget_is_recorded_absent():
    rates = hr.measure(quick=True, max_s=0.0)
    assert rates["attention"][0]["gb_per_s"] > 0            # the first always runs
    assert all("past the 0 s budget" in a["absent"] for a in rates["attention"][1:])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_runtime_kernel_timed_is_the_workers_attention_over_store_rows(dtype):
    """What `kvpr profile --host` times (kernel "runtime") is the CPU worker's own call on
    token-major store rows: its result equals ``runtime.cpu_attention.attend`` over a store
    holding those rows, and the native kernel computes the same attention."""
    from types import SimpleNamespace

    from kvpr_compile.plan import host_timing
    from kvpr_compile.runtime import cpu_attention
    shape = hr.QUICK_SHAPES[1]
    q, k_rows, v_rows = host_timing.decode_tensors(shape, dtype)
    assert k_rows.shape == (shape["past"], shape["batch"], shape["kv_heads"], shape["head_dim"])
    out, lse = host_timing.kernel_call("runtime", q, k_rows, v_rows)()
    store = SimpleNamespace(k=[k_rows], v=[v_rows])
    want = cpu_attention.attend(store, 0, q, 0, shape["past"], None,
                                1.0 / math.sqrt(shape["head_dim"]))
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    native_out, native_lse = host_timing.kernel_call("native", q, k_rows, v_rows)()
    tol = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(native_out.float(), out, atol=tol, rtol=tol)
    torch.testing.assert_close(native_lse.float(), lse, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="kernel must be one of"):
        host_timing.kernel_call("fast", q, k_rows, v_rows)


def test_the_profile_measures_at_the_workers_thread_count(monkeypatch):
    from kvpr_compile.ops import attention
    from kvpr_compile.plan import host_measure
    monkeypatch.setattr(attention, "WORKER_THREADS", 3)   # not this machine's default
    rates = host_measure.measure_host(dtypes=("float32",), quick=True, repeats=1)
    assert rates.threads == 3 and "CPU worker's kernel" in rates.notes
