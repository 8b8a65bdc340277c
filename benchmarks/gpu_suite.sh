#!/usr/bin/env bash
# The kernel checks and sweeps a lent GPU owes, in stages that each fit one 10-minute device call:
#
#   bash benchmarks/gpu_suite.sh tests      # kernel, backend and model tests on CUDA (~2 min)
#   bash benchmarks/gpu_suite.sh rmsnorm    # RMSNorm sweeps: full, then residual (~7 min)
#   bash benchmarks/gpu_suite.sh ce         # fused linear cross-entropy sweep (~5 min)
#
# JSON, logs and tables go to $OUT (the device tool's folder; default benchmarks/results); copy the
# JSON into benchmarks/results/ and commit it with the command that made it. Liger-Kernel is not
# on the GPU image: carry its wheel (pure Python) as .whl/ and this script installs it.
set -uo pipefail
stage=${1:?usage: gpu_suite.sh tests|rmsnorm|ce}
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
dev=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || exit 1
status=0
case $stage in
tests)
    $PY -m pytest -q -p no:cacheprovider tests/test_rmsnorm.py tests/test_cross_entropy.py tests/test_kernels_backend.py \
        tests/test_model.py tests/test_bench_smoke.py 2>&1 | tee "$OUT/tests-$dev.log" | tail -30 || status=1
    ;;
rmsnorm)
    for sweep in full residual; do
        $PY -m benchmarks.bench_rmsnorm --sweep $sweep --out "$OUT/rmsnorm-$sweep-$dev.json" 2>"$OUT/rmsnorm-$sweep-$dev.log" || status=1
    done
    ;;
ce)
    $PY -m benchmarks.bench_cross_entropy --sweep full --out "$OUT/cross_entropy-$dev.json" 2>"$OUT/cross_entropy-$dev.log" || status=1
    ;;
*)
    echo "unknown stage $stage (tests|rmsnorm|ce)" >&2
    exit 2
    ;;
esac
exit $status
