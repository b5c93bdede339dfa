#!/usr/bin/env bash
# Guided decoding on the GPU in one call: the GPU test, then `bench throughput` on the Llama-3-8B shape with
# none, a tenth and all of the 512 requests under a JSON schema (each guided run also runs its requests
# unconstrained at the same lengths: the `guided.output_tokens_per_s_ratio` in its JSON).
#
#   bash tests/gpu/run_guided.sh          # from the repository root; SHAPE=tiny for a CPU dry run
set -u
cd "$(dirname "$0")/../.."
SHAPE="${SHAPE:-llama3-8b}"
LOG_NAME=run_guided.log
source tests/gpu/stages.sh
use_wheelhouse "pydantic, xgrammar, jsonschema"
stage "guided gpu test" 90 "$PY" -m pytest -q -p no:cacheprovider -rs tests/gpu/test_guided_gpu.py
for f in 0 0.1 1; do
  stage "bench throughput guided $f" 160 "$PY" -m tokenq.bench.throughput --model-shape "$SHAPE" --skip-peer \
    --guided-fraction "$f" --out "$OUT/bench-throughput-guided-$f.json"
done
echo "done in ${SECONDS}s; files in $OUT:" | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
