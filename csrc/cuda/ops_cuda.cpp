// CUDA implementations of the lightkv ops (schemas and semantics: csrc/lightkv.cpp). This file
// only checks arguments, allocates outputs and workspace, and calls the torch-free launchers of
// csrc/cuda/kernels.h on the current stream (compress also on a second stream that the current
// one waits for before it returns); every returned cudaError_t becomes an exception.
//
// Value checks that need the data (importance finite and >= 0, sizes >= 1, window tables
// well formed) are left to the Python API: doing them here would synchronise the stream. The
// kernels stay memory safe on a malformed image table (its out-of-range rows are skipped). Window
// tables are trusted: one that breaks the contract in csrc/lightkv.cpp (a token listed twice or
// not at all, a window across rows) gives undefined results and may fault, where the CPU backend
// raises; the Python API passes only the tables it builds (lightkv_ext/windows.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

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

// A score call: its output, the inputs it reads through raw pointers, and its kernel arguments.
struct ScoreCall {
  at::Tensor importance;
  at::Tensor image_table;
  lightkv_cuda::ScoreArgs args;
  size_t workspace_bytes = 0;
};

ScoreCall prepare_score(const at::Tensor& k, const at::Tensor& text, const at::Tensor& images,
                        const std::optional<at::Tensor>& text_mask, const std::optional<at::Tensor>& sizes,
                        double scale, int64_t text_rows) {
  LIGHTKV_CHECK(k.is_cuda(), "lightkv::score: k must be a CUDA tensor, got device ", k.device());
  lightkv::check_score_args(k, text, images, text_mask, sizes, scale, text_rows);
  const lightkv_cuda::DType dtype = kernel_dtype(k, false, "score", "k");
  const int64_t batch = k.size(0), tokens = k.size(2), text_tokens = text.size(2);

  ScoreCall call;
  call.importance = at::empty({batch, tokens}, k.options().dtype(at::kFloat));
  call.image_table = images.contiguous();
  lightkv_cuda::ScoreArgs& args = call.args;
  args.k = describe(k, dtype);
  args.text = describe(text, dtype);
  args.images = call.image_table.const_data_ptr<int64_t>();
  args.num_images = call.image_table.size(0);
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
  args.importance = call.importance.data_ptr<float>();
  // Softmax statistics are kept per (image, text token): the caller's text_rows, or else I * S
  // rows bound them without reading the table; only when that bound is large is the exact total
  // read back (one sync).
  args.text_capacity = text_rows >= 0 ? text_rows : args.num_images * text_tokens;
  call.workspace_bytes = lightkv_cuda::score_workspace_size(args);
  if (text_rows < 0 && call.workspace_bytes > kScoreWorkspaceNoSyncLimit) {
    args.text_capacity = call.image_table.select(1, 4).clamp_min(0).sum().item<int64_t>();
    call.workspace_bytes = lightkv_cuda::score_workspace_size(args);
  }
  return call;
}

// A merge call, as ScoreCall.
struct MergeCall {
  at::Tensor k_out, v_out, sizes_out, index, assignment;
  at::Tensor weights, token_sizes, tokens_list, offsets_list, bases;
  lightkv_cuda::MergeArgs args;
  size_t workspace_bytes = 0;  // 0: no token, nothing to launch
};

MergeCall prepare_merge(const at::Tensor& k, const at::Tensor& v, const at::Tensor& metric,
                        const at::Tensor& importance, const at::Tensor& sizes, const at::Tensor& window_tokens,
                        const at::Tensor& window_offsets, double ratio, int64_t kept, int64_t max_window,
                        bool token_major, const std::optional<at::Tensor>& local_bases) {
  LIGHTKV_CHECK(k.is_cuda(), "lightkv::merge: k must be a CUDA tensor, got device ", k.device());
  lightkv::check_merge_args(k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept,
                            max_window, local_bases);
  const lightkv_cuda::DType dtype = kernel_dtype(k, false, "merge", "k");
  const lightkv_cuda::DType metric_dtype = kernel_dtype(metric, true, "merge", "metric");
  const int64_t batch = k.size(0), heads = k.size(1), tokens = k.size(2), dim = k.size(3);
  LIGHTKV_CHECK(tokens < INT32_MAX, "lightkv::merge: at most ", INT32_MAX - 1, " tokens per row, got ", tokens);
  LIGHTKV_CHECK(batch * tokens == 0 || window_offsets.size(0) >= 2,
                "lightkv::merge: window_offsets must describe at least one window for ", batch * tokens, " tokens");

  MergeCall call;
  const auto index_options = k.options().dtype(at::kLong);
  call.sizes_out = at::empty({batch, kept}, k.options().dtype(at::kInt));
  call.index = at::empty({batch, kept}, index_options);
  call.assignment = at::empty({batch, tokens}, index_options);
  auto allocate = [&]() {
    if (token_major) return at::empty({batch, kept, heads, dim}, k.options()).permute({0, 2, 1, 3});
    return at::empty({batch, heads, kept, dim}, k.options());
  };
  call.k_out = allocate();
  call.v_out = allocate();
  call.weights = importance.contiguous();
  call.token_sizes = sizes.contiguous();
  call.tokens_list = window_tokens.contiguous();
  call.offsets_list = window_offsets.contiguous();
  if (local_bases) call.bases = local_bases->contiguous();

  lightkv_cuda::MergeArgs& args = call.args;
  args.k = describe(k, dtype);
  args.v = describe(v, dtype);
  args.metric = describe(metric, metric_dtype);
  args.importance = call.weights.const_data_ptr<float>();
  args.sizes = call.token_sizes.const_data_ptr<int32_t>();
  args.window_tokens = call.tokens_list.const_data_ptr<int64_t>();
  args.total_tokens = call.tokens_list.size(0);
  args.window_offsets = call.offsets_list.const_data_ptr<int64_t>();
  args.num_windows = call.offsets_list.size(0) - 1;
  args.ratio = ratio;
  args.kept = kept;
  args.max_window = max_window;
  args.k_out = describe_out(call.k_out);
  args.v_out = describe_out(call.v_out);
  args.sizes_out = call.sizes_out.data_ptr<int32_t>();
  args.index = call.index.data_ptr<int64_t>();
  args.assignment = call.assignment.data_ptr<int64_t>();
  args.local_bases = call.bases.defined() ? call.bases.const_data_ptr<int64_t>() : nullptr;
  if (batch * tokens > 0) {
    call.workspace_bytes = lightkv_cuda::merge_workspace_size(args);
    LIGHTKV_CHECK(call.workspace_bytes > 0, "lightkv::merge: could not size the CUDA workspace");
  }
  return call;
}

at::Tensor score_cuda(const at::Tensor& k, const at::Tensor& text, const at::Tensor& images,
                      const std::optional<at::Tensor>& text_mask, const std::optional<at::Tensor>& sizes,
                      double scale, int64_t text_rows) {
  const c10::cuda::CUDAGuard device_guard(k.device());
  ScoreCall call = prepare_score(k, text, images, text_mask, sizes, scale, text_rows);
  at::Tensor scratch = workspace(call.workspace_bytes, k);
  C10_CUDA_CHECK(lightkv_cuda::launch_score(call.args, scratch.data_ptr(), call.workspace_bytes,
                                            c10::cuda::getCurrentCUDAStream().stream()));
  return call.importance;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_cuda(
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& metric, const at::Tensor& importance,
    const at::Tensor& sizes, const at::Tensor& window_tokens, const at::Tensor& window_offsets, double ratio,
    int64_t kept, int64_t max_window, bool token_major, const std::optional<at::Tensor>& local_bases) {
  const c10::cuda::CUDAGuard device_guard(k.device());
  MergeCall call = prepare_merge(k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept,
                                 max_window, token_major, local_bases);
  if (call.workspace_bytes > 0) {
    at::Tensor scratch = workspace(call.workspace_bytes, k);
    C10_CUDA_CHECK(lightkv_cuda::launch_merge(call.args, scratch.data_ptr(), call.workspace_bytes,
                                              c10::cuda::getCurrentCUDAStream().stream()));
  }
  return {call.k_out, call.v_out, call.sizes_out, call.index, call.assignment};
}

// The fork and join events of compress's second stream, one pair per thread and device, reused by
// its calls: creating and destroying two events per call costs host time. A stream's wait on an
// event is bound to the event's latest record when the wait is enqueued, so a later call's record
// does not move it. Never destroyed (a destroy at exit could come after the CUDA context's).
struct ForkJoinEvents {
  at::cuda::CUDAEvent fork, join;
};

ForkJoinEvents& fork_join_events(c10::DeviceIndex device) {
  thread_local std::vector<ForkJoinEvents*> per_device;
  const auto slot = static_cast<size_t>(device);
  if (per_device.size() <= slot) per_device.resize(slot + 1, nullptr);
  if (per_device[slot] == nullptr) per_device[slot] = new ForkJoinEvents();
  return *per_device[slot];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_cuda(
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& text, const at::Tensor& images,
    const std::optional<at::Tensor>& text_mask, const at::Tensor& sizes, double scale, const at::Tensor& metric,
    const at::Tensor& window_tokens, const at::Tensor& window_offsets, double ratio, int64_t kept,
    int64_t max_window, bool token_major, int64_t text_rows, const std::optional<at::Tensor>& local_bases) {
  const c10::cuda::CUDAGuard device_guard(k.device());
  ScoreCall score = prepare_score(k, text, images, text_mask, sizes, scale, text_rows);
  MergeCall merge = prepare_merge(k, v, metric, score.importance, sizes, window_tokens, window_offsets, ratio, kept,
                                  max_window, token_major, local_bases);
  const size_t score_bytes = (score.workspace_bytes + 255) & ~size_t{255};
  at::Tensor scratch = workspace(score_bytes + merge.workspace_bytes, k);
  char* score_workspace = static_cast<char*>(scratch.data_ptr());
  char* merge_workspace = score_workspace + score_bytes;

  // The merge decisions run on a second stream when overlapping: the importance only
  // enters the values. The memory the side stream reads or writes (inputs, outputs, workspace)
  // can only be released after the join is enqueued on the current stream, so any reuse of it
  // there comes after the side stream's work: no record_stream is needed. The fork and the join
  // are event waits, which CUDA graph capture records as edges.
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  // LIGHTKV_OVERLAP=0 turns the second stream off (for A/B timing and debugging).
  const bool overlap = merge.workspace_bytes > 0 && !lightkv_cuda::knob_is("LIGHTKV_OVERLAP", "0");
  const c10::cuda::CUDAStream side = overlap ? c10::cuda::getStreamFromPool(false, k.device().index()) : stream;
  ForkJoinEvents& events = fork_join_events(stream.device_index());
  if (overlap) {
    events.fork.record(stream);
    events.fork.block(side);
  }
  // LIGHTKV_SCORE_FIRST=1 enqueues the scoring first, so that its kernels, not the decisions',
  // take the SMs first (A/B: at LLaVA-1.5 batch 1 the scoring chain is the longer one).
  const bool score_first = lightkv_cuda::knob_is("LIGHTKV_SCORE_FIRST", "1");
  const auto launch_scoring = [&] {
    C10_CUDA_CHECK(lightkv_cuda::launch_score(score.args, score_workspace, score.workspace_bytes, stream.stream()));
  };
  if (score_first) launch_scoring();
  C10_CUDA_CHECK(lightkv_cuda::launch_merge_decisions(merge.args, merge_workspace, merge.workspace_bytes,
                                                      side.stream()));
  if (!score_first) launch_scoring();
  if (overlap) {
    events.join.record(side);
    events.join.block(stream);
  }
  C10_CUDA_CHECK(lightkv_cuda::launch_merge_values(merge.args, merge_workspace, merge.workspace_bytes,
                                                   stream.stream()));
  return {merge.k_out, merge.v_out, merge.sizes_out, merge.index, merge.assignment, score.importance};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightkv, CUDA, m) {
  m.impl("score", &score_cuda);
  m.impl("merge", &merge_cuda);
  m.impl("compress", &compress_cuda);
}
