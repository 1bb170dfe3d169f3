// Argument checks of the lightkv ops shared by every backend (shapes, dtypes, devices). Each
// backend adds the checks that need the data or that only its kernels impose.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>

// TORCH_CHECK whose message is built by lightkv::message (see there); only on failure.
#define LIGHTKV_CHECK(cond, ...) TORCH_CHECK(cond, ::lightkv::message(__VA_ARGS__))

namespace lightkv {

// Error messages of every lightkv op. LIGHTKV_CHECK(cond, parts...) is TORCH_CHECK with its
// message assembled here, piece by piece, without iostreams: inside the CUDA extension built on
// the H100 image (torch 2.11.0+cu130), streaming an int64 into a TORCH_CHECK message crashed the
// process (segfault in the stream's number formatting) instead of raising. Numbers print as
// iostreams would (integers in full, floating point like "%g"), shapes as "[2, 8, 576, 128]".
inline std::string text_of(const char* text) { return text; }
inline std::string text_of(const std::string& text) { return text; }
template <typename Integer, std::enable_if_t<std::is_integral_v<Integer>, int> = 0>
std::string text_of(Integer value) {
  return std::to_string(value);
}
template <typename Real, std::enable_if_t<std::is_floating_point_v<Real>, int> = 0>
std::string text_of(Real value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", static_cast<double>(value));
  return text;
}
inline std::string text_of(at::IntArrayRef shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}
inline std::string text_of(const c10::Device& device) { return device.str(); }
inline std::string text_of(at::ScalarType type) { return c10::toString(type); }

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string text;
  (text += ... += text_of(parts));
  return text;
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& k, const char* op, const char* name) {
  LIGHTKV_CHECK(t.device() == k.device(), "lightkv::", op, ": ", name, " must be on ", k.device(),
                " like k, got ", t.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op, const char* name) {
  LIGHTKV_CHECK(t.scalar_type() == expected, "lightkv::", op, ": ", name, " must be ", expected, ", got ",
                t.scalar_type());
}

inline void check_token_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  LIGHTKV_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "lightkv::", op, ": ", name,
                " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  LIGHTKV_CHECK(t.sizes() == expected, "lightkv::", op, ": ", name, " must have shape ", expected, ", got ",
                t.sizes());
}

// lightkv::score (contract in csrc/lightkv.cpp).
inline void check_score_args(const at::Tensor& k, const at::Tensor& text, const at::Tensor& images,
                             const std::optional<at::Tensor>& text_mask, const std::optional<at::Tensor>& sizes,
                             double scale, int64_t text_rows) {
  constexpr const char* op = "score";
  check_same_device(text, k, op, "text");
  check_same_device(images, k, op, "images");
  LIGHTKV_CHECK(k.dim() == 4, "lightkv::score: k must be 4-D (B, H_kv, L, D), got ", k.sizes());
  LIGHTKV_CHECK(text.dim() == 4, "lightkv::score: text must be 4-D (B, H_q, S, D), got ", text.sizes());
  check_token_dtype(k, op, "k");
  check_dtype(text, k.scalar_type(), op, "text");
  const int64_t batch = k.size(0), kv_heads = k.size(1), tokens = k.size(2), dim = k.size(3);
  const int64_t query_heads = text.size(1), text_tokens = text.size(2);
  LIGHTKV_CHECK(text.size(0) == batch && text.size(3) == dim, "lightkv::score: text must be (", batch,
                ", H_q, S, ", dim, ") to match k ", k.sizes(), ", got ", text.sizes());
  LIGHTKV_CHECK(kv_heads > 0 && query_heads > 0 && query_heads % kv_heads == 0, "lightkv::score: text heads (",
                query_heads, ") must be a positive multiple of k heads (", kv_heads, ")");
  LIGHTKV_CHECK(images.dim() == 2 && images.size(1) == 5, "lightkv::score: images must be (I, 5), got ",
                images.sizes());
  check_dtype(images, at::kLong, op, "images");
  if (text_mask.has_value()) {
    check_same_device(*text_mask, k, op, "text_mask");
    check_dtype(*text_mask, at::kBool, op, "text_mask");
    check_shape(*text_mask, {batch, text_tokens}, op, "text_mask");
  }
  if (sizes.has_value()) {
    check_same_device(*sizes, k, op, "sizes");
    check_dtype(*sizes, at::kInt, op, "sizes");
    check_shape(*sizes, {batch, tokens}, op, "sizes");
  }
  LIGHTKV_CHECK(std::isfinite(scale), "lightkv::score: scale must be finite, got ", scale);
  LIGHTKV_CHECK(text_rows >= -1, "lightkv::score: text_rows must be >= 0, or -1 when unknown, got ", text_rows);
}

// lightkv::merge (contract in csrc/lightkv.cpp).
inline void check_merge_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& metric,
                             const at::Tensor& importance, const at::Tensor& sizes, const at::Tensor& window_tokens,
                             const at::Tensor& window_offsets, double ratio, int64_t kept, int64_t max_window,
                             const std::optional<at::Tensor>& local_bases) {
  constexpr const char* op = "merge";
  check_same_device(v, k, op, "v");
  check_same_device(metric, k, op, "metric");
  check_same_device(importance, k, op, "importance");
  check_same_device(sizes, k, op, "sizes");
  check_same_device(window_tokens, k, op, "window_tokens");
  check_same_device(window_offsets, k, op, "window_offsets");
  LIGHTKV_CHECK(k.dim() == 4, "lightkv::merge: k must be 4-D (B, H_kv, L, D), got ", k.sizes());
  check_token_dtype(k, op, "k");
  check_shape(v, k.sizes(), op, "v");
  check_dtype(v, k.scalar_type(), op, "v");
  const int64_t batch = k.size(0), tokens = k.size(2);
  LIGHTKV_CHECK(metric.dim() == 4 && metric.size(0) == batch && metric.size(1) == tokens,
                "lightkv::merge: metric must be 4-D (", batch, ", ", tokens, ", G, C), got ",
                metric.sizes());
  LIGHTKV_CHECK(at::isFloatingType(metric.scalar_type()), "lightkv::merge: metric must have a floating dtype, got ",
                metric.scalar_type());
  check_dtype(importance, at::kFloat, op, "importance");
  check_shape(importance, {batch, tokens}, op, "importance");
  check_dtype(sizes, at::kInt, op, "sizes");
  check_shape(sizes, {batch, tokens}, op, "sizes");
  check_dtype(window_tokens, at::kLong, op, "window_tokens");
  check_dtype(window_offsets, at::kLong, op, "window_offsets");
  LIGHTKV_CHECK(window_tokens.dim() == 1 && window_tokens.size(0) == batch * tokens,
                "lightkv::merge: window_tokens must be 1-D with B * L = ", batch * tokens,
                " entries, got ", window_tokens.sizes());
  LIGHTKV_CHECK(window_offsets.dim() == 1 && window_offsets.size(0) >= 1,
                "lightkv::merge: window_offsets must be 1-D (W + 1,), got ", window_offsets.sizes());
  LIGHTKV_CHECK(ratio >= 0.0 && ratio < 1.0, "lightkv::merge: ratio must be in [0, 1), got ", ratio);
  LIGHTKV_CHECK(kept >= 0 && kept <= tokens, "lightkv::merge: kept must be in [0, L = ", tokens, "], got ",
                kept);
  LIGHTKV_CHECK(max_window >= 0, "lightkv::merge: max_window must be >= 0, got ", max_window);
  if (local_bases) {
    check_same_device(*local_bases, k, op, "local_bases");
    check_dtype(*local_bases, at::kLong, op, "local_bases");
    check_shape(*local_bases, {2, batch, tokens}, op, "local_bases");
  }
}

}  // namespace lightkv
