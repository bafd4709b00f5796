"""Benchmark protocol 2 without a device: each sanity flag fires on a doctored timing and stays
quiet on a clean one (the pure functions, and through a whole row built from synthetic
children), the yardsticks' arithmetic, the schema's validator and never-overwriting writer."""
from __future__ import annotations

import copy
import json

import pytest

from kvpr_compile.bench import assemble, flags as fl, schema, yardsticks as ys
from kvpr_compile.bench import contenders as ct
from kvpr_compile.bench.rounds import orders

pytestmark = pytest.mark.quick

# ---- the pure flags -----------------------------------------------------------------------


def test_each_pure_flag_fires_on_doctored_and_not_on_clean_numbers():
    assert fl.host_bound(9.0, 10.0) and not fl.host_bound(2.0, 10.0)
    assert not fl.host_bound(None, 10.0)
    assert fl.spread(8.0, 10.0, 12.0) and not fl.spread(9.8, 10.0, 10.3)
    assert fl.rounds_differ([10.0, 11.5]) and not fl.rounds_differ([10.0, 10.4])
    assert not fl.rounds_differ([10.0])
    assert fl.event_vs_wall(10.0, 12.0) and not fl.event_vs_wall(10.0, 10.5)
    assert fl.grown({"a": 1, "b": 2}, {"a": 2, "b": 2}, ["a", "b", "c"]) == ["a"]
    assert fl.over_bytes_bound(190.0, 40.0) and not fl.over_bytes_bound(48.9, 40.0)
    assert fl.ratio0_slow(50.0, 20.0, 7.0) and not fl.ratio0_slow(21.0, 20.0, 7.0)
    assert fl.ratio0_slow(60.0, None, 40.0) and not fl.ratio0_slow(50.0, None, 40.0)
    assert fl.below_floor(9.0, 10.0) and not fl.below_floor(9.8, 10.0)
    assert fl.resident_slow(70.0, 5.7e9, 3e12) and not fl.resident_slow(5.0, 5.7e9, 3e12)
    assert fl.t_star_order(8.0, 7.0, 9.0) == (True, False)
    assert fl.t_star_order(6.0, 7.0, 6.5) == (False, True)
    assert fl.t_star_order(6.0, 7.0, 9.0) == (False, False)
    assert fl.tokens_low(0.5, 0.9) and not fl.tokens_low(0.95, 0.9)
    assert fl.generate_vs_loop(48.9, 190.0) and not fl.generate_vs_loop(48.9, 52.0)
    assert fl.micro_batches_named([64, 64]) and not fl.micro_batches_named(None)
    assert not fl.micro_batches_named([128])
    assert fl.bytes_off(1.03e9, 1e9) and not fl.bytes_off(1.01e9, 1e9)
    assert fl.bytes_off(0.0, 1e9) and fl.bytes_off(5.0, 0) and not fl.bytes_off(0, 0)
    assert not fl.bytes_off(None, 1e9)


def test_explained_agreement_counts_tokens_before_the_first_near_tie():
    assert fl.explained_agreement([None, None], 10) == 1.0
    assert fl.explained_agreement([0, None], 10) == pytest.approx(0.5)
    assert fl.explained_agreement([5, 2], 10) == pytest.approx(0.35)
    assert fl.explained_agreement([], 10) == 1.0


# ---- yardsticks ---------------------------------------------------------------------------
MHA = ys.Dims(batch=16, hidden=4096, kv_hidden=4096, layers=8, elem_bytes=2)
GQA = ys.Dims(batch=16, hidden=4096, kv_hidden=1024, layers=8, elem_bytes=2)
RATES = ys.Rates(h2d_bytes_per_s=55e9, d2h_bytes_per_s=55e9, flops_per_s=7e14,
                 mem_copy_bytes_per_s=2e12, mem_read_bytes_per_s=3e12)


def test_kv_link_and_hf_bound():
    past = ys.median_past(1024, 32)
    assert past == 1039
    kv = 8 * 2 * 16 * 1039 * 4096 * 2
    assert ys.kv_bytes(MHA, past) == kv
    assert ys.kv_link_ms(MHA, past, RATES) == pytest.approx(kv / 55e9 * 1e3)
    bound = ys.hf_bound_ms(MHA, past, RATES)
    assert bound["serial"] == pytest.approx(2 * bound["overlapped"])


def test_t_star_lies_between_resident_and_the_link_and_is_at_the_crossing_for_mha():
    past = 1039
    t, l = ys.t_star(MHA, past, RATES, resident_ms=6.0)
    assert 6.0 < t < ys.kv_link_ms(MHA, past, RATES)
    assert 0 < l < past                                  # MHA: some recompute pays
    assert t == pytest.approx(max(ys.link_ms(MHA, past, l, RATES),
                                  ys.device_ms(MHA, past, l, RATES, 6.0)))
    for other in (0, l - 5, l + 5, past):                # no other l does better
        assert t <= max(ys.link_ms(MHA, past, other, RATES),
                        ys.device_ms(MHA, past, other, RATES, 6.0)) + 1e-9
    t_gqa, l_gqa = ys.t_star(GQA, past, RATES, resident_ms=6.0)
    assert l_gqa == 0 and t_gqa == pytest.approx(max(ys.kv_link_ms(GQA, past, RATES), 6.0))


# ---- a whole row from synthetic children -------------------------------------------------
CASE = {"model": "llama-7b", "attention": "MHA", "family": "llama", "hidden": 4096,
        "kv_hidden": 4096, "layers": 8, "batch": 16, "prompt": 1024, "steps": 32,
        "dtype": "float16"}
PROFILE = {"h2d_bytes_per_s": 55e9, "d2h_bytes_per_s": 55e9, "flops_per_s": {"float16": 7e14},
           "mem_copy_bytes_per_s": 2e12, "mem_read_bytes_per_s": 3e12}
TOKENS = [[1, 2, 3, 4]] * 4
KV_LINK = ys.kv_link_ms(MHA, 1039, RATES)
SPLIT = [0.9] * 8


def _clean_ms() -> dict:
    t_star, _ = ys.t_star(MHA, 1039, RATES, resident_ms=4.0)
    return {ct.RESIDENT_STATIC: 4.0, ct.RESIDENT_DYNAMIC: 4.1, ct.HF_GENERATE: 48.9,
            ct.HF_LOOP: 50.0, ct.KVPR_RATIO0: KV_LINK * 1.05, ct.KVPR: t_star * 1.1,
            ct.KVPR_GENERATE: t_star * 1.12, ct.COPY_ONLY: KV_LINK * 1.02}


def _child(name: str, ms: float, *, round_: int = 1, jitter: float = 0.01, host: float = 0.3,
           wall: float = 1.0, grown=(), tokens=TOKENS, first_ties=None) -> dict:
    steps = [ms * (1 + jitter * ((i % 3) - 1)) for i in range(32)]
    gen = name in (ct.HF_GENERATE, ct.KVPR_GENERATE)
    step_ms = [[ms], [ms * (1 + jitter)], [ms * (1 - jitter)]] if gen else [steps] * 3
    out = {"contender": name, "status": "ok", "spec": {"steps": 32}, "round": round_,
           "step_ms": step_ms, "wall_ms": [sum(r) / len(r) * 32 * wall for r in step_ms],
           "host_ms": None if gen else [[t * host for t in r] for r in step_ms],
           "counters": {"grown": list(grown)}, "tokens": None if name == ct.COPY_ONLY else tokens,
           "pid": 1}
    if name in ct.RESIDENTS:
        out.update(weight_bytes=3.5e9, first_ties=first_ties or [None] * 4)
    if name in (ct.KVPR, ct.KVPR_GENERATE):
        out["split"] = SPLIT
    if name == ct.KVPR_RATIO0:
        out["split"] = [0.0] * 8
    if name in ct.COUNTED:   # what the runtime's counter would say for the rule
        out["kv_bytes_counted_per_step"] = assemble.expected_kv_per_step(
            name, out.get("split"), MHA, CASE["prompt"], 32)
    return out


def _collected(ms: dict, doctor=None) -> dict:
    names = list(ms)
    plan = orders(names, seed=3)
    results = {n: [_child(n, ms[n], round_=1), _child(n, ms[n], round_=2)] for n in names}
    if doctor:
        doctor(results)
    return {"orders": plan, "results": results}


def _row(ms=None, doctor=None) -> dict:
    return assemble.build_row(CASE, PROFILE, _collected(ms or _clean_ms(), doctor))


def test_a_clean_row_has_no_flags_and_every_headline():
    row = _row()
    assert {n: c["flags"] for n, c in row["contenders"].items()} == {n: [] for n in ct.NAMES}
    assert row["kv_link_ms"] == pytest.approx(KV_LINK)
    assert row["contenders"][ct.RESIDENT_STATIC]["median_ms"] < row["t_star_ms"] \
        < row["contenders"][ct.KVPR]["median_ms"]
    assert row["split"] == SPLIT and row["reference"] == ct.RESIDENT_STATIC
    assert all(h["value"] is not None for h in row["headline"].values()), row["headline"]
    assert row["headline"]["kvpr_vs_hf_generate"]["value"] == pytest.approx(
        48.9 / row["contenders"][ct.KVPR]["median_ms"], rel=0.02)
    assert row["contenders"][ct.KVPR]["token_agreement"] == 1.0
    assert sorted(c["order"] for c in row["contenders"].values()) == list(range(1, 9))


def _set(name, round_=None, **kw):
    def doctor(results):
        for r in results[name]:
            if round_ is None or r["round"] == round_:
                ms = r["step_ms"][0][0]
                r.update(_child(name, kw.pop("ms", ms), round_=r["round"], **kw))
    return doctor


def _flags(row, name):
    return row["contenders"][name]["flags"]


@pytest.mark.parametrize("name, doctor, flag", [
    (ct.KVPR, _set(ct.KVPR, host=0.9), fl.HOST_BOUND),
    (ct.KVPR, _set(ct.KVPR, jitter=0.2), fl.SPREAD),
    (ct.KVPR_RATIO0, _set(ct.KVPR_RATIO0, wall=1.3), fl.EVENT_VS_WALL),
    (ct.HF_LOOP, _set(ct.HF_LOOP, grown=["host.num_host_alloc"]),
     f"{fl.NOT_CLEAN}:host.num_host_alloc"),
])
def test_each_flag_fires_in_a_row_on_a_doctored_timing(name, doctor, flag):
    row = _row(doctor=doctor)
    assert flag in _flags(row, name)
    others = {n: c["flags"] for n, c in row["contenders"].items() if n != name}
    assert all(not f for f in others.values()), others


def test_rounds_that_differ_and_a_single_round():
    def slower_round_two(results):
        results[ct.KVPR][1] = _child(ct.KVPR, _clean_ms()[ct.KVPR] * 1.2, round_=2)
    assert fl.ROUNDS_DIFFER in _flags(_row(doctor=slower_round_two), ct.KVPR)

    def one_round(results):
        results[ct.COPY_ONLY] = results[ct.COPY_ONLY][:1]
    assert _flags(_row(doctor=one_round), ct.COPY_ONLY) == [fl.ONE_ROUND]


def test_yardstick_flags_fire_on_doctored_medians():
    ms = _clean_ms()
    row = _row({**ms, ct.HF_GENERATE: 190.0, ct.HF_LOOP: 195.0, ct.KVPR_RATIO0: KV_LINK * 1.5,
                ct.COPY_ONLY: KV_LINK * 0.9, ct.RESIDENT_DYNAMIC: 20.0})
    assert fl.OVER_BYTES_BOUND in _flags(row, ct.HF_GENERATE)
    assert fl.OVER_BYTES_BOUND in _flags(row, ct.HF_LOOP)
    assert fl.RATIO0_SLOW in _flags(row, ct.KVPR_RATIO0)
    assert fl.BELOW_FLOOR in _flags(row, ct.COPY_ONLY)
    assert fl.RESIDENT_SLOW in _flags(row, ct.RESIDENT_DYNAMIC)
    assert _flags(row, ct.RESIDENT_STATIC) == [] and _flags(row, ct.KVPR) == []
    assert row["headline"]["kvpr_vs_hf_generate"]["value"] is None
    assert "over_bytes_bound" in row["headline"]["kvpr_vs_hf_generate"]["withheld"]
    assert row["headline"]["kvpr_over_resident"]["value"] is not None   # static is the min


def test_kvpr_below_t_star_and_below_its_floor_are_flagged():
    ms = _clean_ms()
    t_star, _ = ys.t_star(MHA, 1039, RATES, resident_ms=4.0)
    row = _row({**ms, ct.KVPR: t_star * 0.5})
    assert fl.T_STAR_ORDER in _flags(row, ct.KVPR)
    assert fl.BELOW_FLOOR in _flags(row, ct.KVPR)       # the split's bytes alone take longer


def test_generate_and_loop_must_agree():
    row = _row({**_clean_ms(), ct.HF_LOOP: 58.0})
    assert _flags(row, ct.HF_LOOP) == [fl.GENERATE_VS_LOOP] and _flags(row, ct.HF_GENERATE) == []


def test_token_agreement_below_what_near_ties_explain():
    parted = [[1, 9, 9, 9]] + TOKENS[1:]          # row 0 parts after its first token
    row = _row(doctor=_set(ct.KVPR, tokens=parted))
    assert _flags(row, ct.KVPR) == [fl.TOKENS]
    assert row["contenders"][ct.KVPR]["token_agreement"] == pytest.approx(13 / 16)

    def tie_at_one(results):
        _set(ct.KVPR, tokens=parted)(results)
        for r in results[ct.RESIDENT_STATIC]:
            r["first_ties"] = [1, None, None, None]
    row = _row(doctor=tie_at_one)
    assert _flags(row, ct.KVPR) == []
    assert row["contenders"][ct.KVPR]["explained_agreement"] == pytest.approx(13 / 16)


def test_absent_contenders_keep_their_reason_and_withhold_headlines():
    def absent(results):
        results[ct.HF_GENERATE] = [{"contender": ct.HF_GENERATE, "status": "absent",
                                    "reason": "needs CUDA"}] * 2
    row = _row(doctor=absent)
    assert ct.HF_GENERATE not in row["contenders"] and row["absent"] == {
        ct.HF_GENERATE: "needs CUDA"}
    assert "missing" in row["headline"]["kvpr_vs_hf_generate"]["withheld"]


# ---- schema -------------------------------------------------------------------------------
def _doc() -> dict:
    return {"protocol": 2, "device": "NVIDIA H200", "torch": "2.11.0", "transformers": "5.17.0",
            "driver": "580", "h2d_gbps": 55.0, "d2h_gbps": 55.0,
            "tests": {"passed": 3, "failed": 0}, "rows": [_row()], "call_id": "c1"}


def test_schema_accepts_a_built_row_and_names_what_is_wrong():
    doc = json.loads(json.dumps(_doc()))
    assert schema.validate(doc) == []
    bad = copy.deepcopy(doc)
    del bad["driver"]
    bad["rows"][0]["attention"] = "GQA 4:1"
    bad["rows"][0]["contenders"][ct.KVPR]["steps"] = "32"
    bad["rows"][0]["contenders"]["made_up"] = bad["rows"][0]["contenders"][ct.KVPR_RATIO0]
    errors = schema.validate(bad)
    assert any("'driver'" in e for e in errors) and any("attention" in e for e in errors)
    assert any("kvpr: 'steps'" in e for e in errors) and any("made_up" in e for e in errors)


def test_writer_never_overwrites(tmp_path):
    committed = tmp_path / "committed"
    committed.mkdir()
    (committed / "2026-12-02-h200-v2.json").write_text("{}")
    first = schema.write(_doc(), "2026-12-02", [tmp_path / "out", committed])
    assert first.name == "2026-12-02-h200-v2-2.json"
    second = schema.write(_doc(), "2026-12-02", [tmp_path / "out", committed])
    assert second.name == "2026-12-02-h200-v2-3.json"
    with pytest.raises(ValueError):
        schema.write({"protocol": 1}, "2026-12-02", [tmp_path / "out"])


def test_assemble_refuses_parts_of_two_calls_and_flags_unbatched_throughput_rows():
    a, b = _doc(), _doc()
    b["call_id"] = "c2"
    with pytest.raises(ValueError, match="different calls"):
        schema.assemble([a, b], {"passed": 1, "failed": 0})
    tput = {"meta": {"schedule": "throughput"}, "cases": [
        {"model": "opt-6.7b", "attention": "MHA", "batch": 128, "prompt": 256,
         "micro_batches": None, "runs": {}, "tokens_per_s": {}, "limit_ms": {}},
        {"model": "opt-13b", "attention": "MHA", "batch": 128, "prompt": 256,
         "micro_batches": [64, 64], "runs": {}, "tokens_per_s": {}, "limit_ms": {}}]}
    doc = schema.assemble([a], {"passed": 5, "failed": 1}, {"driver": "590", "call_id": "c1"},
                          throughput=[tput], host_rates={"cores": 16})
    assert doc["tests"] == {"passed": 5, "failed": 1} and doc["driver"] == "590"
    assert [r["flags"] for r in doc["throughput_rows"]] == [[fl.NO_MICRO_BATCHES], []]
    assert doc["host_rates"] == {"cores": 16} and len(doc["rows"]) == 1
    assert schema.validate(doc) == []


def test_orders_shuffle_with_the_seed_then_reverse():
    one, two = orders(ct.NAMES, seed=7)
    assert sorted(one) == sorted(ct.NAMES) and two == one[::-1]
    assert orders(ct.NAMES, seed=7) == [one, two] and orders(ct.NAMES, seed=8)[0] != one


def test_schedule_runs_round_one_of_every_case_before_round_two():
    from kvpr_compile.bench.rounds import process_order
    specs = process_order([{"model": "a"}, {"model": "b"}], ["x", "y", "z"], rounds=2, seed=1)
    assert [(s["round"], s["case"]) for s in specs] == [(1, 0)] * 3 + [(1, 1)] * 3 + \
        [(2, 0)] * 3 + [(2, 1)] * 3
    first, second = [s["contender"] for s in specs[:3]], [s["contender"] for s in specs[6:9]]
    assert second == first[::-1] and [s["order"] for s in specs[:3]] == [1, 2, 3]


def test_run_all_records_what_the_deadline_leaves_no_time_for(monkeypatch):
    import time

    from kvpr_compile.bench import rounds
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def fake(spec):
        clock[0] += 30.0                      # every child takes 30 s
        return {"contender": spec["contender"], "status": "ok"}
    monkeypatch.setattr(rounds, "run_in_process", fake)
    specs = rounds.process_order([{"model": "a"}], ["x", "y", "z"], rounds=2, seed=0)
    saved = []
    got = rounds.run_all(specs, deadline=100.0, workdir=None, in_process=True,
                         on_result=saved.append)
    # 100 s: three children of 30 s start (each with >= 1.2 x the slowest left), then none
    assert [r["status"] for r in got] == ["ok"] * 3 + ["absent"] * 3
    assert "no time left" in got[3]["reason"] and len(saved) == 6
    mine = rounds.collect(got, 0, ["x", "y", "z"], rounds.orders(["x", "y", "z"], 0))
    assert sum(len(v) for v in mine["results"].values()) == 6


def test_the_command_lines_contender_names_are_the_protocols():
    from kvpr_compile.bench.main import V2_CONTENDERS, V2_OPT_IN
    assert V2_CONTENDERS == ct.NAMES       # named twice so that --help needs no torch
    assert V2_OPT_IN == ct.OPT_IN


# ---- a resident share of the cache (opt-in contenders) ----------------------------------


def test_resident_share_yardsticks():
    past = 1039
    full = ys.kv_bytes(MHA, past)
    third = ys.share_kv_bytes(MHA, past, 1 / 3)
    assert third == ys.kv_bytes(MHA, past - 346)          # floor(1039 / 3) rows resident
    assert third / full == pytest.approx(2 / 3, rel=1e-3)
    assert ys.share_kv_bytes(MHA, past, 1.0) == 0
    assert ys.share_t_star_ms(MHA, past, 1 / 3, RATES, 4.0) == pytest.approx(third / 55e9 * 1e3)
    assert ys.share_t_star_ms(MHA, past, 1.0, RATES, 4.0) == 4.0


def _with_shares(doctor=None, **ms):
    base = {**_clean_ms()}
    for name, share in ct.RESIDENT_SHARES.items():
        floor = ys.share_kv_bytes(MHA, 1039, share) / 55e9 * 1e3
        base[name] = ms.get(name, floor * 1.05)
    return _row(base, doctor)


def test_resident_share_contenders_carry_their_bound_and_are_clean_at_it():
    row = _with_shares()
    for name, share in ct.RESIDENT_SHARES.items():
        c = row["contenders"][name]
        assert c["flags"] == [], (name, c["flags"])
        assert c["resident_share"] == share
        assert c["h2d_bytes_per_step"] == ys.share_kv_bytes(MHA, 1039, share)
        assert c["over_t_star"] == pytest.approx(1.05, rel=0.02)
        assert c["kv_bytes_counted_per_step"] == c["kv_bytes_expected_per_step"]


def test_resident_share_below_its_floor_or_with_other_bytes_is_flagged():
    def off(results):   # the counter saw the bytes of budget 0: the share was not kept
        for r in results[ct.RESIDENT_THIRD]:
            r["kv_bytes_counted_per_step"] = assemble.expected_kv_per_step(
                ct.KVPR_RATIO0, None, MHA, CASE["prompt"], 32)
    row = _with_shares(off, **{ct.RESIDENT_TWO_THIRDS: 0.5})
    assert fl.BYTES_OFF in _flags(row, ct.RESIDENT_THIRD)
    assert fl.BELOW_FLOOR in _flags(row, ct.RESIDENT_TWO_THIRDS)
    assert fl.T_STAR_ORDER in _flags(row, ct.RESIDENT_TWO_THIRDS)
    assert _flags(row, ct.KVPR_RATIO0) == []


# ---- the plan's CPU share (opt-in kvpr_cpu) ------------------------------------------------

CPU_SPLIT = [0.45] * 8   # no recompute (GQA), the CPU attends to 0.45 of every layer's past
GQA_CASE = {**CASE, "model": "llama-3-8b", "attention": "GQA", "kv_hidden": 1024}


def _cpu_row(ms: float, predicted: float = 5.0, counted_off: float = 1.0):
    def doctor(results):
        for r in results[ct.KVPR_CPU]:
            r.update(split=[0.0] * 8, cpu_split=CPU_SPLIT, predicted_ms=predicted)
            r["kv_bytes_counted_per_step"] = counted_off * assemble.expected_kv_per_step(
                ct.KVPR_CPU, [0.0] * 8, GQA, CASE["prompt"], 32, CPU_SPLIT)
        for r in results[ct.KVPR_RATIO0]:   # _child counts for the MHA case
            r["kv_bytes_counted_per_step"] = assemble.expected_kv_per_step(
                ct.KVPR_RATIO0, None, GQA, CASE["prompt"], 32)
    base = {ct.RESIDENT_STATIC: 4.0, ct.KVPR_RATIO0: ys.kv_link_ms(GQA, 1039, RATES) * 1.05,
            ct.KVPR_CPU: ms}
    return assemble.build_row(GQA_CASE, PROFILE, _collected(base, doctor))


def test_kvpr_cpu_bytes_exclude_the_cpus_rows_and_its_headlines_appear():
    kv_link = ys.kv_link_ms(GQA, 1039, RATES)
    row = _cpu_row(0.6 * kv_link)
    c = row["contenders"][ct.KVPR_CPU]
    u = int(0.45 * 1039)
    assert c["h2d_bytes_per_step"] == 8 * (1039 - u) * 2 * 16 * 1024 * 2
    assert c["flags"] == [], c["flags"]
    assert c["predicted_ms"] == 5.0 and c["measured_over_predicted"] == pytest.approx(
        c["median_ms"] / 5.0)
    assert row["headline"]["kvpr_cpu_over_kv_link"]["value"] == pytest.approx(0.6, rel=0.02)
    assert row["headline"]["kvpr_cpu_vs_ratio0"]["value"] == pytest.approx(1.05 / 0.6, rel=0.02)
    assert "kvpr_cpu_over_kv_link" not in _row()["headline"]   # not asked for: no headline


def test_kvpr_cpu_below_its_own_floor_or_off_its_bytes_is_flagged():
    floor = _cpu_row(1.0)["contenders"][ct.KVPR_CPU]["floor_ms"]
    assert fl.BELOW_FLOOR in _flags(_cpu_row(0.5 * floor), ct.KVPR_CPU)
    assert fl.BYTES_OFF in _flags(_cpu_row(2 * floor, counted_off=1.2), ct.KVPR_CPU)
    row = _cpu_row(2 * floor, counted_off=1.2)
    assert row["headline"]["kvpr_cpu_over_kv_link"]["value"] is None
