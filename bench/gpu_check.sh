#!/usr/bin/env bash
# One-shot GPU check: build, self-test, tests, sanitizers, benchmarks. Each step has its own time
# limit, cut to what is left of GPU_CHECK_BUDGET_S (default 570 s), so the whole script fits one
# 600 s device call even when steps hang; a step with no time left is reported as skipped.
# Run from the repository root:  OUT=/some/dir bash bench/gpu_check.sh
# GPU_CHECK_STEPS="env build_extension ..." runs only the named steps (default: all).
# GPU_CHECK_BASELINE=DIR adds an A/B on the same GPU: DIR is another source tree of lightkv_ext
# (e.g. `git archive REV --prefix=baseline/ | tar -x`, untracked); its extension builds in place
# beside this one, and its per-kernel times on the target cases go to kernel_breakdown.md.
# All steps log to $OUT/gpu_check.log; a failing step does not stop the later ones; the summary
# ($OUT/summary.txt) lists each step's result and the script exits non-zero if any step failed.
# The benchmark tables go to $OUT/bench_gpu.md, their rows to bench_gpu*.json (plot them with
# bench_kernels.py --replot), the per-kernel times to kernel_breakdown.md/json. Eight files in all
# (the device tool returns at most eight).
set -uo pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # steps may change directory
LOG="$OUT/gpu_check.log"
: >"$LOG"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
NCU="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
BUDGET_S="${GPU_CHECK_BUDGET_S:-570}"
declare -a SUMMARY=()
FAILED=0

# step NAME TIMEOUT_S COMMAND...: runs COMMAND under `set -euo pipefail` with a time limit.
step() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS left=$((BUDGET_S - SECONDS - 12))
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
    SUMMARY+=("SKIP  $name (not in GPU_CHECK_STEPS)")
    return
  fi
  if [ "$left" -lt 5 ]; then
    SUMMARY+=("SKIP  $name (no time left of ${BUDGET_S} s)")
    FAILED=1
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== $name (limit $limit s)" | tee -a "$LOG"
  if timeout --kill-after=10 "$limit" bash -c "set -euo pipefail; $*" >>"$LOG" 2>&1; then
    SUMMARY+=("PASS  $name ($((SECONDS - start)) s)")
  else
    local rc=$?
    SUMMARY+=("FAIL  $name (rc $rc, $((SECONDS - start)) s)")
    FAILED=1
  fi
  tail -n 5 "$LOG"
}

BENCH="$PYTHON bench/bench_kernels.py --quick --dtype bfloat16"
step env 15 "nvidia-smi; $PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; nvcc --version | tail -1"
# The torch-free self-test builds in the background while the extension builds.
CMAKE_LOG=/tmp/lightkv_cmake_build.log
rm -f "$CMAKE_LOG.rc"
(cmake -S . -B build-gpu -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build-gpu >"$CMAKE_LOG" 2>&1
 echo $? >"$CMAKE_LOG.rc") >"$CMAKE_LOG.configure" 2>&1 &
BASELINE="${GPU_CHECK_BASELINE:-}"
BASELINE_LOG=/tmp/lightkv_baseline_build.log
rm -f "$BASELINE_LOG.rc"
if [ -n "$BASELINE" ]; then
  (cd "$BASELINE" && $PYTHON setup.py build_ext --inplace >"$BASELINE_LOG" 2>&1; echo $? >"$BASELINE_LOG.rc") &
fi
step build_extension 180 "$PYTHON -m pip install --no-build-isolation --no-deps -e . -v 2>&1 | tail -n 60"
step cmake_selftest 60 "while [ ! -f '$CMAKE_LOG.rc' ]; do sleep 1; done; cat '$CMAKE_LOG.configure' '$CMAKE_LOG' | tail -n 20; [ \"\$(cat '$CMAKE_LOG.rc')\" = 0 ] && ./build-gpu/lightkv_cuda_selftest"
# One line per test as it ends, so a step cut by its limit still shows what passed; with
# pytest-xdist the tests run in two worker processes, and a test that crashes its worker is
# reported as failed while the others go on.
PYTEST_EXTRA="$($PYTHON -c 'import pytest_timeout' 2>/dev/null && echo --timeout=60) $($PYTHON -c 'import xdist' 2>/dev/null && printf -- '-n 2')"
step pytest_gpu 180 "$PYTHON -m pytest -v -rfE --durations=8 --maxfail=5 -p no:cacheprovider $PYTEST_EXTRA -m gpu python_tests/test_cuda.py python_tests/test_bench.py"
# Sanitizers on the self-test's small cases (every kernel, every dtype, tails and empty windows).
step memcheck 60 "'$SANITIZER' --tool memcheck --leak-check full --error-exitcode 1 ./build-gpu/lightkv_cuda_selftest --small"
step racecheck 60 "'$SANITIZER' --tool racecheck --error-exitcode 1 ./build-gpu/lightkv_cuda_selftest --small"
# The issue-3 targets first (LLaVA-1.5 at batch 1 and 32, a 16k-token image), then the packed presets.
step bench_targets 80 "$BENCH --presets llava15 qwen25vl --batches 1 32 --json '$OUT/bench_gpu.json' | tee '$OUT/bench_gpu.md'"
step bench_large 50 "$BENCH --presets video16k llava_next video --json '$OUT/bench_gpu_large.json' | tee -a '$OUT/bench_gpu.md'"
# The same cases for this tree and the baseline's (whose defaults may differ).
BREAKDOWN_CASES="llava15:1 llava15:32 qwen25vl:1 qwen25vl:32 video:1 llava_next:1 video16k:1"
step kernel_breakdown 30 "$PYTHON bench/kernel_breakdown.py --cases $BREAKDOWN_CASES --json '$OUT/kernel_breakdown.json' | tee '$OUT/kernel_breakdown.md'"
# When each kernel of a graph replay runs on which stream: how much the scoring and decision
# chains overlap at batch 1, and the gaps between chained kernels, dense and packed (markdown only).
step timeline 25 "{ echo; echo '## Timeline of a CUDA-graph replay (second stream on, chaining off)'; } >> '$OUT/kernel_breakdown.md'; $PYTHON bench/kernel_breakdown.py --timeline --cases llava15:1 qwen25vl:1 llava15:32 video:1 | tee -a '$OUT/kernel_breakdown.md'"
if [ -n "$BASELINE" ]; then
  step baseline_breakdown 60 "while [ ! -f '$BASELINE_LOG.rc' ]; do sleep 1; done; tail -n 5 '$BASELINE_LOG'; [ \"\$(cat '$BASELINE_LOG.rc')\" = 0 ]; { echo; echo '## Baseline: the source tree in $BASELINE, same GPU'; } >> '$OUT/kernel_breakdown.md'; cd '$BASELINE' && PYTHONPATH=\"\$PWD\" $PYTHON bench/kernel_breakdown.py --cases $BREAKDOWN_CASES | tee -a '$OUT/kernel_breakdown.md'"
  # The same inputs through both builds: bitwise the same outputs, where the change meant no other
  # (exact mode by block pairs, as the baseline: block groups take other feature splits).
  BITS=/tmp/lightkv_bits
  step baseline_bits 60 "while [ ! -f '$BASELINE_LOG.rc' ]; do sleep 1; done; LIGHTKV_EXACT_GROUP=1 $PYTHON bench/compare_builds.py --save $BITS.current.pt; (cd '$BASELINE' && PYTHONPATH=\"\$PWD\" $PYTHON '$PWD/bench/compare_builds.py' --save $BITS.baseline.pt); { echo; echo '## Outputs of this build against the baseline (LIGHTKV_EXACT_GROUP=1)'; echo '\`\`\`'; $PYTHON bench/compare_builds.py --compare $BITS.baseline.pt $BITS.current.pt; echo '\`\`\`'; } | tee -a '$OUT/kernel_breakdown.md'"
fi
# Where the host time of an eager call goes (varlen and dense): syncs, Python, launches (log only).
step profile_host 40 "$PYTHON bench/profile_host.py"
# A/Bs of the scoring: the one-pass cluster kernel forced where the shape picks the two passes, and
# the two passes forced where it picks the one pass (markdown only).
step kernel_breakdown_one_pass 25 "{ echo; echo '## One scoring pass (LIGHTKV_SCORE_PASSES=1)'; } >> '$OUT/kernel_breakdown.md'; LIGHTKV_SCORE_PASSES=1 $PYTHON bench/kernel_breakdown.py --cases llava15:32 qwen25vl:1 qwen25vl:32 | tee -a '$OUT/kernel_breakdown.md'"
step kernel_breakdown_two_passes 15 "{ echo; echo '## Two scoring passes (LIGHTKV_SCORE_PASSES=2)'; } >> '$OUT/kernel_breakdown.md'; LIGHTKV_SCORE_PASSES=2 $PYTHON bench/kernel_breakdown.py --cases llava15:1 | tee -a '$OUT/kernel_breakdown.md'"
# A/B of exact_dots_kernel's items where the shape picks block groups: block pairs instead (markdown only).
step kernel_breakdown_exact_pairs 15 "{ echo; echo '## Exact mode by block pairs (LIGHTKV_EXACT_GROUP=1)'; } >> '$OUT/kernel_breakdown.md'; LIGHTKV_EXACT_GROUP=1 $PYTHON bench/kernel_breakdown.py --cases llava15:32 | tee -a '$OUT/kernel_breakdown.md'"
# A/B of exact_dots_kernel's tensor-core instruction for block groups (LLaVA-1.5 at batch 32): one
# mma.m8n8k4 per src block instead of two blocks stacked in a float64 mma.m16n8k4 (markdown only).
step kernel_breakdown_exact_mma 15 "{ echo; echo '## Exact mode with src blocks one by one (LIGHTKV_EXACT_MMA=8)'; } >> '$OUT/kernel_breakdown.md'; LIGHTKV_EXACT_MMA=8 $PYTHON bench/kernel_breakdown.py --cases llava15:32 | tee -a '$OUT/kernel_breakdown.md'"
# A/B of exact_dots_kernel's sums: the float64 tensor cores where block groups take the screened
# 16-bit sums by default (LLaVA-1.5 at batch 32), and the screened sums where block pairs take the
# float64 ones (batch 1); the recheck's cost shows in exact_select_kernel (markdown only).
step kernel_breakdown_exact_dots 25 "{ echo; echo '## Exact mode on the float64 tensor cores (LIGHTKV_EXACT_DOTS=float64)'; } >> '$OUT/kernel_breakdown.md'; LIGHTKV_EXACT_DOTS=float64 $PYTHON bench/kernel_breakdown.py --cases llava15:32 | tee -a '$OUT/kernel_breakdown.md'; { echo; echo '## Exact mode on screened sums (LIGHTKV_EXACT_DOTS=screened)'; } >> '$OUT/kernel_breakdown.md'; LIGHTKV_EXACT_DOTS=screened $PYTHON bench/kernel_breakdown.py --cases llava15:1 video:1 | tee -a '$OUT/kernel_breakdown.md'"
# A/B of the merge modes where exact mode runs: the same cases in screened mode, batch 32 included
# (markdown only).
step kernel_breakdown_screened 25 "$PYTHON bench/kernel_breakdown.py --merge-mode screened --cases llava15:1 llava15:32 qwen25vl:1 video:1 | tee -a '$OUT/kernel_breakdown.md'"
# Hardware counters of one call per target case (Nsight Compute at the GPU's own clocks): what
# limits each kernel (speed of light, occupancy, the instructions issued and the cycles a warp
# spends stalled per issue, by reason; the compute workload's busiest pipes: which one a "math pipe
# throttle" stall waits on), appended to kernel_breakdown.md.
STALLS="regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio',smsp__inst_executed.sum"
step ncu 90 "for c in llava15:1 llava15:32 video16k:1; do echo \"### Nsight Compute: \$c\"; '$NCU' --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis --metrics $STALLS $PYTHON bench/kernel_breakdown.py --ncu-range --cases \$c; done >> '$OUT/kernel_breakdown.md'"
# --quick skips torch.compile of the reference (a compile per shape); one full case brings it in.
step bench_compiled 90 "$PYTHON bench/bench_kernels.py --dtype bfloat16 --presets llava15 --batches 1 --json '$OUT/bench_gpu_compiled.json' | tee -a '$OUT/bench_gpu.md'"

echo "=== summary" | tee "$OUT/summary.txt"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$OUT/summary.txt"
exit "$FAILED"
