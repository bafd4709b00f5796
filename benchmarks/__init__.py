"""Benchmarks: pytest-benchmark suites (test_bench_decode.py) and the one-run comparison
(``python -m benchmarks.decode``, the same as ``kvpr bench``; logic in ``kvpr_compile.bench``)."""
