"""`kvpr plan` and `kvpr profile` through their argparse sub-commands."""
from __future__ import annotations

import json

import pytest
import torch

from kvpr_compile.plan.arch_presets import ARCH_PRESETS
from kvpr_compile.commands import plan as plan_cmd
from kvpr_compile.commands import profile as profile_cmd
from kvpr_compile.plan.presets import PRESETS
from helpers import kvpr_cli

pytestmark = pytest.mark.quick


@pytest.fixture(autouse=True)
def _isolated(isolated_profiles):
    pass


kvpr = kvpr_cli   # tests read as the command line


def table_rows(out: str) -> list[list[float]]:
    rows = []
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit():
            rows.append([float(x) for x in cells])
    return rows


def paper_ratio(h, v_com, v_gpu, v_copy, p=2):
    """The paper's balance R = K for MHA, R counting the GEMMs and one read+write pass over
    K,V[:l] at the strided-copy rate: (2hp/v) / (4h^2/v_gpu + 4hp/v_copy + 2hp/v)."""
    k = 2 * h * p / v_com
    return k / (4 * h * h / v_gpu + 4 * h * p / v_copy + k)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("arch", ["llama-7b", "llama-3-8b", "llama-2-13b", "opt-6.7b"])
def test_plan_table_for_presets(capsys, preset, arch):
    """Row-by-row schedule (the paper's): the split must be the paper's closed form."""
    assert kvpr(["plan", "--arch", arch, "--batch", "16", "--seq", "2048", "--profile", preset,
                 "--layers", "5", "--overlap", "row"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [int(r[0]) for r in rows] == list(range(5))
    spec, prof = ARCH_PRESETS[arch], PRESETS[preset]
    for layer, ratio, recompute, resident, h2d_mb, d2h_mb, link, pred, base, base_link in rows:
        assert abs(recompute - ratio * 2048) <= 1.1 and resident == 0   # ratio has 3 decimals
        assert 0 < pred <= base * (1 + 1e-6)
        # bytes column = X for l tokens + K,V for the rest
        kv_bytes = 2 * 16 * spec.kv_hidden_size * 2
        want = (16 * recompute * spec.hidden_size * 2 + (2048 - recompute) * kv_bytes) / 1e6
        assert h2d_mb == pytest.approx(want, abs=0.06)
        assert base_link == pytest.approx(2048 * kv_bytes / prof.h2d_bytes_per_s * 1e3
                                          + d2h_mb * 1e6 / prof.d2h_bytes_per_s * 1e3, rel=1e-3)
        if spec.num_kv_heads == spec.num_heads:       # MHA: the paper's split
            assert ratio == pytest.approx(paper_ratio(spec.hidden_size, prof.h2d_bytes_per_s,
                                                      prof.flops(torch.float16),
                                                      prof.mem_copy_bytes_per_s), abs=2e-3)
            assert pred < 0.8 * base
        else:                                         # GQA: never recompute
            assert ratio == 0 and pred == pytest.approx(base, rel=1e-3)
    total = [line for line in out.splitlines() if line.startswith("total")][0].split()
    assert float(total[7]) == pytest.approx(sum(r[7] for r in rows), abs=0.1)
    assert float(total[7]) >= float(total[6]) * (1 - 1e-3)   # never beats the physical limit
    assert float(total[8]) >= float(total[9]) * (1 - 1e-3)
    assert "predicted step" in out and prof.source in out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_default_stream_plan_recomputes_at_least_the_row_split(capsys, preset):
    """Default (layer-ahead prefetch) schedule: recompute overlaps the next layer's loads, so
    MHA recomputes at least as much as the row schedule and is predicted no slower."""
    results = {}
    for overlap in ("row", "stream"):
        assert kvpr(["plan", "--arch", "llama-7b", "--batch", "16", "--seq", "2048", "--profile",
                     preset, "--layers", "4", "--json", "--overlap", overlap]) == 0
        results[overlap] = json.loads(capsys.readouterr().out)
    assert min(results["stream"]["ratios"]) >= min(results["row"]["ratios"]) - 1e-3
    assert results["stream"]["predicted_step_s"] <= results["row"]["predicted_step_s"] * (1 + 1e-6)


def test_plan_json_and_budget(capsys):
    assert kvpr(["plan", "--arch", "llama-2-13b", "--batch", "8", "--seq", "4096", "--profile",
                 "a100-pcie4", "--layers", "3", "--gpu-budget-gb", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["recompute_tokens"]) == 3 and data["hidden_size"] == 5120
    assert sum(data["resident_tokens"]) > 0
    assert data["predicted_step_s"] < data["baseline_step_s"]
    assert data["gpu_budget_bytes"] == 4e9


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the default is a measurement")
def test_plan_full_model_defaults_to_h200_preset(capsys):
    assert kvpr(["plan", "--arch", "opt-6.7b", "--batch", "32", "--seq", "1024"]) == 0
    out = capsys.readouterr().out
    assert len(table_rows(out)) == 32 and "h200-pcie5" in out


def test_plan_errors(capsys):
    assert kvpr(["plan", "--arch", "llama-7b", "--batch", "8", "--seq", "64", "--profile",
                 "nonesuch"]) == 2
    assert "a100-pcie4" in capsys.readouterr().err
    assert kvpr(["plan", "--arch", "llama-7b", "--batch", "8", "--seq", "1024", "--profile",
                 "h200-pcie5", "--gpu-budget-gb", "0.01"]) == 2
    assert "nothing fits" in capsys.readouterr().err
    assert kvpr(["plan", "--arch", "llama-7b", "--batch", "0", "--seq", "1024", "--profile",
                 "h200-pcie5"]) == 2
    assert "batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kvpr(["plan", "--arch", "gpt-5", "--batch", "1", "--seq", "1"])


def test_profile_preset_and_list(capsys, tmp_path):
    out_path = tmp_path / "h100.json"
    assert kvpr(["profile", "--preset", "h100-pcie5", "-o", str(out_path)]) == 0
    out = capsys.readouterr().out
    assert "52.0 GB/s" in out and "datasheet" in out
    assert json.loads(out_path.read_text())["name"] == "h100-pcie5"
    assert kvpr(["profile", "--file", str(out_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == f"file: {out_path}"
    assert kvpr(["profile", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PRESETS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_profile_without_cuda_suggests_presets(capsys):
    assert kvpr(["profile"]) == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and "--preset" in err and "h200-pcie5" in err


def test_through_cli_main(capsys):
    from kvpr_compile.cli import build_parser, main
    try:
        build_parser()
    except ImportError as exc:  # demo/bench belong to others and may not exist yet
        pytest.skip(f"cli.py cannot build its parser yet: {exc}")
    assert main(["plan", "--arch", "llama-7b", "--batch", "32", "--seq", "1024", "--profile",
                 "h200-pcie5", "--layers", "4"]) == 0
    assert len(table_rows(capsys.readouterr().out)) == 4


def test_preset_names_for_help_match_the_presets():
    assert profile_cmd.PRESET_NAMES == tuple(PRESETS)
    from kvpr_compile.plan import cost_model
    assert set(plan_cmd.OVERLAPS) == set(cost_model.OVERLAPS)


def test_profile_unknown_preset_is_an_error(capsys):
    assert kvpr(["profile", "--preset", "rtx-9090"]) == 2
    assert "h200-pcie5" in capsys.readouterr().err


def test_plan_output_cites_no_file_outside_the_repo(capsys):
    assert kvpr(["plan", "--arch", "llama-7b", "--batch", "8", "--seq", "512", "--profile",
                 "h200-pcie5", "--layers", "2"]) == 0
    assert "DESIGN.md" not in capsys.readouterr().out


HELP_WITHOUT_TORCH = """
import sys
from kvpr_compile.cli import main
try:
    main({argv!r})
except SystemExit as exc:
    assert exc.code == 0, exc.code
heavy = sorted(m for m in ("torch", "transformers", "mip", "numpy") if m in sys.modules)
assert not heavy, heavy
"""


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["plan", "--help"],
                                  ["profile", "--help"], ["bench", "--help"]])
def test_help_answers_without_importing_torch(argv):
    """`kvpr --help` must be instant: no command module imports torch before `run`."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH.format(argv=argv)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: kvpr" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU wording")
def test_demo_shows_exactness_bytes_per_step_and_the_plan(capsys):
    from kvpr_compile.cli import main
    assert main(["demo", "--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "2",
                 "--batch", "2", "--prompt", "6", "--new", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("greedy tokens identical: True") == 2
    import re
    found = re.search(r"H2D per step: ([\d.]+) (\w+) kvpr vs ([\d.]+) (\w+) full K,V "
                      r"\(([\d.]+)x\)", out)
    assert found, out
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    kvpr_b = float(found[1]) * scale[found[2]]
    full_b = float(found[3]) * scale[found[4]]
    # full K,V per step: 2 layers x K and V x batch 2 x hidden 32 x fp32, mean past 7 (6, 7, 8)
    assert full_b == pytest.approx(2 * 2 * 2 * 32 * 4 * 7, rel=5e-3)
    assert 0 < kvpr_b < full_b and float(found[5]) == pytest.approx(kvpr_b / full_b, abs=0.01)
    assert "profile h200-pcie5 (preset)" in out and "tokens/s: not shown on a CPU" in out
    assert "DESIGN" not in out
    # the decode graph was found, and its split is the plan table's, at the length it names
    split = re.search(r"split: (ratios (layer \d: [\d.]+(, )?)+|ratio [\d.]+ in every layer)"
                      r" \(.*planned at s=(\d+)\)", out)
    assert split, out
    from kvpr_compile.plan.cost_model import REPRESENTATIVE_SEQ_LEN
    assert int(split[4]) == REPRESENTATIVE_SEQ_LEN
    assert f"the plan of the kvpr run (b=2, h=32, h_kv=32, float32) with profile h200-pcie5 " \
           f"(preset), at s={REPRESENTATIVE_SEQ_LEN} cached tokens" in out
    table = [r[1] for r in table_rows("\n".join(ln.strip() for ln in out.splitlines()))]
    said = [float(v) for v in re.findall(r"layer \d: ([\d.]+)", split[0])] or \
        [float(re.search(r"ratio ([\d.]+) in every", split[0])[1])] * 2
    assert table == said, (table, said)


def test_throughput_plan_prints_tokens_per_s_against_ratio_zero_and_the_link(capsys):
    assert kvpr(["plan", "--arch", "opt-6.7b", "--batch", "64", "--seq", "288", "--layers", "4",
                 "--schedule", "throughput", "--profile", "h200-pcie5"]) == 0
    out = capsys.readouterr().out
    assert "throughput schedule" in out and "tokens/s at ratio 0" in out and "link limit" in out
    assert "micro-batch" in out and "micro-batches [" not in out
    assert kvpr(["plan", "--arch", "opt-6.7b", "--batch", "64", "--seq", "288", "--layers", "4",
                 "--schedule", "throughput", "--micro-batches", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["micro_batches"] == [22, 21, 21] and len(data["recompute_tokens"]) == 4
    assert data["predicted_step_s"] <= data["baseline_step_s"]


@pytest.mark.parametrize("argv,message", [
    (["--schedule", "throughput", "--micro-batches", "0"], "micro_batches must be an integer >= 1"),
    (["--schedule", "throughput", "--micro-batches", "65"], "larger than the batch (64 rows)"),
    (["--schedule", "throughput", "--gpu-budget-gb", "0.5"], "nothing fits"),
    (["--micro-batches", "2"], "needs --schedule throughput"),
])
def test_throughput_plan_errors_name_the_numbers(capsys, argv, message):
    assert kvpr(["plan", "--arch", "opt-6.7b", "--batch", "64", "--seq", "288", "--layers", "2",
                 *argv]) == 2
    assert message in capsys.readouterr().err


# -- the user's own model, memory, the closed form, micro-batches in words -----------------------
def _write_config(tmp_path, cls_name, **fields):
    transformers = pytest.importorskip("transformers")
    directory = tmp_path / cls_name
    getattr(transformers, cls_name)(vocab_size=128, **fields).save_pretrained(directory)
    return directory


def test_hf_config_plans_the_users_model(capsys, tmp_path):
    """--hf-config reads a local config.json: the plan is the LP's for its dims, in its dtype."""
    from kvpr_compile.plan.latency_lp import plan_split
    directory = _write_config(tmp_path, "LlamaConfig", hidden_size=256, intermediate_size=512,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                              dtype="bfloat16")
    assert kvpr(["plan", "--hf-config", str(directory), "--batch", "8", "--seq", "512",
                 "--profile", "h100-pcie5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    want = plan_split(PRESETS["h100-pcie5"], num_layers=3, batch_size=8, seq_len=512,
                      hidden_size=256, kv_hidden_size=256, dtype="bfloat16",
                      mlp_params=3 * 256 * 512)
    assert data["dtype"] == "bfloat16" and data["num_layers"] == 3
    assert data["ratios"] == want.ratios and data["recompute_tokens"] == want.recompute_tokens
    assert data["predicted_step_s"] == pytest.approx(want.predicted_step_s, rel=1e-9)
    # a file path works as well as its directory; --dtype overrides the config's
    assert kvpr(["plan", "--hf-config", str(directory / "config.json"), "--batch", "8", "--seq",
                 "512", "--profile", "h100-pcie5", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "(h=256, h_kv=256, MHA), 3 of 3 layers" in out and "float32" in out


def test_hf_config_of_a_qwen2_and_the_qwen2_preset_agree(capsys, tmp_path):
    from kvpr_compile.plan.hf_config import arch_from_config
    spec = ARCH_PRESETS["qwen2-7b"]
    directory = _write_config(tmp_path, "Qwen2Config", hidden_size=3584, intermediate_size=18944,
                              num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4)
    arch, dtype = arch_from_config(directory)
    assert dtype is None
    assert (arch.hidden_size, arch.kv_hidden_size, arch.num_layers, arch.mlp_params,
            arch.attention_kind) == (spec.hidden_size, spec.kv_hidden_size, spec.num_layers,
                                     spec.mlp_params, "GQA 7:1") == (3584, 512, 28,
                                                                     3 * 3584 * 18944, "GQA 7:1")
    assert kvpr(["plan", "--arch", "qwen2-7b", "--batch", "4", "--seq", "1024", "--profile",
                 "h200-pcie5", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "qwen2-7b (h=3584, h_kv=512, GQA 7:1)" in out
    assert [r[1] for r in table_rows(out)] == [0.0, 0.0] and "no X (every layer at ratio 0)" in out


@pytest.mark.parametrize("argv,message", [
    (["--hf-config", "/nonexistent/kvpr/config.json"], "no config file at"),
    (["--arch", "llama-7b", "--hf-config", "x.json"], "exactly one of --arch"),
    ([], "exactly one of --arch"),
])
def test_plan_shape_errors(capsys, argv, message):
    assert kvpr(["plan", *argv, "--batch", "1", "--seq", "8", "--profile", "h200-pcie5"]) == 2
    assert message in capsys.readouterr().err


def test_plan_prints_host_and_device_memory(capsys):
    """Host: K,V of every layer + X of the layers that keep it (ratio > 0); device: the
    resident weights + the working set of the JSON plan."""
    from kvpr_compile.plan import cost_model as cm
    from kvpr_compile.plan.footprint import sized
    argv = ["plan", "--arch", "llama-7b", "--batch", "16", "--seq", "2048", "--profile",
            "h200-pcie5", "--layers", "5"]
    assert kvpr([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert kvpr(argv) == 0
    out = capsys.readouterr().out
    kv, x = 5 * 2 * 16 * 2048 * 4096 * 2, 5 * 16 * 2048 * 4096 * 2
    assert min(data["ratios"]) > 0
    assert (f"host memory (CPU store) at batch 16, 2048 tokens: K,V {sized(kv)} + X {sized(x)} "
            f"(5 of 5 layers keep X) = {sized(kv + x)}") in out
    weights = 5 * cm.layer_params(4096, 4096, ARCH_PRESETS["llama-7b"].mlp_params) * 2
    ws = data["working_set_bytes"]
    assert (f"device memory: weights {sized(weights)} (5 layers, resident) + working set "
            f"{sized(ws)} (two K,V slots and an assembled K,V of 2049 positions, two X slots of "
            f"{max(data['recompute_tokens'])} tokens) = {sized(weights + ws)}") in out


def _steady(out: str) -> float:
    import re
    return float(re.search(r"steady state l/s = ([\d.]+)", out)[1])


@pytest.mark.parametrize("overlap", ["row", "stream"])
def test_plan_says_why_its_split_is_not_the_closed_form(capsys, overlap):
    """The line names the terms the cost model adds, and the steady state they give is the
    split of the leading layers."""
    assert kvpr(["plan", "--arch", "llama-7b", "--batch", "16", "--seq", "2048", "--profile",
                 "h200-pcie5", "--layers", "16", "--overlap", overlap]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("why the split differs")]
    assert len(line) == 1
    ratios = [r[1] for r in table_rows(out)]
    assert all(abs(r - _steady(out)) <= 1e-3 for r in ratios[:8]), (ratios, line)
    if overlap == "stream":
        assert "A + K + D" in line[0] and "R + M + rest" in line[0] and ratios[-1] < ratios[0]
    else:
        assert "R = K + D" in line[0]
    assert kvpr(["plan", "--arch", "llama-3-8b", "--batch", "16", "--seq", "2048", "--profile",
                 "h200-pcie5", "--layers", "2", "--overlap", overlap]) == 0
    assert "why: X is no smaller than K+V" in capsys.readouterr().out


@pytest.mark.parametrize("sizes,words", [
    ([16], "1 micro-batch of 16 rows"), ([32] * 4, "4 micro-batches of 32 rows"),
    ([6, 6, 4], "3 micro-batches: 2 of 6 rows, 1 of 4"), ([1], "1 micro-batch of 1 row"),
    ([22, 21, 21], "3 micro-batches: 1 of 22 rows, 2 of 21"),
])
def test_micro_batches_in_words(sizes, words):
    from kvpr_compile.plan.micro_batch_words import in_words
    assert in_words(sizes) == words


def test_throughput_plan_names_micro_batches_in_words(capsys):
    assert kvpr(["plan", "--arch", "opt-6.7b", "--batch", "64", "--seq", "288", "--layers", "2",
                 "--schedule", "throughput", "--micro-batches", "3", "--profile",
                 "h200-pcie5"]) == 0
    out = capsys.readouterr().out
    assert "3 micro-batches: 1 of 22 rows, 2 of 21 (effective batch 64)" in out
    assert "host memory (CPU store) at batch 64, 288 tokens" in out and "(streamed)" in out
