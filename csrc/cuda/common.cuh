// Internal helpers shared by score.cu and merge.cu (not part of the public kernels.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels.h"

namespace lightkv_cuda {
namespace detail {

// Element loads/stores through explicit intrinsics: PyTorch compiles .cu files with
// __CUDA_NO_HALF_CONVERSIONS__, so no implicit half <-> float conversions are used anywhere.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(float x) { return static_cast<double>(x); }
__device__ __forceinline__ double to_double(__half x) { return static_cast<double>(__half2float(x)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 x) {
  return static_cast<double>(__bfloat162float(x));
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Carves one caller-provided buffer into 256-byte aligned arrays. With a null base it only
// counts bytes, so the size query and the launch share one layout description.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(int64_t count) {
    offset_ = (offset_ + 255) & ~static_cast<size_t>(255);
    T* out = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += static_cast<size_t>(count > 0 ? count : 0) * sizeof(T);
    return out;
  }
  size_t bytes() const { return offset_ + 255; }  // slack so a caller may round the base up

 private:
  char* base_;
  size_t offset_ = 0;
};

// For `num_arrays` arrays of `n` counts (counts[a * n + i]) writes exclusive prefix sums
// offsets[a * (n + 1) + i], i = 0..n (the last one is the total). One block per array.
cudaError_t launch_exclusive_offsets(const int64_t* counts, int64_t n, int num_arrays,
                                     int64_t* offsets, cudaStream_t stream);

// Index of the segment that holds `item`: the largest s with offsets[s] <= item, searching
// offsets[0..n] (n + 1 entries, non-decreasing). Skips empty segments.
__device__ __forceinline__ int64_t find_segment(const int64_t* offsets, int64_t n, int64_t item) {
  int64_t lo = 0, hi = n;  // invariant: offsets[lo] <= item < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= item) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Grid size for a grid-stride loop over at most `items` work items.
inline unsigned int grid_for(int64_t items, int64_t cap) {
  const int64_t g = items < 1 ? 1 : (items < cap ? items : cap);
  return static_cast<unsigned int>(g);
}

}  // namespace detail
}  // namespace lightkv_cuda

// Returns from the enclosing host function on the first CUDA error.
#define LIGHTKV_RETURN_IF_ERROR(expr)       \
  do {                                      \
    const cudaError_t lightkv_err_ = (expr); \
    if (lightkv_err_ != cudaSuccess) return lightkv_err_; \
  } while (0)
