"""`kvpr bench --protocol 2 --cpu-smoke` on toy models: the protocol, flags and schema end to end.

The default run takes the quick pieces: one contender's child process by itself (a fresh
interpreter, its JSON), and an in-process run of a few contenders writing a schema-valid file.
The full smoke (every contender in its own process, two rounds, two cases) is marked slow: on a
2-core machine each child spends most of its time importing torch and transformers.
"""
from __future__ import annotations

import json

import pytest
import torch

from kvpr_compile.bench import contenders as ct
from kvpr_compile.bench import schema
from kvpr_compile.bench.main import main
from kvpr_compile.bench.rounds import run_child

SPEC = {"model": "llama-3-8b", "cpu": True, "layers": 1, "batch": 2, "prompt": 8, "steps": 3,
        "repeats": 2, "dtype": "float32", "device": "cpu", "seed": 0, "profile": "h200-pcie5",
        "inner": None, "overlap": None, "round": 1, "order": 1}


def test_one_child_process_records_the_protocols_raw_numbers(tmp_path):
    got = run_child({**SPEC, "contender": ct.RESIDENT_STATIC}, tmp_path, timeout_s=240)
    assert got["status"] == "ok", got.get("reason")
    assert len(got["step_ms"]) == 2 and all(len(r) == 3 for r in got["step_ms"])
    assert len(got["wall_ms"]) == 2 and len(got["host_ms"][0]) == 3
    assert len(got["tokens"]) == 2 and len(got["tokens"][0]) == 4      # prefill's + 3 steps
    assert len(got["first_ties"]) == 2 and got["counters"]["clean"]
    assert got["weight_bytes"] > 0 and got["torch"] == torch.__version__
    absent = run_child({**SPEC, "contender": ct.HF_LOOP}, tmp_path, timeout_s=240)
    assert absent["status"] == "absent" and "needs CUDA" in absent["reason"]


def _smoke(tmp_path, extra):
    out = tmp_path / "part.json"
    torch.compiler.reset()
    code = main(["--protocol", "2", "--cpu-smoke", "--order-seed", "5", "--json", str(out),
                 "--results-dir", str(tmp_path / "results"), "--workdir", str(tmp_path / "w"),
                 *extra])
    torch.compiler.reset()
    return code, json.loads(out.read_text())


def test_in_process_smoke_writes_a_valid_protocol_2_file(tmp_path, capsys):
    code, doc = _smoke(tmp_path, ["--in-process", "--models", "llama-3-8b", "--layers", "1",
                                  "--steps", "3", "--repeats", "1", "--only",
                                  ct.RESIDENT_STATIC, ct.KVPR, ct.HF_GENERATE, ct.COPY_ONLY])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert schema.validate(doc) == [] and doc["protocol"] == 2 and doc["order_seed"] == 5
    assert "in-process" in doc["note"] and "meaningless" in doc["note"]
    row = doc["rows"][0]
    assert (row["model"], row["attention"], row["layers"]) == ("llama-3-8b", "GQA", 1)
    assert set(row["contenders"]) == {ct.RESIDENT_STATIC, ct.KVPR, ct.COPY_ONLY}
    assert "needs CUDA" in row["absent"][ct.HF_GENERATE]
    kvpr = row["contenders"][ct.KVPR]
    assert (kvpr["steps"], kvpr["repeats"], kvpr["token_agreement"]) == (3, 1, 1.0)
    assert len(kvpr["round_medians_ms"]) == 2 and row["split"] == [0.0]   # GQA: l* = 0
    assert row["contenders"][ct.COPY_ONLY]["token_agreement"] is None
    written = list((tmp_path / "results").glob("*-cpu-v2.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["rows"] == doc["rows"]
    assert "### llama-3-8b (GQA, 1 layers)" in captured.out


@pytest.mark.slow
def test_full_cpu_smoke_one_process_per_contender(tmp_path, capsys):
    code, doc = _smoke(tmp_path, [])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert schema.validate(doc) == []
    assert [r["model"] for r in doc["rows"]] == ["llama-7b", "llama-3-8b"]
    for row in doc["rows"]:
        assert set(row["contenders"]) == set(ct.NAMES) - set(ct.CUDA_ONLY)
        assert set(row["absent"]) == set(ct.CUDA_ONLY)
        pids = {r["pid"] for c in row["contenders"].values() for r in c["rounds"]}
        assert len(pids) == 2 * len(row["contenders"])        # one process each, per round
        assert row["orders"][1] == row["orders"][0][::-1]


def test_kvpr_bench_protocol_2_parses_and_needs_cuda_or_cpu_smoke(capsys):
    import argparse

    from kvpr_compile.commands import bench
    parser = argparse.ArgumentParser(prog="kvpr")
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--protocol", "2", "--steps", "32", "--repeats", "3",
                              "--only", ct.KVPR, ct.COPY_ONLY, "--order-seed", "4"])
    assert (args.protocol, args.steps, args.repeats, args.only) == (2, 32, 3, [ct.KVPR,
                                                                            ct.COPY_ONLY])
    if not torch.cuda.is_available():
        assert main(["--protocol", "2"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_the_runs_one_profile_falls_back_when_its_file_is_missing(tmp_path, capsys):
    import argparse

    from kvpr_compile.bench.v2 import _profile
    args = argparse.Namespace(profile=str(tmp_path / "gone.json"))
    path, prof = _profile(args, torch.device("cpu"), tmp_path)
    assert json.loads(open(path).read()) == prof and prof["name"] == "h200-pcie5"
    assert "no profile at" in capsys.readouterr().err
    again, same = _profile(argparse.Namespace(profile=path), torch.device("cpu"), tmp_path)
    assert again == path and same == prof          # a file is read, never re-measured


def test_traced_steps_after_the_window(tmp_path, capsys):
    """``--trace DIR``: a kvpr loop contender profiles its last steps once more after the timed
    window (round 1); the row says what the trace holds (on a CPU: no GPU activity)."""
    traces = tmp_path / "traces"
    code, doc = _smoke(tmp_path, ["--in-process", "--models", "llama-3-8b", "--layers", "1",
                                  "--steps", "3", "--repeats", "1", "--rounds", "1",
                                  "--trace", str(traces), "--trace-steps", "2",
                                  "--only", ct.KVPR_RATIO0])
    assert code == 0, capsys.readouterr().err[-2000:]
    trace = doc["rows"][0]["contenders"][ct.KVPR_RATIO0]["trace"]
    assert trace["steps"] == 2 and "no CUDA kernels" in trace["note"]
    text = (traces / "case0-kvpr_ratio0.json").read_text()
    assert "decode step 0" in text and "decode step 1" in text and "decode step 2" not in text
    assert "traced 2 steps" in capsys.readouterr().out
