#!/usr/bin/env bash
# Every GPU check and figure of the README in one run, most important first, for a
# GPU lent for a few minutes: each command has its own time limit and the whole suite
# a budget (SUITE_SECONDS, default 540: one device call of at most 600 s), so a
# cut-short run still leaves the first figures and its summary, and every command's
# output lands in LOGDIR.
#
#   bash experiments/benchmarks/gpu_suite.sh LOGDIR [extra gpu.py flags]
#   SUITE_SECONDS=300 bash experiments/benchmarks/gpu_suite.sh LOGDIR   # a shorter lease
#   bash experiments/benchmarks/gpu_suite.sh /tmp/gpu --preset=tiny --steps=1  # CPU smoke
#
# On one H200 each gpu.py command takes 1-2 minutes, most of it compiling.
# LOGDIR/summary.txt gathers the lines that carry figures (tokens/s, MFU, ratios, time
# by kind of op, test results) and says which commands the budget left out;
# LOGDIR/NN_name.txt holds each command's whole output. The tests force JAX_PLATFORMS=cuda: the suite's conftest
# defaults to the CPU, which would run the GPU tests there and pass vacuously.
set -u
LOGDIR=${1:?usage: gpu_suite.sh LOGDIR [extra gpu.py flags]}
shift
mkdir -p "$LOGDIR"
LOGDIR=$(cd "$LOGDIR" && pwd)  # The runs below start from the repository root.
: >"$LOGDIR/summary.txt"  # A rerun's summary is its own.
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then  # The checkout's environment if it has one (make setup).
  PYTHON=python3
  [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
PY=$PYTHON
BUDGET=${SUITE_SECONDS:-540}
START=$SECONDS
n=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a limit, log it, summarise it.
  local name=$1 limit=$2
  shift 2
  n=$((n + 1))
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 30 ]; then  # Not worth starting: it would be cut while compiling.
    echo "== $name: left out (suite budget of ${BUDGET} s spent)" | tee -a "$LOGDIR/summary.txt"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local log
  log=$(printf '%s/%02d_%s.txt' "$LOGDIR" "$n" "$name")
  echo "== $name: $*" | tee -a "$LOGDIR/summary.txt"
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  grep -E 'attention:|tokens/s|dense step|passed|failed|skipped|Error|XLA ops per step|^ +(matmul|attention|elementwise/reduce|copy/move|collective|control|custom-call) ' \
      "$log" | tail -n 30 >>"$LOGDIR/summary.txt"
  echo "   (exit $rc$([ $rc = 124 ] && echo ", cut at ${limit} s"))" | tee -a "$LOGDIR/summary.txt"
}

GPU=experiments/benchmarks/gpu.py
# One process for both: gpu.py prints the MoE step's cost in dense steps, then where
# each step's time goes (XLA ops by kind, from a trace of two more steps).
step dense_and_gshard 200 "$PY" $GPU --models=dense,gshard --profile_dir="$LOGDIR/profile" "$@"
# The open target (MFU >= 50%): larger batches, the attention scores recomputed.
step dense_batch16_remat 150 "$PY" $GPU --models=dense --batch=16 \
    --remat_policy=dots_with_no_batch_dims_saveable "$@"
# The other (MoE <= 1.3x dense): tokens to experts by gather/scatter-add.
step gshard_gather 120 "$PY" $GPU --models=gshard --capacity_dispatch=gather "$@"
# cuBLAS for every matmul instead of XLA's Triton GEMMs (JAX-Toolbox's images set this).
step dense_cublas 120 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
    "$PY" $GPU --models=dense "$@"
step dense_batch8_remat 120 "$PY" $GPU --models=dense --batch=8 \
    --remat_policy=dots_with_no_batch_dims_saveable "$@"
step gpu_tests 150 env JAX_PLATFORMS=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_fused_attention.py tests/test_hopper_ragged_dot.py
step dense_unrolled 150 "$PY" $GPU --models=dense --unrolled "$@"
step dense_own_attention 90 "$PY" $GPU --models=dense --attention_impl=xla "$@"
cat "$LOGDIR/summary.txt"
