#!/usr/bin/env bash
# One GPU run: CUDA correctness tests, then the decode comparison table (JSON + trace).
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_check.sh [OUT_DIR] [tests|bench|all]
# (tests: about 2-3 min; bench: about 5-7 min on an H100 by estimate; run them as two commands
# where one command may take at most 10 minutes.)
# Missing Python packages (mip, cbcbox, cffi, pycparser on the lent image) may be carried as
# wheels in .whl/; they are installed into /tmp/site first.
set -uo pipefail
out="${1:-${OUT:-/tmp/kvpr_gpu}}"
what="${2:-all}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
if [[ "$what" != bench ]]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_runtime.py tests/test_profiler.py \
        benchmarks/test_bench_decode.py --run-slow 2>&1 | tee "$out/cuda_tests.log"
fi
if [[ "$what" != tests ]]; then
    python3 -m benchmarks.decode --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
    python3 -m benchmarks.decode --models llama-7b --batch 16 --prompt 1024 --no-paper \
        --trace "$out/trace" 2>&1 | tail -5
fi
