// Torch-free interface of the lightkv CUDA kernels (the semantics are those of the op contract
// in csrc/lightkv.cpp). Tensors are described by raw device pointers, sizes and 64-bit element
// strides, so the kernels build and link without PyTorch (see CMakeLists.txt and
// csrc/cuda/selftest/selftest.cu); csrc/cuda/ops_cuda.cpp is the torch glue.
//
// Every launch function is CUB style: ask the workspace size first, hand in a device buffer of
// at least that many bytes, get back the first CUDA error (launches are asynchronous on
// `stream`; nothing synchronises). The workspace carries partial results and counters from one
// kernel to the next (the counters zeroed by the launch itself, so it needs no initial contents):
// it serves one launch sequence at a time (merge decisions and then values share one), reused
// only in stream order. Results are bitwise deterministic for a given input and device: no
// float atomics, every reduction runs in a fixed order.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace lightkv_cuda {

// Whether the environment sets the run-time knob `name` to `value` (the A/B knobs of the kernels
// and of the torch glue, read at every call).
inline bool knob_is(const char* name, const char* value) {
  const char* knob = std::getenv(name);
  return knob != nullptr && std::strcmp(knob, value) == 0;
}

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// A strided 4-D device tensor; strides are in elements and may be zero or arbitrary.
struct Tensor4 {
  const void* data = nullptr;
  DType dtype = DType::Float32;
  int64_t size[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
};

// A strided 4-D device output tensor of the input dtype.
struct OutTensor4 {
  void* data = nullptr;
  int64_t size[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
};

struct ScoreArgs {
  Tensor4 k;     // (B, H_kv, L, D) float32/float16/bfloat16
  Tensor4 text;  // (B, H_q, S, D) same dtype, H_q % H_kv == 0
  const int64_t* images = nullptr;  // (I, 5) contiguous: batch_row, vis_start, vis_len, text_start, text_len
  int64_t num_images = 0;
  const bool* text_mask = nullptr;  // optional (B, S), element strides below
  int64_t text_mask_stride[2] = {0, 0};
  const int32_t* sizes = nullptr;  // optional (B, L): log(size) is added to every logit
  int64_t sizes_stride[2] = {0, 0};
  float scale = 1.0f;
  // Rows of the softmax statistics buffer: the sum over images of text_len, or more. A smaller
  // value keeps every kernel in bounds (the rows past it get no statistics) but leaves the result
  // undefined.
  int64_t text_capacity = 0;
  float* importance = nullptr;  // (B, L) contiguous float32 output; tokens of no image get 0
};

// Bytes of workspace launch_score needs for these shapes (pointers are not read).
size_t score_workspace_size(const ScoreArgs& args);
cudaError_t launch_score(const ScoreArgs& args, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

struct MergeArgs {
  Tensor4 k;       // (B, H, L, D) float32/float16/bfloat16
  Tensor4 v;       // (B, H, L, D) same dtype and sizes as k, own strides
  Tensor4 metric;  // (B, L, G, C) float32/float16/bfloat16/float64
  const float* importance = nullptr;  // (B, L) contiguous
  const int32_t* sizes = nullptr;     // (B, L) contiguous
  const int64_t* window_tokens = nullptr;  // (total,) flat ids b * L + l, grouped by window
  int64_t total_tokens = 0;                // == B * L
  const int64_t* window_offsets = nullptr;  // (num_windows + 1,)
  int64_t num_windows = 0;
  double ratio = 0.0;
  int64_t kept = 0;  // M, kept tokens per row
  // Upper bound on any window's token count (as flash-attn's max_seqlen; known to the caller from
  // the window sizes, as `kept` is). It picks the kernels (merge.cu): every pair is compared
  // exactly for a bound up to 64, and up to 512 when that is little work; otherwise screened
  // candidates are checked exactly. A window larger than a bound that picked exact mode is left
  // unmerged (never read or written out of bounds).
  int64_t max_window = INT64_MAX;
  OutTensor4 k_out;  // (B, H, M, D), any strides (token-major allowed)
  OutTensor4 v_out;
  int32_t* sizes_out = nullptr;   // (B, M) contiguous
  int64_t* index = nullptr;       // (B, M) contiguous
  int64_t* assignment = nullptr;  // (B, L) contiguous
  // Optional (2, B, L) contiguous: per token, subtracted from the index entry of a kept token
  // (plane 0) and from the token's assignment (plane 1): image-local numbers for a row that packs
  // several images (`local_bases` of the merge op in csrc/lightkv.cpp).
  const int64_t* local_bases = nullptr;
};

size_t merge_workspace_size(const MergeArgs& args);
cudaError_t launch_merge(const MergeArgs& args, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

// launch_merge in two parts, called with the same args and workspace, the values after the
// decisions in stream order. The decisions (which tokens merge: index, assignment and the groups
// in the workspace) read only the metric (often a view of k) and the window tables, never the
// importance or sizes, so a caller may run them on another stream while the importance is being
// computed (compress in csrc/cuda/ops_cuda.cpp does); the values write k_out, v_out and sizes_out.
cudaError_t launch_merge_decisions(const MergeArgs& args, void* workspace, size_t workspace_bytes,
                                   cudaStream_t stream);
cudaError_t launch_merge_values(const MergeArgs& args, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream);

}  // namespace lightkv_cuda
