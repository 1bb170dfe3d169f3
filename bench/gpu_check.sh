#!/usr/bin/env bash
# One-shot GPU check: build, self-test, tests, sanitizers, benchmark. The step limits add up to
# 570 s, so the whole script fits one 600 s device call even when steps hang.
# Run from the repository root:  OUT=/some/dir bash bench/gpu_check.sh
# Every step logs to $OUT/<step>.log; a failing step does not stop the later ones; the summary
# at the end lists each step's result and the script exits non-zero if any step failed.
set -uo pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
PYTHON="${PYTHON:-python3}"
SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
declare -a SUMMARY=()
FAILED=0

# step NAME TIMEOUT_S COMMAND...: runs COMMAND under `set -euo pipefail` with a time limit.
step() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  echo "=== $name" | tee "$OUT/$name.log"
  if timeout --kill-after=10 "$limit" bash -c "set -euo pipefail; $*" >>"$OUT/$name.log" 2>&1; then
    SUMMARY+=("PASS  $name ($((SECONDS - start)) s)")
  else
    local rc=$?
    SUMMARY+=("FAIL  $name (rc $rc, $((SECONDS - start)) s, see $name.log)")
    FAILED=1
  fi
  tail -n 5 "$OUT/$name.log"
}

step env 15 "nvidia-smi; $PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; nvcc --version | tail -1"
step build_extension 180 "$PYTHON -m pip install --no-build-isolation -e . -v 2>&1 | tail -n 60"
step cmake_selftest 90 "cmake -S . -B build-gpu -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build-gpu && ./build-gpu/lightkv_cuda_selftest"
step pytest_cuda 120 "$PYTHON -m pytest -q --maxfail=5 -p no:cacheprovider python_tests/test_cuda.py"
# Sanitizers on the self-test's small cases (every kernel, every dtype, tails and empty windows).
step memcheck 45 "'$SANITIZER' --tool memcheck --leak-check full --error-exitcode 1 ./build-gpu/lightkv_cuda_selftest --small"
step racecheck 45 "'$SANITIZER' --tool racecheck --error-exitcode 1 ./build-gpu/lightkv_cuda_selftest --small"
step bench 75 "$PYTHON bench/bench_kernels.py --quick --json '$OUT/bench_gpu.json' --plot '$OUT/bench_gpu.png'"

echo "=== summary" | tee "$OUT/summary.txt"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$OUT/summary.txt"
exit "$FAILED"
