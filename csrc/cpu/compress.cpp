// CPU kernel of lightkv::compress (contract: csrc/lightkv.cpp): lightkv::score, then
// lightkv::merge with its importance, both through the dispatcher (so each shows in a profile).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace lightkv_cpu {
namespace {

using Merged = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_cpu(
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& text, const at::Tensor& images,
    const std::optional<at::Tensor>& text_mask, const at::Tensor& sizes, double scale, const at::Tensor& metric,
    const at::Tensor& window_tokens, const at::Tensor& window_offsets, double ratio, int64_t kept,
    int64_t max_window, bool token_major, int64_t text_rows, const std::optional<at::Tensor>& local_bases) {
  static const auto score =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lightkv::score", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, double, int64_t)>();
  static const auto merge =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lightkv::merge", "")
          .typed<Merged(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, bool,
                        const std::optional<at::Tensor>&)>();
  at::Tensor importance = score.call(k, text, images, text_mask, sizes, scale, text_rows);
  auto [k_out, v_out, sizes_out, index, assignment] = merge.call(
      k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept, max_window, token_major,
      local_bases);
  return {k_out, v_out, sizes_out, index, assignment, importance};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightkv, CPU, m) { m.impl("compress", &compress_cpu); }

}  // namespace lightkv_cpu
