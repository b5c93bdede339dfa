#!/usr/bin/env bash
# FP8 on one H200 in one call of about nine minutes at most (each stage under its own limit): the FP8 GPU tests (each kernel against its
# reference, bf16 vs FP8 logits on a random model), then `bench throughput` and `bench latency` on the
# Llama-3-8B shape in bf16 and with `--quantization fp8 --kv-cache-dtype fp8`, then the Llama-3-70B shape in
# FP8 on the one GPU (its random weights are made in FP8 directly). No transformers peer: the bf16 run is
# the reference. The machine has no registry: wheels in .whl/ (`make wheelhouse`) install into /tmp/site
# when pydantic is missing. JSON and the log go to $OUT.
#
#   bash tests/gpu/run_fp8.sh                                   # on the GPU machine
#   SHAPE=tiny BIG=tiny N=8 OUTPUT_LEN=8 bash tests/gpu/run_fp8.sh   # a CPU dry run of the benches
#   TESTS=0 BIG_RUNS=0 bash tests/gpu/run_fp8.sh                # the 8B comparison only
set -u
cd "$(dirname "$0")/../.."
SHAPE="${SHAPE:-llama3-8b}"
BIG="${BIG:-llama3-70b}"
N="${N:-512}"
OUTPUT_LEN="${OUTPUT_LEN:-256}"
LOG_NAME=run_fp8.log
source tests/gpu/stages.sh
use_wheelhouse pydantic
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee -a "$LOG"

FP8=(--quantization fp8 --kv-cache-dtype fp8)
LOAD=(--num-requests "$N" --min-prompt-len 64 --max-prompt-len 512 --output-len "$OUTPUT_LEN" --skip-peer)
LAT=(--prompt-len 128 --output-len "$OUTPUT_LEN" --skip-peer)

[ "${TESTS:-1}" = 1 ] && stage "gpu tests" 110 "$PY" -m pytest -q -p no:cacheprovider -rs \
  --junitxml="$OUT/gpu-tests-fp8.xml" tests/gpu/test_fp8_gpu.py
stage "throughput $SHAPE bf16" 65 "$PY" -m tokenq.bench.throughput --model-shape "$SHAPE" "${LOAD[@]}" \
  --out "$OUT/bench-throughput-$SHAPE-bf16.json"
stage "throughput $SHAPE fp8" 65 "$PY" -m tokenq.bench.throughput --model-shape "$SHAPE" "${LOAD[@]}" "${FP8[@]}" \
  --out "$OUT/bench-throughput-$SHAPE-fp8.json"
stage "latency $SHAPE bf16" 40 "$PY" -m tokenq.bench.latency --model-shape "$SHAPE" "${LAT[@]}" \
  --out "$OUT/bench-latency-$SHAPE-bf16.json"
stage "latency $SHAPE fp8" 40 "$PY" -m tokenq.bench.latency --model-shape "$SHAPE" "${LAT[@]}" "${FP8[@]}" \
  --out "$OUT/bench-latency-$SHAPE-fp8.json"
# The FP8 GEMV at batch 1 against torch._scaled_mm there (LATENCY_AB=0 skips it).
[ "${LATENCY_AB:-1}" = 1 ] && stage "latency $SHAPE fp8, no GEMV" 35 "$PY" -m tokenq.bench.latency --model-shape "$SHAPE" \
  "${LAT[@]}" "${FP8[@]}" --gemv cublas --out "$OUT/bench-latency-$SHAPE-fp8-scaled-mm.json"
if [ "${BIG_RUNS:-1}" = 1 ]; then
  stage "throughput $BIG fp8" 130 "$PY" -m tokenq.bench.throughput --model-shape "$BIG" "${LOAD[@]}" "${FP8[@]}" \
    --out "$OUT/bench-throughput-$BIG-fp8.json"
  stage "latency $BIG fp8" 75 "$PY" -m tokenq.bench.latency --model-shape "$BIG" "${LAT[@]}" "${FP8[@]}" \
    --repeats 2 --out "$OUT/bench-latency-$BIG-fp8.json"
fi
# One line per JSON: the figures the issue's targets name.
"$PY" - "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("bench-*.json")):
    r = json.loads(f.read_text())
    ours = r.get("ours", {})
    extra = {k: r[k] for k in ("kv_cache_tokens",) if k in r}
    if "floor" in r:
        extra["tpot_over_weight_read"] = round(r["floor"]["tpot_over_weight_read"], 3)
    print(f.name, {k: round(v, 2) for k, v in ours.items() if k in ("output_tokens_per_s", "tpot_ms", "ttft_ms")
                   and isinstance(v, float)}, extra)
PY
echo "done in ${SECONDS}s" | tee -a "$LOG"
