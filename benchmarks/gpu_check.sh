#!/usr/bin/env bash
# The whole first-GPU check in one command, sized for <= 480 s on an H100/H200:
#   install the checkout (and carried wheels) -> versions, backend="kvpr" by name -> measured
#   H2D/D2H -> the resident decode under three HF caches -> three table cases, one process each
#   (trace PNG for the first) -> CUDA tests (quick selection, up to 150 s) -> the results file
#   benchmarks/results/<date>-<card>.json, copied to DEST with the rest packed in DEST/check.tgz.
# Usage, from the repo root on the GPU machine:  bash benchmarks/gpu_check.sh [DEST [STEPS]]
#   DEST defaults to $OUT (the device tool's output folder), else /tmp/kvpr_gpu.
#   STEPS: comma-separated subset of env,profile,resident,tests,cases,order,throughput,piecewise,results (default:
#   all but throughput and piecewise; the install always runs), e.g. "tests,results" for a short
#   second run. The throughput schedule's benchmark and the inner="piecewise" case (which decides
#   the default inner on CUDA, inner.py) are the second call (<= 300 s):
#     KVPR_CHECK_BUDGET=290 bash benchmarks/gpu_check.sh "$OUT" throughput,piecewise,results
#   (its results file is <date>-<card>-throughput.json).
#   KVPR_CHECK_BUDGET (seconds, default 470) is the deadline every step's timeout is cut to.
# Every step writes its files as soon as it is done, so a step cut short loses only itself.
# Wheels carried in .whl/ (mip==1.16rc0, cffi, pycparser; setuptools, wheel; .whl/plot/: matplotlib
# and its dependencies) are installed first, each only where its module is missing: the lent
# image has no network and no mip. Commands run as `python3 -m kvpr_compile.cli` (from the repo
# root this works even if the install failed; the bench then passes the backend function).
set -uo pipefail
dest="${1:-${OUT:-/tmp/kvpr_gpu}}"
steps=",${2:-env,profile,resident,tests,cases,order,results},"
budget="${KVPR_CHECK_BUDGET:-470}"
# Steps write into a work folder outside DEST; DEST gets only a few files (the device tool returns
# a limited number of files: the first run lost its results file among 21): check.tgz (all of
# the work folder but trace JSONs, refreshed after every step), traces.tgz, and copies of
# results/*.json, results.md and steps.log.
out="${KVPR_CHECK_WORK:-/tmp/kvpr_gpu_work}"
rm -rf "$out"
mkdir -p "$dest" "$out/cases" "$out/trace" "$out/results"
pack() {
    tar czf "$dest/check.tgz" -C "$out" --exclude='./trace/*.json' --exclude='./profile-cache' . 2>/dev/null
    cp "$out"/results/*.json "$out/results.md" "$out/steps.log" "$dest/" 2>/dev/null
    return 0
}
trap 'pack; ls "$out"/trace/*.json > /dev/null 2>&1 && tar czf "$dest/traces.tgz" -C "$out" trace' EXIT
export PYTHONUNBUFFERED=1 KVPR_CACHE_DIR="$out/profile-cache"
py="${PYTHON:-python3}"   # the interpreter to install into and run with
start=$SECONDS
log() { echo "[gpu_check $((SECONDS - start))s] $*" | tee -a "$out/steps.log"; }
# run NAME CAP CMD...: CMD under a timeout of min(CAP, time left - 20 s for the results file);
# SIGINT first so pytest still writes its junit XML, SIGKILL 10 s later.
run() {
    local name=$1 cap=$2; shift 2
    local left=$((budget - (SECONDS - start) - 20))
    local limit=$((cap < left ? cap : left))
    if ((limit < 15)); then log "$name: skipped, ${left}s left"; return 124; fi
    log "$name: start (limit ${limit}s)"
    timeout -s INT -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    log "$name: rc=$rc"; tail -n 25 "$out/$name.log"
    pack
    return $rc
}
want() { [[ "$steps" == *",$1,"* ]]; }
pip_install() {   # into the interpreter's environment; Debian-style pythons need the extra flag
    $py -m pip install -q --no-index --no-deps "$@" 2>/dev/null ||
        $py -m pip install -q --no-index --no-deps --break-system-packages "$@"
}

# carried wheel (glob) -> installed only where its module (arg 2) does not import
need() { $py -c "import $2" 2>/dev/null || { ls $1 > /dev/null 2>&1 && pip_install $1; }; }
log "install"
$py -c "import setuptools as s, sys; sys.exit(int(s.__version__.split('.')[0]) < 68)" 2>/dev/null ||
    pip_install .whl/setuptools-*.whl .whl/wheel-*.whl
need ".whl/pycparser-*.whl" pycparser; need ".whl/cffi-*.whl" cffi; need ".whl/mip-*.whl" mip
for pair in six:six packaging:packaging pyparsing:pyparsing python_dateutil:dateutil cycler:cycler \
        kiwisolver:kiwisolver fonttools:fontTools pillow:PIL contourpy:contourpy matplotlib:matplotlib; do
    need ".whl/plot/${pair%%:*}-*.whl" "${pair##*:}"   # the trace PNG needs matplotlib
done
pip_install --no-build-isolation -e . > "$out/install.log" 2>&1 || { log "install failed"; cat "$out/install.log"; }

want env && run env 60 $py - "$out/env.json" <<'EOF'
import json, platform, subprocess, sys
import torch, transformers
info = {"python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "kvpr_by_name": "kvpr" in torch.compiler.list_backends(exclude_tags=()),
        "host_cache_calls": {"torch.accelerator.empty_host_cache":
                             hasattr(getattr(torch, "accelerator", None), "empty_host_cache"),
                             "torch._C._host_emptyCache": hasattr(torch._C, "_host_emptyCache")}}
try:
    import mip
    info["mip"] = mip.__version__ if hasattr(mip, "__version__") else "importable"
except Exception as exc:  # noqa: BLE001
    info["mip"] = f"not importable: {exc}"
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as exc:
    info["nvidia_smi"] = f"not run: {exc}"
print(json.dumps(info, indent=2))
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
EOF

want profile && run profile 60 $py -m kvpr_compile.cli profile --refresh -o "$out/profile.json"

# the resident decode under three HF caches in one process (the first run's resident column was
# 10x too slow; benchmarks/resident_caches.py)
want resident && run resident 60 $py -m benchmarks.resident_caches

# the reduced table: one process per case (its pinned memory goes back to the OS at exit)
want cases && run case_llama-7b_b16_p1024 100 $py -m kvpr_compile.cli bench --models llama-7b --batch 16 --prompt 1024 --no-paper \
    --json "$out/cases/llama-7b-b16-p1024.json" --trace "$out/trace" --trace-steps 2
want cases && run case_opt-6.7b_paper 80 $py -m kvpr_compile.cli bench --models opt-6.7b --paper-only \
    --json "$out/cases/opt-6.7b-b32-p256.json"
want cases && run case_llama-3-8b_b16_p1024 80 $py -m kvpr_compile.cli bench --models llama-3-8b --batch 16 --prompt 1024 --no-paper \
    --json "$out/cases/llama-3-8b-b16-p1024.json"

# the GQA case's kvpr contenders in the other order: on the first run ratio 0 (first) stepped 5x
# slower than the scheduler's split (last) with the same plan (ratio 0 for GQA) and the same bytes
want order && run case_llama-3-8b_b16_p1024_order 60 $py -m kvpr_compile.cli bench --models llama-3-8b \
    --batch 16 --prompt 1024 --no-paper --contenders kvpr-sched kvpr-r0 \
    --json "$out/order-llama-3-8b-b16-p1024.json"

# throughput schedule, weights streamed from pinned host memory: kvpr vs ratio 0 vs link limit
want throughput && run throughput 190 $py -m kvpr_compile.cli bench --schedule throughput \
    --models opt-6.7b opt-13b --batch 128 --json "$out/cases/throughput.json"

# the same decode case with inductor between the kvpr steps (compare with case_llama-7b above)
want piecewise && run case_llama-7b_b16_p1024_piecewise 70 $py -m kvpr_compile.cli bench --models llama-7b \
    --batch 16 --prompt 1024 --no-paper --inner piecewise --contenders kvpr-r0 kvpr-sched \
    --json "$out/cases/llama-7b-b16-p1024-piecewise.json"

# -o addopts=-ra: setup.cfg's --benchmark-disable needs pytest-benchmark, which the image may lack
want tests && run cuda_tests 150 $py -m pytest -q -p no:cacheprovider -o addopts=-ra \
    --junitxml="$out/cuda_tests.xml" \
    tests/test_cuda_runtime.py tests/test_entry_point.py \
    tests/test_reset_and_fragments.py::test_a_forced_ratio_never_imports_mip

want results || exit 0
log "results"
$py -m kvpr_compile.bench.results --cases "$out/cases" --junit "$out/cuda_tests.xml" --env "$out/env.json" \
    -o "$out/results" | tee "$out/results.md"
log "done in $((SECONDS - start)) s"
