// CPU kernel of lightkv::score (contract: csrc/lightkv.cpp).
//
// Work is split over (image, query head) items. Each item writes the sum over its text tokens of
// the softmax rows into its own buffer; the buffers are then summed head by head in a fixed
// order, so the result is bitwise identical whatever the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/common.h"

namespace lightkv_cpu {
namespace {

constexpr const char* kOp = "score";

struct Image {
  int64_t batch_row;
  int64_t vis_start;
  int64_t vis_len;
  std::vector<int64_t> counted_text;  // text positions s that are counted (mask True)
  int64_t partial_offset;             // start of this image's (H_q, vis_len) partial sums
};

struct ImageSet {
  std::vector<Image> images;
  int64_t partial_len = 0;  // total size of the partial sums of all images
};

ImageSet read_images(const at::Tensor& images, const std::optional<at::Tensor>& text_mask,
                     int64_t batch, int64_t tokens, int64_t text_tokens, int64_t query_heads) {
  const auto rows = images.accessor<int64_t, 2>();
  ImageSet result;
  result.images.reserve(images.size(0));
  // Images must not overlap, or two work items would write the same importance entries.
  std::vector<uint8_t> covered(static_cast<size_t>(batch * tokens), 0);
  const bool* mask_data = text_mask.has_value() ? text_mask->const_data_ptr<bool>() : nullptr;
  const int64_t mask_stride_b = text_mask.has_value() ? text_mask->stride(0) : 0;
  const int64_t mask_stride_s = text_mask.has_value() ? text_mask->stride(1) : 0;
  for (int64_t i = 0; i < images.size(0); ++i) {
    Image image{rows[i][0], rows[i][1], rows[i][2], {}, result.partial_len};
    const int64_t text_start = rows[i][3], text_len = rows[i][4];
    TORCH_CHECK(image.batch_row >= 0 && image.batch_row < batch, "lightkv::score: images[", i,
                "] batch_row ", image.batch_row, " is outside [0, ", batch, ")");
    TORCH_CHECK(image.vis_start >= 0 && image.vis_len >= 0 &&
                    image.vis_len <= tokens - image.vis_start,
                "lightkv::score: images[", i, "] vision tokens [", image.vis_start, ", ",
                image.vis_start, " + ", image.vis_len, ") are outside [0, ", tokens, ")");
    TORCH_CHECK(text_start >= 0 && text_len >= 0 && text_len <= text_tokens - text_start,
                "lightkv::score: images[", i, "] text tokens [", text_start, ", ", text_start,
                " + ", text_len, ") are outside [0, ", text_tokens, ")");
    for (int64_t l = image.vis_start; l < image.vis_start + image.vis_len; ++l) {
      auto& flag = covered[static_cast<size_t>(image.batch_row * tokens + l)];
      TORCH_CHECK(flag == 0, "lightkv::score: images overlap at batch row ", image.batch_row,
                  ", token ", l, " (images[", i, "])");
      flag = 1;
    }
    for (int64_t s = text_start; s < text_start + text_len; ++s) {
      if (mask_data == nullptr || mask_data[image.batch_row * mask_stride_b + s * mask_stride_s]) {
        image.counted_text.push_back(s);
      }
    }
    if (!image.counted_text.empty()) result.partial_len += query_heads * image.vis_len;
    result.images.push_back(std::move(image));
  }
  return result;
}

constexpr int64_t kQueryBlock = 4;
constexpr int64_t kKeyBlock = 16;

// dots[q * n + i] = <query q, key i> for q < kQueryBlock, i < n, each summed over d in
// increasing order (so the result does not depend on the blocking). queries_t is the block of
// queries interleaved, (dim, kQueryBlock); keys_t the transposed keys, (dim, padded_n),
// zero-padded to a multiple of kKeyBlock columns. One accumulator array per query keeps the
// inner loop a plain vectorisable broadcast-multiply-add.
void block_dots(const float* queries_t, const float* keys_t, int64_t dim, int64_t n,
                int64_t padded_n, float* dots) {
  static_assert(kQueryBlock == 4, "block_dots keeps one accumulator array per query");
  for (int64_t first = 0; first < padded_n; first += kKeyBlock) {
    float acc0[kKeyBlock] = {}, acc1[kKeyBlock] = {}, acc2[kKeyBlock] = {}, acc3[kKeyBlock] = {};
    for (int64_t d = 0; d < dim; ++d) {
      const float* keys = keys_t + d * padded_n + first;
      const float* x = queries_t + d * kQueryBlock;
      for (int64_t u = 0; u < kKeyBlock; ++u) {
        acc0[u] += x[0] * keys[u];
        acc1[u] += x[1] * keys[u];
        acc2[u] += x[2] * keys[u];
        acc3[u] += x[3] * keys[u];
      }
    }
    const int64_t valid = std::min(kKeyBlock, n - first);
    std::copy(acc0, acc0 + valid, dots + first);
    std::copy(acc1, acc1 + valid, dots + n + first);
    std::copy(acc2, acc2 + valid, dots + 2 * n + first);
    std::copy(acc3, acc3 + valid, dots + 3 * n + first);
  }
}

// acc += softmax(logits); logits is overwritten.
void accumulate_softmax(float* logits, int64_t n, float* acc) {
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) max_logit = std::max(max_logit, logits[i]);
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    logits[i] = std::exp(logits[i] - max_logit);
    total += logits[i];
  }
  for (int64_t i = 0; i < n; ++i) acc[i] += logits[i] / total;
}

template <typename scalar_t>
void score_kernel(const at::Tensor& k, const at::Tensor& text, const ImageSet& image_set,
                  const std::optional<at::Tensor>& sizes, float scale, at::Tensor& importance) {
  const std::vector<Image>& images = image_set.images;
  const int64_t query_heads = text.size(1);
  const int64_t group = query_heads / k.size(1);
  const int64_t dim = k.size(3);
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* text_data = text.const_data_ptr<scalar_t>();
  const int32_t* sizes_data = sizes.has_value() ? sizes->const_data_ptr<int32_t>() : nullptr;
  const int64_t sizes_stride_b = sizes.has_value() ? sizes->stride(0) : 0;
  const int64_t sizes_stride_l = sizes.has_value() ? sizes->stride(1) : 0;

  std::vector<std::pair<int64_t, int64_t>> items;  // (image, query head)
  for (int64_t i = 0; i < static_cast<int64_t>(images.size()); ++i) {
    if (images[i].counted_text.empty() || images[i].vis_len == 0) continue;
    for (int64_t h = 0; h < query_heads; ++h) items.emplace_back(i, h);
  }
  std::vector<float> partial(static_cast<size_t>(image_set.partial_len), 0.f);

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys_t, log_sizes, logits, queries_t;
    for (int64_t item = begin; item < end; ++item) {
      const Image& image = images[items[item].first];
      const int64_t head = items[item].second;
      const int64_t b = image.batch_row;
      const int64_t n = image.vis_len;
      const int64_t padded_n = (n + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
      keys_t.assign(static_cast<size_t>(dim * padded_n), 0.f);
      log_sizes.assign(static_cast<size_t>(n), 0.f);
      logits.resize(static_cast<size_t>(kQueryBlock * n));
      const scalar_t* key_base = k_data + b * k.stride(0) + (head / group) * k.stride(1) +
                                 image.vis_start * k.stride(2);
      // Transpose a tile of kKeyBlock keys at a time: reads kKeyBlock streams, writes rows.
      for (int64_t first = 0; first < n; first += kKeyBlock) {
        const int64_t valid = std::min(kKeyBlock, n - first);
        for (int64_t d = 0; d < dim; ++d) {
          float* row = keys_t.data() + d * padded_n + first;
          const scalar_t* column = key_base + first * k.stride(2) + d * k.stride(3);
          for (int64_t u = 0; u < valid; ++u) row[u] = static_cast<float>(column[u * k.stride(2)]);
        }
      }
      if (sizes_data != nullptr) {
        for (int64_t i = 0; i < n; ++i) {
          const int32_t size =
              sizes_data[b * sizes_stride_b + (image.vis_start + i) * sizes_stride_l];
          log_sizes[i] = std::log(static_cast<float>(size));
        }
      }
      float* acc = partial.data() + image.partial_offset + head * n;
      const auto& counted = image.counted_text;
      const int64_t count = static_cast<int64_t>(counted.size());
      for (int64_t first = 0; first < count; first += kQueryBlock) {
        const int64_t block = std::min<int64_t>(kQueryBlock, count - first);
        queries_t.assign(static_cast<size_t>(kQueryBlock * dim), 0.f);
        for (int64_t q = 0; q < block; ++q) {
          const scalar_t* query = text_data + b * text.stride(0) + head * text.stride(1) +
                                  counted[first + q] * text.stride(2);
          for (int64_t d = 0; d < dim; ++d) {
            queries_t[d * kQueryBlock + q] = static_cast<float>(query[d * text.stride(3)]);
          }
        }
        block_dots(queries_t.data(), keys_t.data(), dim, n, padded_n, logits.data());
        for (int64_t q = 0; q < block; ++q) {
          float* row = logits.data() + q * n;
          for (int64_t i = 0; i < n; ++i) row[i] = scale * row[i] + log_sizes[i];
          accumulate_softmax(row, n, acc);
        }
      }
    }
  });

  float* out = importance.data_ptr<float>();
  const int64_t tokens = importance.size(1);
  at::parallel_for(0, static_cast<int64_t>(images.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const Image& image = images[idx];
      float* row = out + image.batch_row * tokens + image.vis_start;
      if (image.counted_text.empty()) {
        const float uniform = 1.f / static_cast<float>(image.vis_len);
        for (int64_t i = 0; i < image.vis_len; ++i) row[i] = uniform;
        continue;
      }
      const float denominator =
          static_cast<float>(query_heads * static_cast<int64_t>(image.counted_text.size()));
      const float* acc = partial.data() + image.partial_offset;
      for (int64_t i = 0; i < image.vis_len; ++i) {
        float total = 0.f;
        for (int64_t h = 0; h < query_heads; ++h) total += acc[h * image.vis_len + i];
        row[i] = total / denominator;
      }
    }
  });
}

at::Tensor score_cpu(const at::Tensor& k, const at::Tensor& text, const at::Tensor& images,
                     const std::optional<at::Tensor>& text_mask,
                     const std::optional<at::Tensor>& sizes, double scale) {
  check_cpu(k, kOp, "k");
  check_cpu(text, kOp, "text");
  check_cpu(images, kOp, "images");
  TORCH_CHECK(k.dim() == 4, "lightkv::score: k must be 4-D (B, H_kv, L, D), got ", k.sizes());
  TORCH_CHECK(text.dim() == 4, "lightkv::score: text must be 4-D (B, H_q, S, D), got ",
              text.sizes());
  check_token_dtype(k, kOp, "k");
  check_dtype(text, k.scalar_type(), kOp, "text");
  const int64_t batch = k.size(0), kv_heads = k.size(1), tokens = k.size(2), dim = k.size(3);
  const int64_t query_heads = text.size(1), text_tokens = text.size(2);
  TORCH_CHECK(text.size(0) == batch && text.size(3) == dim, "lightkv::score: text must be (",
              batch, ", H_q, S, ", dim, ") to match k ", k.sizes(), ", got ", text.sizes());
  TORCH_CHECK(kv_heads > 0 && query_heads > 0 && query_heads % kv_heads == 0,
              "lightkv::score: text heads (", query_heads, ") must be a positive multiple of k "
              "heads (", kv_heads, ")");
  TORCH_CHECK(images.dim() == 2 && images.size(1) == 5,
              "lightkv::score: images must be (I, 5), got ", images.sizes());
  check_dtype(images, at::kLong, kOp, "images");
  if (text_mask.has_value()) {
    check_cpu(*text_mask, kOp, "text_mask");
    check_dtype(*text_mask, at::kBool, kOp, "text_mask");
    check_shape(*text_mask, {batch, text_tokens}, kOp, "text_mask");
  }
  if (sizes.has_value()) {
    check_cpu(*sizes, kOp, "sizes");
    check_dtype(*sizes, at::kInt, kOp, "sizes");
    check_shape(*sizes, {batch, tokens}, kOp, "sizes");
    const auto sizes_rows = sizes->accessor<int32_t, 2>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t l = 0; l < tokens; ++l) {
        TORCH_CHECK(sizes_rows[b][l] >= 1, "lightkv::score: sizes must be >= 1, got ",
                    sizes_rows[b][l], " at (", b, ", ", l, ")");
      }
    }
  }
  TORCH_CHECK(std::isfinite(scale), "lightkv::score: scale must be finite, got ", scale);

  const ImageSet image_set =
      read_images(images, text_mask, batch, tokens, text_tokens, query_heads);
  at::Tensor importance = at::zeros({batch, tokens}, k.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(),
                                  "lightkv_score_cpu", [&] {
    score_kernel<scalar_t>(k, text, image_set, sizes, static_cast<float>(scale), importance);
  });
  return importance;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightkv, CPU, m) { m.impl("score", &score_cpu); }

}  // namespace lightkv_cpu
