#!/usr/bin/env bash
# What a lent GPU owes: the GPU tests, every benchmark, and the summary of their headline figures.
# Each stage fits one 10-minute device call; together they take about 25 minutes.
#
#   bash benchmarks/gpu_suite.sh tests          # kernel, attention, model, sampler and benchmark tests on CUDA (~4 min)
#   bash benchmarks/gpu_suite.sh rmsnorm        # RMSNorm sweeps: full, then residual (~7 min)
#   bash benchmarks/gpu_suite.sh ce             # fused linear cross-entropy sweep (~5 min)
#   bash benchmarks/gpu_suite.sh train          # train step, 32B layers, eager configs (~4 min)
#   bash benchmarks/gpu_suite.sh train-compile  # train step, torch.compile configs (~4 min)
#   bash benchmarks/gpu_suite.sh sampler        # sampler decode/prefill vs roofline and transformers (~5 min)
#   bash benchmarks/gpu_suite.sh summary        # summary-<device>.json + the LIMO projection (no GPU needed)
#   bash benchmarks/gpu_suite.sh all            # every stage in turn (a machine of your own: > 10 minutes)
#   bash benchmarks/gpu_suite.sh compare        # rerun the kernel sweeps that have a committed baseline for
#                                               # this GPU and hold their timings against it (make bench-ci)
#
# Stage outputs go to $OUT (the device tool's folder; default benchmarks/results) as
# <stage>-<device>.json plus a log; at most 4 files per stage, so each call's files come back.
# Copy the JSON into benchmarks/results/ and commit it with the date of the run. The summary
# stage reads benchmarks/results/ (RESULTS=... to change) and names the device by $DEVICE, or by
# the GPU when there is one. Liger-Kernel and pytest are not on the GPU image: carry their wheels
# (pure Python; benchmarks/README.md has the download line) as .whl/ and this script installs them.
set -uo pipefail
usage="usage: gpu_suite.sh quick|tests|rmsnorm|ce|train|train-compile|sampler|summary|all|compare"
stage=${1:?$usage}
case $stage in
quick | tests | rmsnorm | ce | train | train-compile | sampler | summary | all | compare) ;;
*) echo "unknown stage $stage; $usage" >&2 && exit 2 ;;
esac
OUT=${OUT:-benchmarks/results}
RESULTS=${RESULTS:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

gpu_name() {
    if [ -n "${QUICK_ON_CPU:-}" ]; then echo cpu; return 0; fi  # the quick stage's smoke test on a CPU (tests/test_gpu_suite.py)
    $PY -c "import sys, torch; torch.cuda.is_available() or sys.exit('gpu_suite.sh: no CUDA device here'); print(torch.cuda.get_device_name().replace(' ', '-'))"
}

# quick: one run of at most 7 minutes on an H100 or H200 that proves the GPU path and measures the
# headline figures, each step capped (seconds) so that one rerun fits in a 15-minute loan. It
# writes its stage JSON to $OUT/quick/ and $OUT/summary-<device>.json with "partial": true, and
# prints the short table last. QUICK_ON_CPU=1 runs the same steps on the smoke sweeps (CPU).
quick() {
    local dev=$1 q="$OUT/quick" sweep=${QUICK_SWEEP:-quick} status=0
    mkdir -p "$q"
    local tests=${QUICK_TESTS:-"tests/test_rmsnorm.py tests/test_cross_entropy.py tests/test_kernels_backend.py tests/test_attention.py tests/test_paged_attention.py tests/test_sampler.py"}
    # Each step is capped in seconds for a GPU; a CPU (Triton's interpreter, torch.compile's first C++ build)
    # gets QUICK_CAP_SCALE times as long. A step that fails or hits its cap is named with its exit code.
    local scale=${QUICK_CAP_SCALE:-$([ -n "${QUICK_ON_CPU:-}" ] && echo 4 || echo 1)}
    step() {  # step NAME CAP LOG COMMAND...
        local name=$1 cap=$(($2 * scale)) log=$3 rc
        shift 3
        timeout "$cap" "$@" >"$log" 2>&1
        rc=$?
        case $rc in
        0) ;;
        124) echo "quick: $name: FAILED: stopped at its cap of $cap s (log: $log)"; status=1 ;;
        *) echo "quick: $name: FAILED: exit $rc (log: $log)"; status=1 ;;
        esac
    }
    # 1. The CUDA runs of the kernel, attention, paged-attention and sampler tests.
    step tests 120 "$q/tests-$dev.log" $PY -m pytest -q -p no:cacheprovider --maxfail=5 $tests
    echo "quick: tests: $(tail -n 1 "$q/tests-$dev.log")"
    # 2-5. Each benchmark measures the device's copy bandwidth and bf16 matmul rate first.
    step rmsnorm 45 "$q/rmsnorm-$dev.log" $PY -m benchmarks.bench_rmsnorm --sweep $sweep --providers ours,compile,liger --rep-ms 50 \
        --out "$q/rmsnorm-full-$dev.json"
    step cross_entropy 70 "$q/cross_entropy-$dev.log" $PY -m benchmarks.bench_cross_entropy --sweep $sweep --modes fwd+bwd \
        --providers ours,eager,liger,liger-fp32 --rep-ms 50 --out "$q/cross_entropy-$dev.json"
    step train_step 100 "$q/train_step-$dev.log" $PY -m benchmarks.bench_train_step --sweep $sweep --compile off \
        --configs "${QUICK_TRAIN_CONFIGS:-}" --out "$q/train_step-$dev.json"
    step sampler 120 "$q/sampler-$dev.log" $PY -m benchmarks.bench_sampler --sweep $sweep --out "$q/sampler-$dev.json"
    for f in rmsnorm cross_entropy train_step sampler; do
        [ -s "$q/$f-$dev.log" ] && echo "quick: $f: $(grep -v '^\s*$' "$q/$f-$dev.log" | tail -n 1 | cut -c1-200)"
    done
    # 6. The short table, last.
    $PY -m benchmarks.summary --dir "$q" --device "$dev" --partial --out "$OUT/summary-$dev.json" || status=1
    return $status
}

run_stage() {
    local stage=$1 dev status=0
    if [ "$stage" = summary ]; then
        dev=${DEVICE:-$(gpu_name)} || { echo "summary: set DEVICE=<device name as in the result files>" >&2; return 1; }
        $PY -m benchmarks.summary --dir "$RESULTS" --device "$dev" || return 1
        $PY -m benchmarks.project --results "$RESULTS/summary-$dev.json" | tee "$RESULTS/projection-$dev.txt"
        [ "$OUT" -ef "$RESULTS" ] || cp "$RESULTS/summary-$dev.json" "$RESULTS/projection-$dev.txt" "$OUT"/  # so a device call returns them
        return 0  # the projection says itself what it lacks; a partial summary is still a summary
    fi
    dev=$(gpu_name) || return 1
    case $stage in
    quick)
        quick "$dev" || status=1
        ;;
    compare)
        local found=0
        for pair in "bench_rmsnorm full rmsnorm-full" "bench_cross_entropy full cross_entropy"; do
            set -- $pair
            local base="$RESULTS/$3-$dev.json"
            [ -f "$base" ] || continue
            found=1
            $PY -m benchmarks.$1 --sweep $2 --out "$OUT/compare-$3-$dev.json" 2>"$OUT/compare-$3-$dev.log" || status=1
            $PY -m benchmarks.compare "$OUT/compare-$3-$dev.json" "$base" || status=1
        done
        [ $found = 1 ] || echo "compare: no committed timings for $dev under $RESULTS: record them with the rmsnorm and ce stages"
        ;;
    tests)
        $PY -m pytest -q -p no:cacheprovider tests/test_rmsnorm.py tests/test_cross_entropy.py tests/test_kernels_backend.py \
            tests/test_attention.py tests/test_paged_attention.py tests/test_sampler.py \
            tests/test_model.py tests/test_bench_smoke.py tests/test_bench_train_step.py tests/test_bench_sampler.py \
            tests/test_bench_kernel_choice.py tests/test_bench_summary.py tests/test_project.py 2>&1 | tee "$OUT/tests-$dev.log" | tail -30 || status=1
        ;;
    rmsnorm)
        for sweep in full residual; do
            $PY -m benchmarks.bench_rmsnorm --sweep $sweep --out "$OUT/rmsnorm-$sweep-$dev.json" 2>"$OUT/rmsnorm-$sweep-$dev.log" || status=1
        done
        ;;
    ce)
        $PY -m benchmarks.bench_cross_entropy --sweep full --out "$OUT/cross_entropy-$dev.json" 2>"$OUT/cross_entropy-$dev.log" || status=1
        ;;
    train)
        $PY -m benchmarks.bench_train_step --sweep full --compile off --out "$OUT/train_step-$dev.json" 2>"$OUT/train_step-$dev.log" || status=1
        ;;
    train-compile)
        $PY -m benchmarks.bench_train_step --sweep full --compile on --out "$OUT/train_step-compile-$dev.json" \
            2>"$OUT/train_step-compile-$dev.log" || status=1
        ;;
    sampler)
        $PY -m benchmarks.bench_sampler --sweep full --out "$OUT/sampler-$dev.json" 2>"$OUT/sampler-$dev.log" || status=1
        ;;
    esac
    return $status
}

if [ "$stage" = all ]; then
    status=0
    for s in tests rmsnorm ce train train-compile sampler; do
        run_stage $s || status=1
    done
    [ "$OUT" = "$RESULTS" ] || cp "$OUT"/*.json "$RESULTS"/
    run_stage summary || status=1
    exit $status
fi
run_stage "$stage"
