"""`kvpr bench --schedule throughput` end to end on the CPU (toy OPT, micro-batches 2 of an
uneven batch 5, weights streamed) and its rows in the committed results file."""
from __future__ import annotations

import json

import pytest
import torch

from kvpr_compile.bench import results
from kvpr_compile.bench.configs import TPUT_KVPR, TPUT_R0
from kvpr_compile.bench.main import main


def test_cpu_smoke_run_and_results_rows(tmp_path, capsys):
    out = tmp_path / "cases" / "throughput.json"
    out.parent.mkdir()
    torch.compiler.reset()
    code = main(["--schedule", "throughput", "--cpu-smoke", "--models", "opt-6.7b",
                 "--json", str(out)])
    torch.compiler.reset()
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "CPU smoke run: timings meaningless" in captured.out
    doc = json.loads(out.read_text())
    assert doc["meta"]["schedule"] == "throughput" and doc["meta"]["cpu"]
    case = doc["cases"][0]
    assert (case["batch"], case["micro_batches"]) == (5, 2)
    runs = case["runs"]
    assert runs[TPUT_R0]["status"] == runs[TPUT_KVPR]["status"] == "ok"
    assert case["agreement"] == 1.0                       # fp32: recompute = stored K,V
    assert runs[TPUT_R0]["weight_bytes_per_step"] > 0     # 3 layers over 2 slots: streamed
    # ratio 0 loads full K,V; the planned split on an MHA model loads less cache per step
    assert 0 < runs[TPUT_KVPR]["cache_bytes_per_step"] < runs[TPUT_R0]["cache_bytes_per_step"]
    assert results.main(["--cases", str(tmp_path / "cases"), "--date", "2026-11-26",
                         "-o", str(tmp_path / "out")]) == 0
    saved = json.loads(next((tmp_path / "out").glob("2026-11-26-*-throughput.json")).read_text())
    row = saved["throughput_rows"][0]
    assert saved["rows"] == [] and row["batch"] == 5 and row["micro_batches"] == [3, 2]
    assert row["kvpr_tokens_per_s"] > 0 and row["r0_limit_ms"] > row["kvpr_limit_ms"] > 0


@pytest.mark.parametrize("argv", [["--micro-batches", "0"], ["--new-tokens", "2"]])
def test_bad_throughput_arguments_exit_2(argv, capsys):
    assert main(["--schedule", "throughput", "--cpu-smoke", *argv]) == 2
    assert "kvpr bench: error:" in capsys.readouterr().err


def test_inner_choices_of_the_commands_are_the_backends():
    from kvpr_compile.bench.configs import INNER_CHOICES
    from kvpr_compile.inner import INNER
    assert INNER_CHOICES == INNER
