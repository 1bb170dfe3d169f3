#!/usr/bin/env bash
# Check the CUDA kernels' logic on a machine without a GPU: translate csrc/cuda/*.cu to C++ over
# cuda_on_cpu.h, then run (1) the self-test's small cases, (2) the same under ThreadSanitizer
# (shared-memory races), (3) the public API over the emulated ops against lightkv_ext.reference.
# Needs g++ >= 11 and the CUDA headers (no GPU, no nvcc run). On 2 cores the self-test takes
# about 1.5 hours and ThreadSanitizer many times that: ONLY=TEXT runs both on the self-test cases
# whose name contains TEXT (e.g. ONLY="deep column items").
#   [ONLY=TEXT] bash csrc/cuda/emulation/run.sh [BUILD_DIR]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
BUILD="${1:-$ROOT/build/emulation}"
CUDA_INCLUDE="${CUDA_HOME:-/usr/local/cuda}/include"
mkdir -p "$BUILD"
for source in score merge; do
  python3 "$HERE/to_cpp.py" "$ROOT/csrc/cuda/$source.cu" "$BUILD/$source.cpp"
done
# The translated sources find this translated header next to them, before csrc/cuda's.
python3 "$HERE/to_cpp.py" "$ROOT/csrc/cuda/common.cuh" "$BUILD/common.cuh"
python3 "$HERE/to_cpp.py" "$ROOT/csrc/cuda/selftest/selftest.cu" "$BUILD/selftest.cpp"
FLAGS=(-std=c++20 -O1 -g -pthread -ffp-contract=off -w -I"$HERE" -I"$ROOT/csrc/cuda" -I"$CUDA_INCLUDE")
KERNELS=("$BUILD/score.cpp" "$BUILD/merge.cpp" "$HERE/runtime_on_cpu.cpp")
CASES=(--small ${ONLY:+--only "$ONLY"})

echo "== self-test (small cases) on the CPU emulator"
g++ "${FLAGS[@]}" "${KERNELS[@]}" "$BUILD/selftest.cpp" -o "$BUILD/selftest"
"$BUILD/selftest" "${CASES[@]}"

echo "== self-test under ThreadSanitizer"
g++ "${FLAGS[@]}" -fsanitize=thread "${KERNELS[@]}" "$BUILD/selftest.cpp" -o "$BUILD/selftest_tsan"
TSAN_OPTIONS="halt_on_error=1" "$BUILD/selftest_tsan" "${CASES[@]}"

echo "== public API over the emulated ops vs lightkv_ext.reference"
g++ "${FLAGS[@]}" -fPIC -shared "${KERNELS[@]}" "$HERE/capi.cpp" -o "$BUILD/libemulated.so"
cd "$ROOT" && LIGHTKV_EMULATED_LIB="$BUILD/libemulated.so" python3 "$HERE/check_reference.py"
