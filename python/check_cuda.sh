#!/usr/bin/env bash
# GPU-machine check of the CUDA C++ backend (issue 8).  Run from anywhere, on a machine with
# a CUDA GPU, nvcc, torch (CUDA build), pybind11 and pytest (no network needed):
#     bash python/check_cuda.sh
# Steps: build the extension in place (editable install + build_ext --inplace), run the CUDA
# build and backend tests, run compute-sanitizer memcheck and racecheck on a small driver.
# Writes everything to benchmarks/results/cuda-check-<date>.txt; exits non-zero if any step
# failed.
set -u
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
OUT="benchmarks/results/cuda-check-$(date +%Y%m%d-%H%M%S).txt"
PY="${PYTHON:-python3}"
STATUS=0
exec > >(tee "$OUT") 2>&1

step() {  # step NAME CMD...: run, record rc, remember failure
  echo
  echo "=== $1"
  shift
  echo "\$ $*"
  local t0=$SECONDS
  "$@"
  local rc=$?
  echo "--- rc=$rc ($((SECONDS - t0)) s)"
  [ $rc -eq 0 ] || STATUS=1
  return $rc
}

echo "=== versions ($(date -Is))"
echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
NVCC="$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")"
"$NVCC" --version 2>&1 | tail -2
"$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')"
"$PY" -c "import pybind11; print('pybind11', pybind11.__version__)" 2>&1

export MDM_BUILD_CUDA=1
step "editable install (builds mdm_kernels._cuda)" \
  "$PY" -m pip install --no-deps --no-build-isolation -e .
step "build_ext --inplace" "$PY" setup.py build_ext --inplace
"$PY" -c "import mdm_kernels._cuda as c; print('extension archs:', c.compiled_archs())"

step "tests: build + CUDA backend" "$PY" -m pytest -q -rs tests/test_cuda_build.py tests/test_cuda_backend.py

SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
# no caching allocator: every torch allocation is its own block, so memcheck sees overruns
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
step "compute-sanitizer memcheck" \
  "$SAN" --tool memcheck --error-exitcode 1 --print-limit 50 "$PY" python/check_cuda_driver.py
step "compute-sanitizer racecheck" \
  "$SAN" --tool racecheck --racecheck-report all --error-exitcode 1 --print-limit 50 \
  "$PY" python/check_cuda_driver.py

echo
echo "=== overall: $([ $STATUS -eq 0 ] && echo PASS || echo FAIL) (log: $OUT)"
exit $STATUS
