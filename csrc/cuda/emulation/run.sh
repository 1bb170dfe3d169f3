#!/usr/bin/env bash
# Check the CUDA kernels' logic on a machine without a GPU: translate csrc/cuda/*.cu to C++ over
# cuda_on_cpu.h, then run (1) the self-test's small cases under AddressSanitizer and
# UndefinedBehaviorSanitizer (compute-sanitizer memcheck's counterpart: out-of-bounds global,
# shared and local accesses, misaligned vector loads, integer overflow), (2) the same under
# ThreadSanitizer (racecheck's shared-memory races, and races between a grid's blocks, which the
# emulator runs at once), (3) the public API over the emulated ops
# against lightkv_ext.reference: the fixed shape matrix, then random cases (random_cases.py) for
# RANDOM_SECONDS (default 600). Needs g++ >= 11 and the CUDA headers (no GPU, no nvcc run). On 2
# cores (1) takes about 6 minutes and (2) about 70 minutes: ONLY=TEXT runs both on the self-test
# cases whose name contains TEXT (e.g. ONLY="deep column items").
#   [ONLY=TEXT] [RANDOM_SECONDS=S] bash csrc/cuda/emulation/run.sh [BUILD_DIR]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
BUILD="${1:-$ROOT/build/emulation}"
CASES=(--small ${ONLY:+--only "$ONLY"})

echo "== self-test (small cases) on the CPU emulator, under AddressSanitizer and UndefinedBehaviorSanitizer"
SELFTEST="$(python3 "$HERE/build.py" "$BUILD" selftest --sanitize address,undefined)"
"$SELFTEST" "${CASES[@]}"

echo "== self-test under ThreadSanitizer"
SELFTEST="$(python3 "$HERE/build.py" "$BUILD" selftest --sanitize thread)"
"$SELFTEST" "${CASES[@]}"

echo "== public API over the emulated ops vs lightkv_ext.reference"
LIBRARY="$(python3 "$HERE/build.py" "$BUILD" library)"
cd "$ROOT" && LIGHTKV_EMULATED_LIB="$LIBRARY" python3 "$HERE/check_reference.py"
echo "== random cases through the public API over the emulated ops vs lightkv_ext.reference"
LIGHTKV_EMULATED_LIB="$LIBRARY" python3 "$HERE/random_cases.py" --seconds "${RANDOM_SECONDS:-600}"
