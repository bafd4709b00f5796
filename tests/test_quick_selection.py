"""The ``quick`` selection (``python -m pytest -q -m quick``, README "Tests") keeps a test in
every area: each module named here marks at least one test ``quick``. Read from the sources,
so the check costs no collection."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parents[1]
AREAS = {
    "cache": "tests/test_cache.py",
    "ops": "tests/test_ops_values.py",
    "rewrite and passes": "tests/test_rewrite_details.py",
    "runtime on simulated streams": "tests/test_runtime_sim.py",
    "transformers models": "tests/test_hf_models.py",
    "throughput schedule": "tests/test_throughput_schedule.py",
    "throughput plan": "tests/test_throughput_plan.py",
    "latency LP": "tests/test_latency_lp.py",
    "CLI": "tests/test_cli_plan.py",
    "bench tools": "tests/test_bench_tools.py",
    "options": "tests/test_options.py",
    "import layers": "tests/test_import_layers.py",
    "golden graphs": "tests/test_golden_graphs.py",
    "CPU co-attention": "tests/test_cpu_attention.py",
}


@pytest.mark.parametrize("area", sorted(AREAS))
def test_every_area_has_quick_tests(area):
    assert "pytest.mark.quick" in (ROOT / AREAS[area]).read_text(), f"{area}: no quick test"
