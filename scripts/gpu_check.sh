#!/usr/bin/env bash
# Everything the GPU kernels must prove, in one command on a CUDA machine:
#   1. build ptqtp with its CUDA extension (pip install --no-build-isolation --no-deps --no-index -e .),
#   2. the CUDA and compiled-Triton tests (tests/test_kernels_cuda.py, test_kernels_triton.py, test_ops.py),
#   3. the kernel table: scripts/bench_kernels.py --device cuda (M = 1 / 8 / 16 / 2048 on 4096x4096 and
#      28672x8192 against cuBLAS fp16 and bf16, CUDA-graph replays, plus the split-K sweep),
#   4. decode tokens/s of a Llama-3.1-8B-shaped random model against dense bf16: scripts/gpu_decode.py with
#      CUDA graphs (batch 1 and 16), then torch.compile(mode="reduce-overhead") at batch 1.
# Their tables go to one markdown file, OUT_DIR/<UTC date>_<time>.md (all output also to a .log beside it).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to eval/gpu; PYTHON=... picks the interpreter
#
# Without a CUDA device it says so and exits 0 at once. Every step has a hard time limit; together they stay
# under 8 minutes (a few on a warm machine). A step that fails or times out is recorded and the next one runs;
# the exit status is the tests'.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-eval/gpu}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device on this machine (or no torch for $PY): nothing to check."
  exit 0
fi

mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y-%m-%d_%H%M)
MD="$OUT_DIR/$STAMP.md"
LOG="$OUT_DIR/$STAMP.log"
export PYTHONUNBUFFERED=1
START=$SECONDS
TEST_STATUS=0
TABLE=0  # 1: keep a step's table lines (| and #) in the markdown file, and only the tail of the rest

note() { printf '%s\n' "$*" >>"$MD"; }

# step NAME LIMIT_S COMMAND...: runs under `timeout`, appends its output to the log and (tables kept, logs
# fenced) to the markdown file
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS out rc
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  out=$(timeout --kill-after=10 "$limit" "$@" 2>&1)
  rc=$?
  printf '%s\n' "$out" >>"$LOG"
  note ""
  note "## $name"
  note ""
  note "\`$*\` — exit $rc, $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ", stopped at its ${limit} s limit")"
  note ""
  if [ "${TABLE:-0}" = 1 ]; then
    printf '%s\n' "$out" | grep -E '^(#|\||$)' | sed -E 's/^# (.*)$/\1\n/' >>"$MD"
    printf '%s\n' "$out" | grep -vE '^(#|\||$)' | tail -n 15 | sed 's/^/    /' >>"$MD"
  else
    printf '%s\n' "$out" | tail -n 40 | sed 's/^/    /' >>"$MD"
  fi
  echo "   exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  return $rc
}

note "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
note ""
note "Produced by \`scripts/gpu_check.sh\`; commit $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git)')."
note ""
note "    $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem \
  --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"
note "    $("$PY" -c 'import torch, platform; print("torch", torch.__version__, "CUDA", torch.version.cuda, "python", platform.python_version())' 2>&1)"
note "    triton $("$PY" -c 'import importlib.metadata as m; print(m.version("triton"))' 2>&1 | tail -n 1); $(nvcc --version 2>/dev/null | tail -n 1)"

# 1. build (skipped when this checkout's CUDA extension already imports)
if "$PY" -c 'import ptqtp._C_cuda, ptqtp.triton_kernels' >/dev/null 2>&1; then
  note ""; note "## build"; note ""; note "ptqtp and its CUDA extension already import: not rebuilt."
else
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  MAX_JOBS=$(nproc)
  export TORCH_CUDA_ARCH_LIST MAX_JOBS
  step "build (compute capability $TORCH_CUDA_ARCH_LIST)" 150 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e .
fi
step "backends" 60 "$PY" -c 'from ptqtp import backends; [print(n, *v) for n, v in backends.available().items()]'

# 2. tests: CUDA, compiled Triton, and the op's table with every backend this machine runs
XDIST=$("$PY" -c 'import xdist' >/dev/null 2>&1 && echo "-n 8" || echo "")
step "tests" 130 "$PY" -m pytest -q -p no:cacheprovider $XDIST -rfE \
  tests/test_kernels_cuda.py tests/test_kernels_triton.py tests/test_ops.py
TEST_STATUS=$?

# 3. kernel table
TABLE=1
step "kernels" 100 "$PY" scripts/bench_kernels.py --device cuda --shapes 4096x4096 28672x8192 \
  --m 1 8 16 2048 --min-time 0.15 --sweep

# 4. decode: CUDA graphs, then torch.compile (whatever time is left)
step "decode, CUDA graphs" 60 "$PY" scripts/gpu_decode.py --batches 1 16 --steps 128
LEFT=$((470 - (SECONDS - START)))
if [ $LEFT -ge 40 ]; then
  step "decode, torch.compile" "$LEFT" "$PY" scripts/gpu_decode.py --batches 1 --steps 128 --only-compile
else
  note ""; note "## decode, torch.compile"; note ""; note "skipped: ${LEFT} s left of the 8-minute budget."
fi

note ""
note "Total $((SECONDS - START)) s."
echo "gpu_check: wrote $MD (full output in $LOG); tests exit $TEST_STATUS"
exit $TEST_STATUS
