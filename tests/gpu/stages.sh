# Sourced by the GPU scripts (run_all.sh, run_serve.sh) from the repository root, with LOG_NAME set:
# $OUT, $PY and $LOG, the wheelhouse on the path when the machine lacks the service packages, and
# `stage`, which runs one step under its own time limit so that one stuck step cannot eat the others'.
OUT="${OUT:-/tmp/tokenq-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LOG="$OUT/$LOG_NAME"
: >"$LOG"

use_wheelhouse() {  # use_wheelhouse "module, module": install .whl/ into /tmp/site if an import fails
  if ! "$PY" -c "import $1" 2>/dev/null && [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
}

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  if command -v nvidia-smi >/dev/null; then  # what a killed stage left behind would skew the next one's figures
    echo "=== after $name: GPU memory used $(nvidia-smi --query-gpu=memory.used --format=csv,noheader | paste -sd,)," \
      "python processes left $(pgrep -c python || true)" | tee -a "$LOG"
  fi
}
