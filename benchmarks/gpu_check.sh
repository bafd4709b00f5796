#!/usr/bin/env bash
# The GPU check by benchmark protocol 2 (docs/design.md, "Benchmark protocol 2"), two calls:
#   call 1 (<= 480 s):  bash benchmarks/gpu_check.sh "$OUT"
#     install -> env (versions, clocks, power, PCIe generation and width, NUMA node) -> one
#     profile -> the MHA case (Llama-7B-like b16 p1024, 8 layers) and the GQA case
#     (Llama-3-8B-like b16 p1024), every contender in its own process, round 1 of both cases then
#     round 2 (reversed) -> the CUDA tests' quick selection -> <date>-<card>-v2.json
#   call 2 (<= 300 s):  KVPR_CHECK_BUDGET=290 bash benchmarks/gpu_check.sh "$OUT" call2
#     (set the budget to the device time left after call 1, less 20 s: the run tool's
#     lease.budget_left_s; the steps come in the order of what matters most)
#     install -> env -> profile -> the plan's CPU share on the GQA case (kvpr_cpu against ratio
#     0 and the link limit; 3 steps of each traced: the merge's cost to the compute stream) ->
#     the throughput schedule (OPT-6.7B/13B-like, b128, weights
#     streamed; a row that names no micro-batches is flagged) -> host rates (CPU attention over
#     host fp16/bf16 K,V, 1..all cores, the worker's kernel and the native one, host memory
#     bandwidth, small D2H+H2D round trip) -> the CPU share on the MHA case (8 layers) -> a
#     resident share of the GQA case's cache (1/3, 2/3 against budget 0) -> the MHA case at 32
#     layers with what time is left -> <date>-<card>-v2-call2.json
#   The profile carries the host's attention rate (a CUDA measurement includes it, at the CPU
#   worker's thread count; the smoke run adds it with --host), so kvpr_cpu's share is the
#   plan's; the other kvpr contenders pin 0.
# Usage, from the repo root:  bash benchmarks/gpu_check.sh [DEST [STEPS]]
#   DEST defaults to $OUT (the device tool's output folder), else /tmp/kvpr_gpu.
#   STEPS: "call1" (default), "call2", or a comma-separated subset of
#   env,profile,cases,tests,results,cpu,throughput,hostrates,cpu_mha,shares,mha32,results2 (install
#   always runs).
#   KVPR_CHECK_BUDGET (seconds; 470, or 290 for call2) is the deadline every step is cut to.
#   KVPR_CHECK_SMOKE=1 runs the same plumbing on a CPU (toy models, preset profile): a dry run.
# DEST receives few files: results/*.json, results.md, steps.log and check.tgz (everything else).
# The results file's name is chosen so that no file in benchmarks/results/ is overwritten.
set -uo pipefail
dest="${1:-${OUT:-/tmp/kvpr_gpu}}"
steps="${2:-call1}"
case "$steps" in
    call1) steps="env,profile,cases,tests,results"; default_budget=470 ;;
    call2) steps="env,profile,cpu,throughput,hostrates,cpu_mha,shares,mha32,results2"
           default_budget=290 ;;
    *) default_budget=470 ;;
esac
steps=",$steps,"
budget="${KVPR_CHECK_BUDGET:-$default_budget}"
smoke="${KVPR_CHECK_SMOKE:-0}"
out="${KVPR_CHECK_WORK:-/tmp/kvpr_gpu_work}"
rm -rf "$out"
mkdir -p "$dest" "$out/cases" "$out/results" "$out/throughput"
export KVPR_CALL_ID="${KVPR_CALL_ID:-$(date -u +%Y%m%dT%H%M%SZ)-$$}"
export PYTHONUNBUFFERED=1 KVPR_CACHE_DIR="$out/profile-cache"
pack() {
    tar czf "$dest/check.tgz" -C "$out" --exclude='./profile-cache' . 2>/dev/null
    cp "$out"/results/*.json "$out/results.md" "$out/steps.log" "$dest/" 2>/dev/null
    return 0
}
trap pack EXIT
py="${PYTHON:-python3}"
start=$SECONDS
log() { echo "[gpu_check $((SECONDS - start))s] $*" | tee -a "$out/steps.log"; }
left() { echo $((budget - (SECONDS - start))); }
# run NAME CAP CMD...: CMD under min(CAP, time left - 15 s); SIGINT first (pytest then still
# writes its junit XML), SIGKILL 10 s later. The log's tail goes to stdout and steps.log.
run() {
    local name=$1 cap=$2; shift 2
    local room=$(($(left) - 15))
    local limit=$((cap < room ? cap : room))
    if ((limit < 15)); then log "$name: skipped, $(left)s left"; return 124; fi
    log "$name: start (limit ${limit}s)"
    timeout -s INT -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    log "$name: rc=$rc"
    tail -n 30 "$out/$name.log" | tee -a "$out/steps.log"
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

log "call $KVPR_CALL_ID: steps $steps budget ${budget}s smoke $smoke"
log "install"
$py -c "import setuptools as s, sys; sys.exit(int(s.__version__.split('.')[0]) < 68)" 2>/dev/null ||
    pip_install .whl/setuptools-*.whl .whl/wheel-*.whl
need ".whl/pycparser-*.whl" pycparser; need ".whl/cffi-*.whl" cffi; need ".whl/mip-*.whl" mip
if [[ "$smoke" != 1 ]]; then
    pip_install --no-build-isolation -e . > "$out/install.log" 2>&1 ||
        { log "install failed"; tail -n 20 "$out/install.log"; }
fi

# protocol-2 case: NAME CAP EXTRA-ARGS... (the case's own --deadline-s comes from CAP)
v2() {
    local name=$1 cap=$2; shift 2
    local room=$(($(left) - 15))
    local limit=$((cap < room ? cap : room))
    local extra=()
    [[ "$smoke" == 1 ]] &&
        extra=(--cpu-smoke --layers 1 --batch 2 --prompt 16 --steps 3 --repeats 1)
    run "$name" "$cap" $py -m benchmarks.decode --protocol 2 --profile "$out/profile.json" \
        --json "$out/cases/$name.json" --workdir "$out/work/$name" --deadline-s $((limit - 20)) \
        --call-id "$KVPR_CALL_ID" "$@" "${extra[@]}"
}

want env && run env 40 $py -m benchmarks.gpu_env "$out/env.json"
if want profile; then
    if [[ "$smoke" == 1 ]]; then
        run profile 30 $py -m kvpr_compile.cli profile --preset h200-pcie5 --host \
            -o "$out/profile.json"
    else
        run profile 60 $py -m kvpr_compile.cli profile --refresh -o "$out/profile.json"
    fi
fi

# call 1: both cases in one run (round 1 of each, then round 2), with what is left after the
# tests (100 s) and the results (15 s)
reserve=0; want tests && reserve=100; want results && reserve=$((reserve + 15))
want cases && v2 cases $(($(left) - reserve)) --models llama-7b llama-3-8b --batch 16 \
    --prompt 1024 --layers 8
# -o addopts=-ra: setup.cfg's --benchmark-disable needs pytest-benchmark, which the image may lack
want tests && run cuda_tests 100 $py -m pytest -q -p no:cacheprovider -o addopts=-ra \
    --junitxml="$out/cuda_tests.xml" \
    tests/test_cuda_runtime.py tests/test_entry_point.py tests/test_bench_protocol2_flags.py \
    tests/test_reset_and_fragments.py::test_a_forced_ratio_never_imports_mip
if want results; then
    log "results"
    $py -m kvpr_compile.bench.schema assemble "$out"/cases/*.json --junit "$out/cuda_tests.xml" \
        --env "$out/env.json" --profile "$out/profile.json" -o "$out/results" \
        --also-check benchmarks/results | tee "$out/results.md"
fi

# call 2
# the plan's CPU share (the profile's host attention rate) on the GQA case, against ratio 0
# (kvpr_ratio0 and kvpr_cpu trace 3 steps after round 1's window: the compute stream's idle)
want cpu && v2 cpu 100 --models llama-3-8b --batch 16 --prompt 1024 --layers 8 \
    --only resident_static kvpr_ratio0 kvpr_cpu --trace "$out/traces"
tput_args=(--models opt-6.7b opt-13b --batch 128)
[[ "$smoke" == 1 ]] && tput_args=(--cpu-smoke --models opt-6.7b)
want throughput && run throughput 150 $py -m kvpr_compile.cli bench --schedule throughput \
    "${tput_args[@]}" --json "$out/throughput/throughput.json"
rates_args=(); [[ "$smoke" == 1 ]] && rates_args=(--quick)
want hostrates && run hostrates 60 $py -m benchmarks.host_rates --json "$out/host_rates.json" \
    "${rates_args[@]}"
want results2 && r2=15 || r2=0
# the same on the MHA case (8 layers): kvpr_cpu against ratio 0
want cpu_mha && v2 cpu_mha 90 --models llama-7b --batch 16 --prompt 1024 --layers 8 \
    --only resident_static kvpr_ratio0 kvpr_cpu
# a resident share of the GQA case's cache (one third, two thirds) against budget 0
want shares && v2 shares 90 --models llama-3-8b --batch 16 --prompt 1024 --layers 8 \
    --only resident_static kvpr_ratio0 kvpr_resident_third kvpr_resident_two_thirds
want mha32 && v2 mha32 $(($(left) - r2)) --models llama-7b --batch 16 --prompt 1024 \
    --layers 32 --only resident_static hf_generate_offloaded kvpr_ratio0 kvpr kvpr_cpu copy_only
if want results2; then
    log "results (call 2)"
    $py -m kvpr_compile.bench.schema assemble \
        $(ls "$out"/cases/{cpu,cpu_mha,shares,mha32}.json 2>/dev/null) \
        --throughput "$out/throughput/throughput.json" --host-rates "$out/host_rates.json" \
        --env "$out/env.json" --profile "$out/profile.json" -o "$out/results" \
        --also-check benchmarks/results --tag v2-call2 | tee "$out/results.md"
fi
log "done in $((SECONDS - start)) s"
