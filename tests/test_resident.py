"""The resident share of the cache (runtime/resident.py): K,V [0, r) read from device rows,
recompute [r, r + l), loads [r + l, past). Exact against eager on the CPU path and on simulated
streams, the device rows proven read (the store's rows poisoned under them), dropped when the
store changes behind them, and race-free on simulated streams."""
from __future__ import annotations

import pytest
import torch

from helpers import (check_race_free, decode_seeded, hf_build, hf_generate, hf_left_padded,
                     on_paths, sim_backend, tiny_llama, worst_rel_err)
from kvpr_compile.runtime import cuda_runtime, traffic
from kvpr_compile.runtime.resident import ResidentRows

TOL = 1e-5
STEPS = 10
SPLITS = [(0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (0.5, 0.5), (0.5, 0.0), (0.25, 0.5)]
# on simulated streams by default: a share alone, the whole past resident, and a share with a
# recompute (no share: what test_runtime_sim.py runs; a second fractional split: a repeat)
SIM_SLOW = {(0.0, 0.0), (0.5, 0.0), (0.25, 0.5)}


def _run(model, options, steps=STEPS, backend="kvpr", poison=None, cache=None):
    compiled = torch.compile(model, backend=backend, options=options)
    cache = cache if cache is not None else model.make_cache(2, 96)
    if poison is None:
        return cache, decode_seeded(model, cache, steps, compiled)
    with torch.no_grad():   # prefill, poison, then decode
        from helpers import SEEDED_PROMPT
        first = compiled(SEEDED_PROMPT, cache)
        poison(cache)
        nxt, logits = first[:, -1].argmax(-1, keepdim=True), []
        for _ in range(steps):
            out = compiled(nxt, cache)[:, -1]
            logits.append(out)
            nxt = out.argmax(-1, keepdim=True)
    return cache, (logits, None)


@pytest.mark.parametrize("path,ratio,share", on_paths(SPLITS, SIM_SLOW), indirect=["path"])
def test_resident_share_is_exact(path, ratio, share):
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    cache, out = _run(model, {"ratio": ratio, "resident_ratio": share})
    assert worst_rel_err(out[0], ref[0]) <= TOL
    assert torch.equal(out[1], ref[1])
    held = cache._store.resident
    past = 6 + STEPS
    if share:   # every stored token appended while the rows have room (48 of 96 at 0.5)
        assert held.filled == [past] * 4
        assert held.k[0].shape[0] == int(share * 96)
    else:
        assert held.k == [None] * 4


def _poison_store_rows(end):
    """Poison the store's K,V rows [0, end) directly (not through k_cpu, which drops the device
    rows): only a step that reads the store there sees NaN."""
    def poison(cache):
        for t in cache._store.k + cache._store.v:
            t[:end].fill_(float("nan"))
    return poison


@pytest.mark.parametrize("path,ratio,share,rows", on_paths(
    [(0.0, 1.0, 6), (0.0, 0.5, 3), (0.5, 0.5, 3)], slow_on_sim={(0.0, 1.0, 6), (0.0, 0.5, 3)}),
    indirect=["path"])
def test_attention_reads_the_device_rows(path, ratio, share, rows):
    """The store's rows under the resident prefix are NaN after the prefill; decode stays exact,
    so attention read the device rows there."""
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    _, out = _run(model, {"ratio": ratio, "resident_ratio": share},
                  poison=_poison_store_rows(rows))
    assert worst_rel_err(out[0], ref[0]) <= TOL


def test_store_rows_past_the_resident_prefix_are_read(path):
    """Negative control: poisoning one row past the prefix (a loaded row) shows."""
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), 2)
    _, out = _run(model, {"ratio": 0.0, "resident_ratio": 0.5}, steps=2,
                  poison=_poison_store_rows(4))
    assert worst_rel_err(out[0], ref[0]) == float("inf")


def test_k_cpu_handed_out_drops_the_device_rows(path):
    """Written through k_cpu, the store is the truth again: the rows are dropped and refilled
    from it (the NaN written there shows)."""
    model = tiny_llama()

    def poison(cache):
        for t in cache.k_cpu + cache.v_cpu:
            t[:2].fill_(float("nan"))
        assert cache._store.resident.filled == [0] * 4

    _, out = _run(model, {"ratio": 0.0, "resident_ratio": 1.0}, steps=2, poison=poison)
    assert worst_rel_err(out[0], out[0]) == float("inf")


def test_uncompiled_step_in_between_and_reset(path):
    """An uncompiled step truncates the rows at its position (the next compiled step refills
    them from the store); ``reset()`` empties them; both stay exact."""
    model = tiny_llama()
    ref_cache = model.make_cache(2, 96)
    ref = decode_seeded(model, ref_cache, 3)
    compiled = torch.compile(model, backend="kvpr", options={"resident_ratio": 1.0,
                                                              "ratio": 0.0})
    cache = model.make_cache(2, 96)
    out = decode_seeded(model, cache, 3, compiled)
    assert cache._store.resident.filled == [9] * 4
    with torch.no_grad():
        nxt = out[0][-1].argmax(-1, keepdim=True)
        a, b = model(nxt, ref_cache), model(nxt, cache)     # uncompiled: rows cut at 9
        assert cache._store.resident.filled == [9] * 4
        nxt = a[:, -1].argmax(-1, keepdim=True)
        assert worst_rel_err([compiled(nxt, cache)], [model(nxt, ref_cache)]) <= TOL
    assert worst_rel_err([b], [a]) <= TOL
    assert cache._store.resident.filled == [11] * 4
    cache.reset()
    assert cache._store.resident.filled == [0] * 4
    again = decode_seeded(model, cache, 3, compiled)
    assert worst_rel_err(again[0], ref[0]) <= TOL


def test_decode_loads_only_the_rest(path):
    """Per decode step the K,V loaded are the non-resident rows: nothing at share 1, the rows
    [floor(share * past), past) at 0.5. On simulated streams layer 0's loads were prefetched by
    the step before, and the step prefetches the next call's: layer 0's non-resident rows at
    past + 1, after that call's own resident prefix."""
    model = tiny_llama()
    for share in (1.0, 0.5, 0.0):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.0,
                                                                  "resident_ratio": share})
        cache = model.make_cache(2, 96)
        decode_seeded(model, cache, 2, compiled)   # compiled, rows filled
        row = 2 * 2 * 4 * 16 * 4   # K and V, batch 2, 4 heads, head_dim 16, fp32
        with torch.no_grad(), traffic.counting() as counted:
            compiled(torch.zeros(2, 1, dtype=torch.long), cache)
        past = 8
        rows = 4 * (past - int(share * past))
        if path != "cpu":
            rows += (past + 1 - int(share * (past + 1))) - (past - int(share * past))
        assert counted.by_kind["kv"] == rows * row
        assert counted.by_kind["resident"] == 0


def test_race_free_on_simulated_streams(sim, monkeypatch):
    """Resident rows read on the compute stream (logged) only after their writes; refilled from
    the store after the layer's stores landed."""
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    api = sim()
    rows = ResidentRows.rows

    def logged_rows(self, layer, r):
        k, v = rows(self, layer, r)
        api.races.read(api.current, k, "resident K")
        api.races.read(api.current, v, "resident V")
        return k, v

    monkeypatch.setattr(ResidentRows, "rows", logged_rows)
    compiled = torch.compile(model, backend=sim_backend(),
                             options={"ratio": 0.25, "resident_ratio": 0.5})
    cache = model.make_cache(2, 96)
    half = decode_seeded(model, cache, STEPS // 2, compiled)
    cache._store.resident.clear()   # the next step refills from rows stored on the D2H stream
    with torch.no_grad():
        nxt, logits = half[1][:, -1:], list(half[0])
        nxt = logits[-1].argmax(-1, keepdim=True)
        for _ in range(STEPS - STEPS // 2):
            out = compiled(nxt, cache)[:, -1]
            logits.append(out)
            nxt = out.argmax(-1, keepdim=True)
    assert worst_rel_err(logits, ref[0]) <= TOL
    assert api.races.accesses > 100 and api.races.found == []
    assert cache._store.resident.filled == [6 + STEPS] * 4


def test_layer_ahead_loads_with_a_resident_share(sim):
    """The layer-ahead slots and waits are as without residency (check_race_free)."""
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    api = sim()
    compiled = torch.compile(model, backend=sim_backend(),
                             options={"ratio": 0.5, "resident_ratio": 0.5})
    cache = model.make_cache(2, 96)
    out = decode_seeded(model, cache, STEPS, compiled)
    check_race_free(api, ref, out)
    assert len(cuda_runtime.runtime(cache._store, "cpu").slots.slots) == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("ratio,share", [pytest.param(0.0, 0.5, marks=pytest.mark.slow),
                                         pytest.param(0.0, 1.0, marks=pytest.mark.slow),
                                         (0.5, 0.5)])   # the splits: test_resident_share_is_exact
def test_hf_generate_with_a_resident_share(arch, ratio, share):
    model = hf_build(arch)
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = hf_generate(model, ids)
    model.forward = torch.compile(model.forward, backend="kvpr",
                                  options={"ratio": ratio, "resident_ratio": share})
    out = hf_generate(model, ids)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)


def test_hf_left_padding_with_a_resident_share():
    model = hf_build("llama")
    ref, out = hf_left_padded(model, ratio=0.5, resident_ratio=0.5)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)


# -- a budget instead of a forced share (stages/residency.py) ----------------------------------

ROW = 2 * 2 * 4 * 16 * 4            # one position's K and V in one layer (batch 2, fp32)
WORKING_SET = 3 * ROW * 97          # two K,V slots and one assembled K,V for 96 + 1 positions


def _budget_run(model, budget, ratio, steps=STEPS, backend="kvpr"):
    compiled = torch.compile(model, backend=backend, options={"ratio": ratio,
                                                              "gpu_budget_bytes": budget})
    cache = model.make_cache(2, 96)
    return cache, compiled, decode_seeded(model, cache, steps, compiled)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_the_budget_fills_mid_generation(path, ratio):
    """12 tokens per layer fit besides the working set: the prompt (6) and 6 steps go to the
    device rows, later tokens only to the store; exact, and each later step loads (or
    recomputes) only the positions past 12."""
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    x_slots = 2 * 2 * 64 * 4 * 97 if ratio else 0
    cache, compiled, out = _budget_run(model, WORKING_SET + x_slots + 4 * 12 * ROW, ratio)
    assert worst_rel_err(out[0], ref[0]) <= TOL
    assert torch.equal(out[1], ref[1])
    assert cache._store.resident.filled == [12] * 4
    assert cache._store.resident.k[0].shape[0] == 12
    if path == "cpu":
        with torch.no_grad(), traffic.counting() as counted:
            compiled(torch.zeros(2, 1, dtype=torch.long), cache)
        past = 6 + STEPS
        rest = past - 12
        l = int(ratio * rest)
        assert counted.by_kind["kv"] == 4 * (rest - l) * ROW


def test_a_budget_that_holds_everything_loads_nothing_after_the_prefill(path):
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    with traffic.counting() as counted:
        cache, _, out = _budget_run(model, 1e9, 0.5)
    assert worst_rel_err(out[0], ref[0]) <= TOL
    assert counted.bytes == 0   # recomputes nothing, loads nothing: all of it resident
    assert cache._store.resident.filled == [6 + STEPS] * 4


def test_a_budget_below_the_working_set_is_refused_before_anything_is_written():
    model = tiny_llama()
    cache = model.make_cache(2, 96)
    compiled = torch.compile(model, backend="kvpr", options={"gpu_budget_bytes": 1000.0,
                                                              "ratio": 0.0})
    with pytest.raises(Exception, match=r"gpu_budget_bytes'\]=1000.0 is below the latency "
                                        r"working set of 297984 bytes \(K,V slots 198656, "
                                        r"assembled K,V 99328; batch 2, 97 positions\)"):
        with torch.no_grad():
            compiled(torch.zeros(2, 3, dtype=torch.long), cache)
    assert cache.seq_len(0) == 0 and cache._store.written == [0] * 4


def test_auto_is_free_memory_less_the_margin(monkeypatch):
    from kvpr_compile.stages import residency
    monkeypatch.setattr(residency, "free_device_bytes", lambda device: 20 << 30)
    assert residency.auto_budget(torch.device("cuda")) == (20 << 30) * 0.9
    monkeypatch.setattr(residency, "free_device_bytes", lambda device: 0)
    with pytest.raises(ValueError, match=r"'auto': cuda reports 0 bytes free"):
        residency.auto_budget(torch.device("cuda"))
    assert residency.auto_budget(torch.device("cpu")) is None


def test_the_report_names_the_resident_tokens_and_device_bytes():
    import kvpr_compile
    model = tiny_llama()
    _budget_run(model, WORKING_SET + 4 * 12 * ROW, 0.0, steps=1)
    notes = [entry.note for entry in kvpr_compile.last_report().layers]
    assert notes == [f"resident: the past up to 12 tokens on the device "
                     f"({12 * ROW} bytes); the ratio applies to the rest"] * 4


@pytest.mark.parametrize("path,ratio,share", on_paths([(0.0, 0.5), (0.5, 0.5)],
                                                      slow_on_sim={(0.0, 0.5)}), indirect=["path"])
def test_multi_token_steps_with_a_resident_share(path, ratio, share):
    """Chunks of 3 and 5 on a past, decode steps and a next turn: each graph appends as many
    new tokens as fit and reads its resident prefix; the store's rows under the prefix
    poisoned after the prefill."""
    from helpers import conversation
    model = tiny_llama(layers=2)
    ref = conversation(model, model.make_cache(2, 96))
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio,
                                                              "resident_ratio": share})
    out = conversation(compiled, model.make_cache(2, 96), poison=_poison_store_rows(3))
    assert worst_rel_err(out, ref) <= TOL


@pytest.mark.cuda
def test_auto_budget_on_cuda_keeps_a_small_cache_resident():
    """On CUDA the default budget ("auto") holds a small cache whole: exact, and no K,V or X
    crosses the link after the prefill."""
    from helpers import SEEDED_PROMPT
    model = tiny_llama().cuda()
    prompt = SEEDED_PROMPT.cuda()

    @torch.no_grad()
    def decode(run, cache):
        nxt, logits = run(prompt, cache)[:, -1].argmax(-1, keepdim=True), []
        with traffic.counting() as counted:
            for _ in range(STEPS):
                logits.append(run(nxt, cache)[:, -1])
                nxt = logits[-1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
        return logits, counted

    ref, _ = decode(model, model.make_cache(2, 96, device="cuda"))
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.5})
    out, counted = decode(compiled, model.make_cache(2, 96, device="cuda"))
    assert worst_rel_err(out, ref) <= 1e-4
    assert counted.by_kind["kv"] == counted.by_kind["tokens"] == 0


def test_hf_generate_whose_cache_fits_moves_nothing():
    """An HF Llama through generate with a budget that holds its whole cache: exact, and the
    runtime loads nothing at all (the prefill stores, every step reads the device rows)."""
    model = hf_build("llama")
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = hf_generate(model, ids)
    model.forward = torch.compile(model.forward, backend="kvpr",
                                  options={"ratio": 0.5, "gpu_budget_bytes": 1e9})
    with traffic.counting() as counted:
        out = hf_generate(model, ids)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    assert counted.bytes == 0


@pytest.mark.slow   # protocol children for three contenders: half a minute on a CPU
def test_bench_contenders_with_a_resident_share(tmp_path, capsys):
    """Protocol 2's opt-in contenders: kvpr at ratio 0 with a third and two thirds of the cache
    resident, in the same schema as the others (timings meaningless on a CPU)."""
    import json
    from kvpr_compile.bench import contenders as ct
    from kvpr_compile.bench import schema
    from kvpr_compile.bench.main import main
    out = tmp_path / "part.json"
    torch.compiler.reset()
    code = main(["--protocol", "2", "--cpu-smoke", "--order-seed", "5", "--json", str(out),
                 "--results-dir", str(tmp_path / "results"), "--workdir", str(tmp_path / "w"),
                 "--in-process", "--models", "llama-3-8b", "--layers", "1", "--steps", "3",
                 "--repeats", "1", "--only", ct.KVPR_RATIO0, ct.RESIDENT_THIRD,
                 ct.RESIDENT_TWO_THIRDS])
    torch.compiler.reset()
    assert code == 0, capsys.readouterr().err[-2000:]
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == []
    row = doc["rows"][0]["contenders"]
    assert set(row) == {ct.KVPR_RATIO0, ct.RESIDENT_THIRD, ct.RESIDENT_TWO_THIRDS}
    assert all((c["steps"], c["repeats"]) == (3, 1) for c in row.values())
