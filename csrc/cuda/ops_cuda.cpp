// CUDA implementations of the lightkv ops (schemas and semantics: csrc/lightkv.cpp). This file
// only checks arguments, allocates outputs and workspace, and calls the torch-free launchers of
// csrc/cuda/kernels.h on the current stream; every returned cudaError_t becomes an exception.
//
// Value checks that need the data (importance finite and >= 0, sizes >= 1, window tables
// well formed) are left to the Python API: doing them here would synchronise the stream. The
// kernels stay memory safe on a malformed image or window table (out-of-range rows are skipped).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "cuda/kernels.h"
#include "op_checks.h"

namespace {

constexpr size_t kScoreWorkspaceNoSyncLimit = size_t{256} << 20;

lightkv_cuda::DType kernel_dtype(const at::Tensor& t, bool allow_double, const char* op, const char* name) {
  const at::ScalarType type = t.scalar_type();
  const bool supported = type == at::kFloat || type == at::kHalf || type == at::kBFloat16 ||
                         (allow_double && type == at::kDouble);
  LIGHTKV_CHECK(supported, "lightkv::", op, ": ", name, " must be float32, float16 or bfloat16",
                allow_double ? " or float64" : "", ", got ", type);
  if (type == at::kHalf) return lightkv_cuda::DType::Float16;
  if (type == at::kBFloat16) return lightkv_cuda::DType::BFloat16;
  if (type == at::kDouble) return lightkv_cuda::DType::Float64;
  return lightkv_cuda::DType::Float32;
}

lightkv_cuda::Tensor4 describe(const at::Tensor& t, lightkv_cuda::DType dtype) {
  lightkv_cuda::Tensor4 out;
  out.data = t.const_data_ptr();
  out.dtype = dtype;
  for (int i = 0; i < 4; ++i) {
    out.size[i] = t.size(i);
    out.stride[i] = t.stride(i);
  }
  return out;
}

lightkv_cuda::OutTensor4 describe_out(at::Tensor& t) {
  lightkv_cuda::OutTensor4 out;
  out.data = t.data_ptr();
  for (int i = 0; i < 4; ++i) {
    out.size[i] = t.size(i);
    out.stride[i] = t.stride(i);
  }
  return out;
}

// Workspace from the caching allocator, tied to the current stream like any output.
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor score_cuda(const at::Tensor& k, const at::Tensor& text, const at::Tensor& images,
                      const std::optional<at::Tensor>& text_mask, const std::optional<at::Tensor>& sizes,
                      double scale) {
  LIGHTKV_CHECK(k.is_cuda(), "lightkv::score: k must be a CUDA tensor, got device ", k.device());
  lightkv::check_score_args(k, text, images, text_mask, sizes, scale);
  const at::Device device = k.device();
  const lightkv_cuda::DType dtype = kernel_dtype(k, false, "score", "k");
  const int64_t batch = k.size(0), tokens = k.size(2), text_tokens = text.size(2);

  const c10::cuda::CUDAGuard device_guard(device);
  at::Tensor importance = at::empty({batch, tokens}, k.options().dtype(at::kFloat));
  const at::Tensor image_table = images.contiguous();

  lightkv_cuda::ScoreArgs args;
  args.k = describe(k, dtype);
  args.text = describe(text, dtype);
  args.images = image_table.const_data_ptr<int64_t>();
  args.num_images = image_table.size(0);
  if (text_mask.has_value()) {
    args.text_mask = text_mask->const_data_ptr<bool>();
    args.text_mask_stride[0] = text_mask->stride(0);
    args.text_mask_stride[1] = text_mask->stride(1);
  }
  if (sizes.has_value()) {
    args.sizes = sizes->const_data_ptr<int32_t>();
    args.sizes_stride[0] = sizes->stride(0);
    args.sizes_stride[1] = sizes->stride(1);
  }
  args.scale = static_cast<float>(scale);
  args.importance = importance.data_ptr<float>();
  // Softmax statistics are kept per (image, text token): I * S rows bound them without reading
  // the table; only when that bound is large is the exact total read back (one sync).
  args.text_capacity = args.num_images * text_tokens;
  size_t bytes = lightkv_cuda::score_workspace_size(args);
  if (bytes > kScoreWorkspaceNoSyncLimit) {
    args.text_capacity = image_table.select(1, 4).clamp_min(0).sum().item<int64_t>();
    bytes = lightkv_cuda::score_workspace_size(args);
  }
  at::Tensor scratch = workspace(bytes, k);
  C10_CUDA_CHECK(lightkv_cuda::launch_score(args, scratch.data_ptr(), bytes,
                                            c10::cuda::getCurrentCUDAStream().stream()));
  return importance;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_cuda(
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& metric, const at::Tensor& importance,
    const at::Tensor& sizes, const at::Tensor& window_tokens, const at::Tensor& window_offsets, double ratio,
    int64_t kept, int64_t max_window, bool token_major) {
  LIGHTKV_CHECK(k.is_cuda(), "lightkv::merge: k must be a CUDA tensor, got device ", k.device());
  lightkv::check_merge_args(k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept,
                            max_window);
  const at::Device device = k.device();
  const lightkv_cuda::DType dtype = kernel_dtype(k, false, "merge", "k");
  const lightkv_cuda::DType metric_dtype = kernel_dtype(metric, true, "merge", "metric");
  const int64_t batch = k.size(0), heads = k.size(1), tokens = k.size(2), dim = k.size(3);
  LIGHTKV_CHECK(tokens < INT32_MAX, "lightkv::merge: at most ", INT32_MAX - 1, " tokens per row, got ", tokens);
  LIGHTKV_CHECK(batch * tokens == 0 || window_offsets.size(0) >= 2,
                "lightkv::merge: window_offsets must describe at least one window for ", batch * tokens, " tokens");

  const c10::cuda::CUDAGuard device_guard(device);
  const auto index_options = k.options().dtype(at::kLong);
  at::Tensor sizes_out = at::empty({batch, kept}, k.options().dtype(at::kInt));
  at::Tensor index = at::empty({batch, kept}, index_options);
  at::Tensor assignment = at::empty({batch, tokens}, index_options);
  auto allocate = [&]() {
    if (token_major) return at::empty({batch, kept, heads, dim}, k.options()).permute({0, 2, 1, 3});
    return at::empty({batch, heads, kept, dim}, k.options());
  };
  at::Tensor k_out = allocate();
  at::Tensor v_out = allocate();

  const at::Tensor weights = importance.contiguous();
  const at::Tensor token_sizes = sizes.contiguous();
  const at::Tensor tokens_list = window_tokens.contiguous();
  const at::Tensor offsets_list = window_offsets.contiguous();

  lightkv_cuda::MergeArgs args;
  args.k = describe(k, dtype);
  args.v = describe(v, dtype);
  args.metric = describe(metric, metric_dtype);
  args.importance = weights.const_data_ptr<float>();
  args.sizes = token_sizes.const_data_ptr<int32_t>();
  args.window_tokens = tokens_list.const_data_ptr<int64_t>();
  args.total_tokens = tokens_list.size(0);
  args.window_offsets = offsets_list.const_data_ptr<int64_t>();
  args.num_windows = offsets_list.size(0) - 1;
  args.ratio = ratio;
  args.kept = kept;
  args.max_window = max_window;
  args.k_out = describe_out(k_out);
  args.v_out = describe_out(v_out);
  args.sizes_out = sizes_out.data_ptr<int32_t>();
  args.index = index.data_ptr<int64_t>();
  args.assignment = assignment.data_ptr<int64_t>();
  if (batch * tokens > 0) {
    const size_t bytes = lightkv_cuda::merge_workspace_size(args);
    LIGHTKV_CHECK(bytes > 0, "lightkv::merge: could not size the CUDA workspace");
    at::Tensor scratch = workspace(bytes, k);
    C10_CUDA_CHECK(lightkv_cuda::launch_merge(args, scratch.data_ptr(), bytes,
                                              c10::cuda::getCurrentCUDAStream().stream()));
  }
  return {k_out, v_out, sizes_out, index, assignment};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightkv, CUDA, m) {
  m.impl("score", &score_cuda);
  m.impl("merge", &merge_cuda);
}
