#!/usr/bin/env bash
# One-call GPU check for a session that is lent an H100/H200 (device time is scarce: about
# 15 minutes in all, so everything is prepared here and run once).
#
#     bash python/gpu_check.sh [OUT_DIR] [tests|bench|all]
#
# OUT_DIR defaults to benchmarks/results/gpu-check; the second argument picks the part (the
# device tool allows 10 minutes a call: run "tests" and "bench" as two calls, tests first).
#
# 1. versions; editable install without network (builds the CUDA extension);
# 2. the Triton and integration tests compiled on the GPU (one tile config per kernel
#    variant, MDM_TRITON_AUTOTUNE=0, see tests/conftest.py), six pytest processes at once;
# 3. python/check_cuda.sh: CUDA backend tests + compute-sanitizer memcheck / racecheck;
# 4. the paper-scale benchmark rows (quick grid, no torch.compile rows) with a time cap.
# Each step has its own timeout so that a slow one cannot eat the whole budget; the log and
# the benchmark results land in OUT_DIR.  Exit status: non-zero if any test step failed.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/results/gpu-check}"
PART="${2:-all}"
case "$PART" in tests|bench|all) ;; *) echo "part must be tests, bench or all, got '$PART'"; exit 2;; esac
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check-$(date +%Y%m%d-%H%M%S).log"
PY="${PYTHON:-python}"
STATUS=0
exec > >(tee "$LOG") 2>&1

run_step() {  # run_step NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  echo; echo "=== $name (limit ${limit}s)"; echo "\$ $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "--- $name: rc=$rc ($((SECONDS - t0)) s)"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
git rev-parse --short HEAD 2>/dev/null || true

export MDM_BUILD_CUDA=1
run_step "install" 240 "$PY" -m pip install -q --no-deps --no-build-isolation -e . || STATUS=1
if [ "$PART" != bench ]; then
  # Triton compiles each kernel variant on the CPU (1-15 s each, ~150 variants): six pytest
  # processes in parallel (the machine has 16 cores), disjoint test subsets, one log each
  echo; echo "=== triton + integration tests (compiled, 6 processes, limit 330s)"
  t0=$SECONDS
  big="(estimator_and_negatives or activations)"
  parts=("tests/test_triton_bounds.py -k 'single and $big'"
         "tests/test_triton_bounds.py -k 'single and not $big'"
         "tests/test_triton_bounds.py -k 'not single and $big'"
         "tests/test_triton_bounds.py -k 'not single and not $big'"
         "tests/test_triton_gradient_penalty.py tests/test_triton_launch.py"
         "tests/test_backend_integration.py tests/test_distinct_negatives.py tests/test_triton_custom_ops.py")
  pids=()
  for i in "${!parts[@]}"; do
    eval "timeout 330 \"\$PY\" -m pytest -q -rs ${parts[$i]}" > "$OUT_DIR/pytest-$((i + 1)).log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; rc=$?
    echo "--- pytest part $((i + 1)) (${parts[$i]}): rc=$rc"
    tail -n 3 "$OUT_DIR/pytest-$((i + 1)).log"
    [ $rc -eq 0 ] || STATUS=1
  done
  echo "--- triton + integration tests: $((SECONDS - t0)) s"
  run_step "CUDA backend check" 200 bash python/check_cuda.sh || STATUS=1
  cp benchmarks/results/cuda-check-*.txt "$OUT_DIR/" 2>/dev/null || true
fi
if [ "$PART" != tests ]; then
  # headline rows first (MINE, every backend but the peer library); widen the filter when
  # time allows: the runner writes its files only when pytest has finished
  run_step "benchmarks (quick grid, MINE rows)" 500 "$PY" -m mdm_kernels.bench --quick \
      --out "$OUT_DIR" --filter "mine and not mist" || true
fi

echo; echo "=== overall tests: $([ $STATUS -eq 0 ] && echo PASS || echo FAIL) (log: $LOG)"
exit $STATUS
