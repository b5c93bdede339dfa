#!/usr/bin/env bash
# Everything GPU-side in one call of at most 10 minutes: the GPU tests, a profile of one decode step,
# then `bench latency`, `bench throughput` (transformers on a subset of the requests: it is slow) and
# `bench prefix`, all on Llama-3-8B-shaped random bf16 weights. Prints everything; JSON and the log go to $OUT when set.
#
#   bash tests/gpu/run_all.sh             # from the repository root
#   PEER_REQUESTS=64 bash tests/gpu/run_all.sh
#   PROFILE=0 PREFIX=0 bash tests/gpu/run_all.sh   # skip the one-step profile, the prefix bench
#
# Each stage has its own time limit, so one stuck stage cannot eat the others' time. The benchmarks run
# as `python -m tokenq.bench.NAME`, which needs only torch, transformers, numpy, tokenizers and pydantic
# (the tokenq CLI also imports the gateway's packages). Wheels in .whl/ (`make wheelhouse`) are
# installed into /tmp/site first when pydantic is missing.
set -u
cd "$(dirname "$0")/../.."
PEER_REQUESTS="${PEER_REQUESTS:-128}"
SHAPE="${SHAPE:-llama3-8b}"  # SHAPE=tiny: a CPU dry run of this script
LOG_NAME=run_all.log
source tests/gpu/stages.sh
use_wheelhouse pydantic
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee -a "$LOG"

# The runner's tests first, so that a slow kernel suite cannot crowd them out of the stage's time.
TESTS="tests/gpu/test_runner_gpu.py $(ls tests/gpu/test_*.py | grep -v test_runner_gpu.py | tr '\n' ' ')"
stage "gpu tests" 150 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/gpu-tests.xml" $TESTS
[ "${PROFILE:-1}" = 1 ] && stage "profile step" 90 "$PY" tests/gpu/profile_step.py --model-shape "$SHAPE"
stage "bench latency" 80 "$PY" -m tokenq.bench.latency --model-shape "$SHAPE" --out "$OUT/bench-latency.json"
stage "bench throughput" 220 "$PY" -m tokenq.bench.throughput --model-shape "$SHAPE" --peer-num-requests "$PEER_REQUESTS" \
  --out "$OUT/bench-throughput.json"
[ "${PREFIX:-1}" = 1 ] && stage "bench prefix" 120 "$PY" -m tokenq.bench.prefix --model-shape "$SHAPE" --out "$OUT/bench-prefix.json"
echo "done in ${SECONDS}s; files in $OUT:" | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
