#!/usr/bin/env bash
# The decode matmuls, cuBLAS against our Triton GEMV, in one call: the GEMV's GPU tests, the per-shape
# sweep (tests/gpu/bench_gemv.py), `bench latency` with each, and a profile of one decode step.
#
#   OUT=/tmp/x bash tests/gpu/run_gemv.sh   # TESTS=... adds GPU tests; SWEEP=0 skips the sweep; PEER=1
#                                            # runs transformers in the first latency run
set -u
cd "$(dirname "$0")/../.."
SHAPE="${SHAPE:-llama3-8b}"
LOG_NAME=run_gemv.log
source tests/gpu/stages.sh
use_wheelhouse pydantic
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv 2>&1 | tee -a "$LOG"
stage "gemv tests" 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/gpu/test_kernels_triton.py -k gemv
[ -n "${TESTS:-}" ] && stage "gpu tests" 150 "$PY" -m pytest -q -p no:cacheprovider -rs $TESTS
[ "${SWEEP:-1}" = 1 ] && stage "gemv sweep" 240 "$PY" tests/gpu/bench_gemv.py ${SWEEP_ARGS:-} --out "$OUT/bench-gemv.json"
for g in triton cublas; do  # PEER=1: transformers too, in the first (default) run
  peer=--skip-peer
  [ "${PEER:-0}" = 1 ] && [ $g = triton ] && peer=
  stage "bench latency, $g" 100 "$PY" -m tokenq.bench.latency --model-shape "$SHAPE" $peer --gemv $g \
    --out "$OUT/bench-latency-$g.json"
done
[ "${PROFILE:-1}" = 1 ] && stage "profile step" 90 "$PY" tests/gpu/profile_step.py --model-shape "$SHAPE"
echo "done in ${SECONDS}s" | tee -a "$LOG"
