"""The benchmark's pure-Python parts (limits, targets, trace parsing, table, case planning, CLI)
and one end-to-end toy CPU run of `kvpr bench`."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from kvpr_compile.bench import configs as cf
from kvpr_compile.bench import limits, targets, timeline
from kvpr_compile.bench.main import build_parser, main, plan_cases
from kvpr_compile.bench.runners import (HF_OFFLOADED, KVPR_R0, KVPR_SCHED, RESIDENT, BenchEnv,
                                        RunResult)
from kvpr_compile.bench.suite import finish
from kvpr_compile.bench.runners import warm_up
from kvpr_compile.bench.table import format_report, format_rows, row_cells, write_json
from kvpr_compile.bench.timing import CpuTimer, summarize
from kvpr_compile.plan.presets import preset


# ---- limits --------------------------------------------------------------------------------
def test_split_tokens_is_the_rewrites_floor():
    assert limits.split_tokens(0.0, 1000) == 0
    assert limits.split_tokens(1.0, 1000) == 1000
    assert limits.split_tokens(0.5, 1001) == 500
    assert limits.split_tokens(0.9445812807881774, 100) == 94


def test_step_bytes_ratio_zero_is_all_kv_and_ratio_one_mha_halves_it():
    dims = dict(batch=4, hidden=4096, kv_hidden=4096, elem_bytes=2)
    full = limits.step_h2d_bytes([0.0] * 8, 1024, **dims)
    assert full == 8 * 1024 * 2 * 4 * 4096 * 2
    assert limits.step_h2d_bytes([1.0] * 8, 1024, **dims) * 2 == full
    gqa = dict(dims, kv_hidden=1024)
    assert limits.step_h2d_bytes([0.0], 100, **gqa) == 100 * 2 * 4 * 1024 * 2


@pytest.mark.quick
def test_limit_is_the_median_over_steps():
    lim = limits.limit([0.0, 0.0], [100, 101, 102], batch=1, hidden=8, kv_hidden=8,
                       elem_bytes=2, h2d_bytes_per_s=1e6)
    per_step = 2 * 101 * 2 * 8 * 2
    assert lim.bytes == per_step
    assert lim.ms == pytest.approx(per_step / 1e6 * 1e3)
    assert lim.per_layer_ms == pytest.approx(lim.ms / 2)
    with pytest.raises(ValueError):
        limits.limit([], [1], batch=1, hidden=1, kv_hidden=1, elem_bytes=2, h2d_bytes_per_s=1.0)


# ---- targets -------------------------------------------------------------------------------
def _keys(ts):
    return {t.key: t for t in ts}


def test_mha_targets_apply_by_size():
    big = _keys(targets.evaluate(mha=True, batch=16, prompt=1024, sched_ms=10.0, r0_ms=19.0,
                                 hf_ms=25.0, sched_limit_ms=9.5))
    assert set(big) == {"limit", "vs_r0", "vs_hf"}
    assert big["limit"].passed and big["vs_r0"].passed and big["vs_hf"].passed
    small = targets.evaluate(mha=True, batch=4, prompt=1024, sched_ms=1.0, r0_ms=1.0, hf_ms=1.0,
                             sched_limit_ms=1.0)
    assert small == []
    paper = _keys(targets.evaluate(mha=True, batch=32, prompt=256, sched_ms=10.0, r0_ms=17.0,
                                   hf_ms=30.0, sched_limit_ms=8.0))
    assert set(paper) == {"limit", "vs_r0"}
    assert paper["limit"].verdict == "FAIL" and paper["vs_r0"].verdict == "FAIL"


def test_gqa_targets_and_missing_numbers():
    got = _keys(targets.evaluate(mha=False, batch=16, prompt=4096, sched_ms=10.1, r0_ms=10.0,
                                 hf_ms=12.5, sched_limit_ms=None))
    assert set(got) == {"vs_r0", "vs_hf"}
    assert got["vs_r0"].passed          # 1% slower is inside the noise margin
    assert got["vs_hf"].passed
    slow = _keys(targets.evaluate(mha=False, batch=16, prompt=4096, sched_ms=11.0, r0_ms=10.0,
                                  hf_ms=None, sched_limit_ms=None))
    assert slow["vs_r0"].verdict == "FAIL"
    assert slow["vs_hf"].passed is None and slow["vs_hf"].verdict == "n/a"
    assert slow["vs_hf"].to_dict()["passed"] is None


# ---- trace parsing -------------------------------------------------------------------------
def _trace(layers=4):
    events, t = [], 0.0
    for _ in range(layers):
        events.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)",
                       "pid": 0, "tid": 20, "ts": t, "dur": 900.0,
                       "args": {"device": 0, "stream": 20}})
        events.append({"ph": "X", "cat": "kernel", "name": "gemm", "pid": 0, "tid": 7,
                       "ts": t + 300, "dur": 600.0, "args": {"device": 0, "stream": 7}})
        events.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)",
                       "pid": 0, "tid": 7, "ts": t + 950, "dur": 20.0})
        t += 1000
    events += [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0,
                "dur": 5},
               {"ph": "X", "cat": "gpu_user_annotation", "name": "decode step 0", "pid": 0,
                "tid": 7, "ts": 0.0, "dur": 10.0},
               {"ph": "M", "name": "thread_name", "pid": 0, "tid": 7,
                "args": {"name": "stream 7"}}]
    return {"traceEvents": events}


def test_gpu_events_and_classification():
    evs = timeline.gpu_events(_trace())
    assert len(evs) == 12
    assert {e.kind for e in evs} == {"H2D", "kernel", "D2H"}
    assert {e.stream for e in evs} == {7, 20}       # args.stream, else tid
    assert [e.start_us for e in evs] == sorted(e.start_us for e in evs)
    assert timeline.classify("gpu_memcpy", "Memcpy DtoD (Device -> Device)") == "D2D"
    assert timeline.classify("gpu_memset", "Memset (Device)") == "memset"
    assert timeline.step_marks(_trace()) == [0.0]


def test_interval_algebra():
    u = timeline.union([(5, 7), (0, 2), (1, 3), (8, 8)])
    assert u == [(0, 3), (5, 7)]
    assert timeline.length(u) == 5
    assert timeline.intersection(u, [(2, 6)]) == [(2, 3), (5, 6)]


def test_overlap_stats():
    stats = timeline.overlap_stats(timeline.gpu_events(_trace(layers=4)))
    assert stats["h2d_busy_us"] == pytest.approx(3600)
    assert stats["kernel_busy_us"] == pytest.approx(2400)
    assert stats["h2d_overlap"] == pytest.approx(2400 / 3600)
    assert stats["streams"]["cuda:0 stream 7"]["D2H_us"] == pytest.approx(80)
    assert stats["top_kernels"] == [{"name": "gemm", "us": pytest.approx(2400), "count": 4}]
    assert timeline.overlap_stats([]) == {"events": 0}


def test_compute_idle_is_the_busiest_streams_gaps():
    """Four 600 us kernels 1000 us apart on stream 7: 400 us idle after each but the last; a
    smaller stream's kernels and gaps of launch size (10 us) do not count as long ones."""
    trace = _trace(layers=4)
    trace["traceEvents"] += [{"ph": "X", "cat": "kernel", "name": "small", "pid": 0, "tid": 9,
                              "ts": 100.0 + 15 * i, "dur": 5.0,
                              "args": {"device": 0, "stream": 9}} for i in range(3)]
    trace["traceEvents"] += [{"ph": "X", "cat": "kernel", "name": "tail", "pid": 0, "tid": 7,
                              "ts": 3910.0, "dur": 90.0, "args": {"device": 0, "stream": 7}}]
    idle = timeline.overlap_stats(timeline.gpu_events(trace))["compute_idle"]
    assert idle["stream"] == "cuda:0 stream 7"
    assert idle["span_us"] == pytest.approx(3700) and idle["busy_us"] == pytest.approx(2490)
    assert idle["idle_us"] == pytest.approx(1210)
    assert (idle["long_gaps"], idle["long_gap_us"]) == (3, pytest.approx(1200))
    assert idle["max_gap_us"] == pytest.approx(400)
    assert timeline.compute_idle([]) is None


def test_top_kernels_rank_by_total_time():
    trace = _trace(layers=2)
    trace["traceEvents"] += [{"ph": "X", "cat": "kernel", "name": "cat", "pid": 0, "tid": 7,
                              "ts": 5000.0 + 10 * i, "dur": 1000.0,
                              "args": {"device": 0, "stream": 7}} for i in range(2)]
    top = timeline.overlap_stats(timeline.gpu_events(trace))["top_kernels"]
    assert [(k["name"], k["count"]) for k in top] == [("cat", 2), ("gemm", 2)]


def test_warm_up_runs_an_untimed_resident_decode():
    model = cf.build_model(cf.CPU_MODELS["llama-7b"], 1, dtype=torch.float32, device="cpu")
    calls, forward = [], model.forward

    def counted(**kwargs):
        calls.append(kwargs["input_ids"].shape[1])
        return forward(**kwargs)
    model.forward = counted
    warm_up(model, torch.randint(0, 256, (2, 5)), steps=2)
    assert calls == [5, 1, 1]      # the prefill and two steps


def test_write_timeline_without_gpu_events(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "x",
                                                 "ts": 0, "dur": 1}]}))
    out = timeline.write_timeline(path, tmp_path / "cpu.png")
    assert out["png"] is None and "no CUDA" in out["note"]
    assert not (tmp_path / "cpu.png").exists()


def test_write_timeline_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(_trace()))
    out = timeline.write_timeline(path, tmp_path / "gpu.png", "synthetic")
    assert out["png"] and (tmp_path / "gpu.png").stat().st_size > 1000
    assert out["stats"]["h2d_overlap"] == pytest.approx(2 / 3)


# ---- cases, configs, timing ----------------------------------------------------------------
def test_build_cases_paper_first_and_deduplicated():
    cases = cf.build_cases(["opt-6.7b", "llama-3-8b"], [32, 16], [256, 1024], 12)
    opt = [c for c in cases if c.model == "opt-6.7b"]
    assert (opt[0].batch, opt[0].prompt, opt[0].new_tokens, opt[0].kind) == (32, 256, 32, "paper")
    assert [(c.batch, c.prompt) for c in opt] == [(32, 256), (32, 1024), (16, 256), (16, 1024)]
    assert [c.model for c in cases] == sorted([c.model for c in cases], key=["opt-6.7b",
                                                                              "llama-3-8b"].index)
    assert cf.build_cases(["llama-7b"], [4], [8], 5, paper=False)[0].slug == "llama-7b-b4-p8-n5"


def test_model_specs():
    llama3 = cf.GPU_MODELS["llama-3-8b"]
    assert (llama3.family, llama3.kv_hidden_size, llama3.attention) == ("llama", 1024, "GQA 4:1")
    assert cf.GPU_MODELS["opt-6.7b"].family == "opt" and cf.GPU_MODELS["llama-7b"].is_mha
    assert set(cf.CPU_MODELS) == set(cf.DEFAULT_MODELS)
    assert cf.CPU_MODELS["llama-3-8b"].attention == "GQA 4:1"


@pytest.mark.parametrize("name", ["opt-6.7b", "llama-3-8b"])
def test_hf_config_dims(name):
    spec = cf.GPU_MODELS[name]
    cfg = cf.hf_config(spec, 8, 5000)
    assert cfg.num_hidden_layers == 8 and cfg.hidden_size == 4096
    assert cfg.max_position_embeddings >= 5000 and cfg.vocab_size == cf.VOCAB
    assert getattr(cfg, "num_key_value_heads", 32) == spec.num_kv_heads


def test_timers_and_summary():
    timer = CpuTimer()
    for _ in range(3):
        timer.start()
        timer.stop()
    assert len(timer.times_ms()) == 3 and all(t >= 0 for t in timer.times_ms())
    assert timer.host_ms() == timer.times_ms()   # on a CPU the host's time is the step's
    s = summarize([1.0, 2.0, 6.0])
    assert (s["n"], s["median"], s["mean"], s["min"], s["max"]) == (3, 2.0, 3.0, 1.0, 6.0)
    assert summarize([]) == {"n": 0}


# ---- suite.finish and the table ------------------------------------------------------------
def _run(name, ms, tokens, ratios=None):
    return RunResult(name, tokens=tokens, step_ms=[ms] * 3, pasts=[256, 257, 258], ratios=ratios)


def _case_result(device="cuda"):
    case = cf.Case("opt-6.7b", 32, 256, 32, "paper")
    tokens = torch.zeros(32, 32, dtype=torch.long)
    flipped = tokens.clone()
    flipped[0, -1] = 1
    runs = {RESIDENT: _run(RESIDENT, 4.0, tokens),
            HF_OFFLOADED: _run(HF_OFFLOADED, 26.0, tokens),
            KVPR_R0: _run(KVPR_R0, 21.0, tokens, [0.0] * 8),
            KVPR_SCHED: _run(KVPR_SCHED, 11.0, flipped, [1.0] * 8)}
    env = BenchEnv(device=torch.device(device), dtype=torch.float16, profile=preset("h200-pcie5"),
                   h2d_bytes_per_s=55e9)
    return finish(case, cf.GPU_MODELS["opt-6.7b"], 8, runs, env)


def test_finish_limits_agreement_targets():
    result = _case_result()
    r0, sched = result.limits[KVPR_R0], result.limits[KVPR_SCHED]
    assert r0.bytes == 8 * 257 * 2 * 32 * 4096 * 2 and sched.bytes * 2 == r0.bytes
    assert r0.ms == pytest.approx(r0.bytes / 55e9 * 1e3)
    assert result.reference == RESIDENT
    assert result.agreement[KVPR_SCHED] == pytest.approx(1 - 1 / (32 * 32))
    assert result.agreement[HF_OFFLOADED] == 1.0
    assert {t.key for t in result.targets} == {"limit", "vs_r0"}
    assert not _case_result("cpu").targets      # CPU: targets are not evaluated


@pytest.mark.quick
def test_table_and_json(tmp_path):
    result = _case_result()
    cells = row_cells(result)
    assert cells[:5] == ["opt-6.7b", "MHA", "32", "256", "32"]
    assert "99.9%" in cells and cells[5:9] == ["4.00", "26.00", "21.00", "11.00"]
    lines = format_rows(["a", "bb"], [["x", "1"], ["yyy", "22"]])
    assert len({len(line) for line in lines}) == 1
    meta = {"device": "GPU", "torch": "2", "transformers": "5", "dtype": "float16", "cpu": False,
            "note": "", "profile_summary": "p", "h2d_gbps": 55.0, "h2d_source": "measured",
            "warmup": 2}
    text = format_report([result], meta)
    assert "targets (" in text and "FAIL" in text and "kvpr-sch" in text
    write_json(tmp_path / "out.json", [result], meta)
    doc = json.loads((tmp_path / "out.json").read_text())
    case = doc["cases"][0]
    assert case["ms_per_step"][KVPR_SCHED] == 11.0 and case["limits"][KVPR_R0]["bytes"] > 0
    assert doc["targets"]["pass"] + doc["targets"]["fail"] == 2


# ---- command line --------------------------------------------------------------------------
@pytest.mark.quick
def test_plan_cases_by_mode():
    parse = build_parser().parse_args
    cases, specs, layers, note = plan_cases(parse([]), cpu=False)
    assert layers == 8 and specs is cf.GPU_MODELS and note == ""
    assert cases[0].kind == "paper" and len(cases) == 3 * (1 + len(cf.DEFAULT_BATCHES)
                                                          * len(cf.DEFAULT_PROMPTS))
    cases, _, layers, _ = plan_cases(parse(["--quick"]), cpu=False)
    assert layers == 2 and len(cases) == 3 and all(c.kind == "quick" for c in cases)
    cases, specs, layers, note = plan_cases(parse(["--models", "llama-7b", "mistral-7b"]), cpu=True)
    assert specs is cf.CPU_MODELS and "meaningless" in note and "mistral-7b" in note
    assert [c.model for c in cases] == ["llama-7b"]
    cases, _, layers, _ = plan_cases(parse(["--paper-only", "--layers", "4"]), cpu=False)
    assert layers == 4 and [(c.batch, c.prompt, c.new_tokens) for c in cases] == [cf.PAPER] * 3


@pytest.mark.parametrize("argv", [["--new-tokens", "3"], ["--batch", "0"], ["--warmup", "-1"],
                                  ["--models", "mistral-7b"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert main(["--cpu", *argv]) == 2
    assert "kvpr bench: error:" in capsys.readouterr().err


def test_backend_falls_back_to_the_function_when_not_installed(monkeypatch):
    from kvpr_compile.backend import kvpr_backend
    from kvpr_compile.bench import runners
    assert runners.backend() in ("kvpr", kvpr_backend)
    monkeypatch.setattr(torch.compiler, "list_backends", lambda exclude_tags=(): ["inductor"])
    assert runners.backend() is kvpr_backend


@pytest.mark.quick
def test_kvpr_bench_subcommand_parses():
    from kvpr_compile.commands import bench
    parser = argparse.ArgumentParser(prog="kvpr")
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--json", "x.json", "--trace", "d"])
    assert args.quick and args.json == "x.json" and args.trace == "d" and callable(args.func)


def test_cpu_end_to_end(tmp_path, capsys):
    torch.compiler.reset()
    out = tmp_path / "bench.json"
    code = main(["--cpu-smoke", "--models", "llama-3-8b", "--json", str(out),
                 "--trace", str(tmp_path / "trace"), "--trace-steps", "2"])
    torch.compiler.reset()
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "CPU smoke run: timings meaningless for GPU claims" in captured.out
    assert "[1/1] llama-3-8b b2 p24" in captured.err
    doc = json.loads(out.read_text())
    assert doc["meta"]["cpu"] and doc["meta"]["torch"] == torch.__version__
    case = doc["cases"][0]
    assert case["runs"][HF_OFFLOADED]["status"] == "skipped"
    assert case["token_agreement"][KVPR_SCHED] == 1.0
    assert case["runs"][KVPR_SCHED]["ratios"] == [0.0, 0.0]   # GQA 4:1: l* = 0
    assert case["ms_per_step"][KVPR_R0] > 0
    assert (tmp_path / "trace" / "llama-3-8b-b2-p24-n8-kvpr-sched.json").is_file()


def test_predicted_ms_is_the_schedulers_prediction_for_its_split():
    from kvpr_compile.bench.prediction import predicted_ms
    from kvpr_compile.plan.presets import preset
    from kvpr_compile.plan.latency_lp import plan_split
    prof = preset("h200-pcie5")
    plan = plan_split(prof, num_layers=4, batch_size=16, seq_len=1000, hidden_size=4096,
                      kv_hidden_size=4096, dtype=torch.float16, overlap="row")
    got = predicted_ms(prof, plan.ratios, [1000], batch=16, hidden=4096, kv_hidden=4096,
                       dtype=torch.float16, overlap="row")
    assert got == pytest.approx(plan.predicted_step_s * 1e3, rel=2e-3)
    r0 = predicted_ms(prof, [0.0] * 4, [1000], batch=16, hidden=4096, kv_hidden=4096,
                      dtype=torch.float16, overlap="row")
    assert r0 == pytest.approx(plan.baseline_step_s * 1e3, rel=1e-6) and got < r0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.quick
def test_without_cuda_a_clear_message_and_exit_2(capsys):
    assert main(["--models", "llama-7b"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""                                     # no table of CPU numbers
    assert "no CUDA device" in captured.err and "--cpu-smoke" in captured.err
    assert "kvpr demo" in captured.err


def test_json_is_written_after_every_case(tmp_path, monkeypatch):
    """A run cut short (a timeout on a GPU box) keeps every case it finished."""
    from kvpr_compile.bench import main as bench_main
    seen = []

    def fake_suite(cases, specs, env, *, layers, contenders, on_case=None):
        done = []
        for case in cases:
            done.append(finish(case, specs[case.model], layers, {}, env))
            on_case(list(done))
            seen.append(len(json.loads((tmp_path / "b.json").read_text())["cases"]))
        return done

    monkeypatch.setattr("kvpr_compile.bench.suite.run_suite", fake_suite)
    code = bench_main.main(["--cpu-smoke", "--models", "llama-7b", "opt-6.7b", "--json",
                            str(tmp_path / "b.json")])
    assert code == 0 and seen == [1, 2]


# ---- the committed results file --------------------------------------------------------------
@pytest.mark.quick
def test_results_file_in_the_issue_schema(tmp_path):
    from kvpr_compile.bench import results
    meta = {"device": "NVIDIA H200", "torch": "2.11.0", "transformers": "5.17", "dtype": "float16",
            "cpu": False, "note": "", "profile_summary": "p", "h2d_gbps": 55.0,
            "h2d_source": "measured", "warmup": 2}
    write_json(tmp_path / "cases" / "opt.json", [_case_result()], meta)
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="20" failures="1" errors="1" skipped="3">'
        '</testsuite></testsuites>')
    assert results.main(["--cases", str(tmp_path / "cases"), "--junit", str(tmp_path / "tests.xml"),
                         "--date", "2026-11-26", "-o", str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "2026-11-26-h200.json").read_text())
    assert set(doc) == {"device", "torch", "tests", "rows"}
    assert doc["device"] == "NVIDIA H200" and doc["tests"] == {"passed": 15, "failed": 2}
    row = doc["rows"][0]
    assert set(row) == {"model", "attention", "batch", "prompt", "resident_ms", "hf_offloaded_ms",
                        "kvpr_ratio0_ms", "kvpr_ms", "limit_ms"}
    assert (row["model"], row["attention"], row["batch"], row["prompt"]) == \
        ("opt-6.7b", "MHA", 32, 256)
    assert (row["resident_ms"], row["hf_offloaded_ms"], row["kvpr_ratio0_ms"], row["kvpr_ms"]) == \
        (4.0, 26.0, 21.0, 11.0)
    assert row["limit_ms"] == pytest.approx(8 * 257 * 32 * 4096 * 2 / 55e9 * 1e3)
    assert results.card("NVIDIA H100 80GB HBM3") == "h100" and results.card("Tesla T4") == "t4"


def test_empty_host_cache_uses_the_call_this_torch_has(monkeypatch):
    """torch 2.11 has no torch.accelerator.empty_host_cache: the private call must be used."""
    from kvpr_compile.bench import runners
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "empty_host_cache", lambda: calls.append("public"),
                        raising=False)
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: calls.append("private"),
                        raising=False)
    assert runners.empty_host_cache() == "torch.accelerator.empty_host_cache"
    monkeypatch.delattr(torch.accelerator, "empty_host_cache")
    assert runners.empty_host_cache() == "torch._C._host_emptyCache"
    assert calls == ["public", "private"]
    monkeypatch.delattr(torch._C, "_host_emptyCache")
    assert runners.empty_host_cache().startswith("none")
