// CPU kernel of lightkv::score (contract: csrc/lightkv.cpp).
//
// Work is split over (image, KV head) items; see score_kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "op_checks.h"

namespace lightkv_cpu {
namespace {

struct Image {
  int64_t batch_row;
  int64_t vis_start;
  int64_t vis_len;
  std::vector<int64_t> counted_text;  // text positions s that are counted (mask True)
  int64_t partial_offset;             // start of this image's (H_kv, vis_len) partial sums
};

struct ImageSet {
  std::vector<Image> images;
  int64_t partial_len = 0;  // total size of the partial sums of all images
  int64_t text_rows = 0;    // sum of the images' text_len (the bound the CUDA backend trusts)
};

ImageSet read_images(const at::Tensor& images, const std::optional<at::Tensor>& text_mask,
                     int64_t batch, int64_t tokens, int64_t text_tokens, int64_t kv_heads) {
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
    LIGHTKV_CHECK(image.batch_row >= 0 && image.batch_row < batch, "lightkv::score: images[", i,
                  "] batch_row ", image.batch_row, " is outside [0, ", batch, ")");
    LIGHTKV_CHECK(image.vis_start >= 0 && image.vis_len >= 0 &&
                      image.vis_len <= tokens - image.vis_start,
                  "lightkv::score: images[", i, "] vision tokens [", image.vis_start, ", ",
                  image.vis_start, " + ", image.vis_len, ") are outside [0, ", tokens, ")");
    LIGHTKV_CHECK(text_start >= 0 && text_len >= 0 && text_len <= text_tokens - text_start,
                  "lightkv::score: images[", i, "] text tokens [", text_start, ", ", text_start,
                  " + ", text_len, ") are outside [0, ", text_tokens, ")");
    result.text_rows += text_len;
    for (int64_t l = image.vis_start; l < image.vis_start + image.vis_len; ++l) {
      auto& flag = covered[static_cast<size_t>(image.batch_row * tokens + l)];
      LIGHTKV_CHECK(flag == 0, "lightkv::score: images overlap at batch row ", image.batch_row,
                    ", token ", l, " (images[", i, "])");
      flag = 1;
    }
    for (int64_t s = text_start; s < text_start + text_len; ++s) {
      if (mask_data == nullptr || mask_data[image.batch_row * mask_stride_b + s * mask_stride_s]) {
        image.counted_text.push_back(s);
      }
    }
    if (!image.counted_text.empty()) result.partial_len += kv_heads * image.vis_len;
    result.images.push_back(std::move(image));
  }
  return result;
}

// Query rows (query head of the group x counted text token) whose logits one GEMM computes:
// bounds the logits buffer of a work item whatever the prompt length.
constexpr int64_t kRowChunk = 256;

template <typename scalar_t>
void copy_to_float(const scalar_t* source, int64_t stride, int64_t count, float* out) {
  if (stride == 1) {  // the common case, kept apart so that it vectorises
    for (int64_t d = 0; d < count; ++d) out[d] = static_cast<float>(source[d]);
  } else {
    for (int64_t d = 0; d < count; ++d) out[d] = static_cast<float>(source[d * stride]);
  }
}

// Per work item (image, KV head): the queries of the whole GQA group against the image's keys.
// logits = scale * queries @ keys^T + log sizes comes from one BLAS GEMM per chunk of rows and
// the softmax from ATen's vectorised kernel, both run inside the parallel loop (so on one
// thread each); the item then sums its probability rows in a fixed order into its own buffer,
// and the buffers are summed KV head by KV head in a fixed order, so the result is bitwise
// identical whatever the number of threads.
template <typename scalar_t>
void score_kernel(const at::Tensor& k, const at::Tensor& text, const ImageSet& image_set,
                  const std::optional<at::Tensor>& sizes, float scale, at::Tensor& importance) {
  const std::vector<Image>& images = image_set.images;
  const int64_t query_heads = text.size(1), kv_heads = k.size(1);
  const int64_t group = query_heads / kv_heads;
  const int64_t dim = k.size(3);
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* text_data = text.const_data_ptr<scalar_t>();
  const int32_t* sizes_data = sizes.has_value() ? sizes->const_data_ptr<int32_t>() : nullptr;
  const int64_t sizes_stride_b = sizes.has_value() ? sizes->stride(0) : 0;
  const int64_t sizes_stride_l = sizes.has_value() ? sizes->stride(1) : 0;
  const auto float_options = k.options().dtype(at::kFloat);

  std::vector<std::pair<int64_t, int64_t>> items;  // (image, KV head)
  for (int64_t i = 0; i < static_cast<int64_t>(images.size()); ++i) {
    if (images[i].counted_text.empty() || images[i].vis_len == 0) continue;
    for (int64_t h = 0; h < kv_heads; ++h) items.emplace_back(i, h);
  }
  std::vector<float> partial(static_cast<size_t>(image_set.partial_len), 0.f);

  int64_t max_tokens = 0, max_rows = 0;
  for (const auto& [image_index, kv_head] : items) {
    const Image& image = images[image_index];
    max_tokens = std::max(max_tokens, image.vis_len);
    max_rows = std::max(max_rows, group * static_cast<int64_t>(image.counted_text.size()));
  }
  max_rows = std::min(max_rows, kRowChunk);

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    // Own float32 copies in a GEMM-ready layout, whatever the input strides and dtype; one set
    // of buffers per thread, viewed at each item's size.
    at::Tensor key_buffer = at::empty({max_tokens * dim}, float_options);
    at::Tensor log_size_buffer = at::empty({max_tokens}, float_options);
    at::Tensor query_buffer = at::empty({max_rows * dim}, float_options);
    at::Tensor logit_buffer = at::empty({max_rows * max_tokens}, float_options);
    at::Tensor prob_buffer = at::empty({max_rows * max_tokens}, float_options);
    for (int64_t item = begin; item < end; ++item) {
      const Image& image = images[items[item].first];
      const int64_t kv_head = items[item].second;
      const int64_t b = image.batch_row;
      const int64_t n = image.vis_len;
      const auto& counted = image.counted_text;
      const int64_t count = static_cast<int64_t>(counted.size());
      const int64_t rows = group * count;  // row r: query head kv_head * group + r / count
      const int64_t chunk = std::min(rows, kRowChunk);
      const at::Tensor keys = key_buffer.narrow(0, 0, n * dim).view({n, dim});
      const at::Tensor log_sizes = log_size_buffer.narrow(0, 0, n).view({1, n});
      const at::Tensor queries = query_buffer.narrow(0, 0, chunk * dim).view({chunk, dim});
      const at::Tensor logits = logit_buffer.narrow(0, 0, chunk * n).view({chunk, n});
      const at::Tensor probs = prob_buffer.narrow(0, 0, chunk * n).view({chunk, n});

      float* keys_data = keys.data_ptr<float>();
      const scalar_t* key_base = k_data + b * k.stride(0) + kv_head * k.stride(1) +
                                 image.vis_start * k.stride(2);
      for (int64_t i = 0; i < n; ++i) {
        copy_to_float(key_base + i * k.stride(2), k.stride(3), dim, keys_data + i * dim);
      }
      // A zero log size adds exactly 0, so one code path serves both cases.
      float* log_sizes_data = log_sizes.data_ptr<float>();
      std::fill(log_sizes_data, log_sizes_data + n, 0.f);
      if (sizes_data != nullptr) {
        for (int64_t i = 0; i < n; ++i) {
          const int32_t size =
              sizes_data[b * sizes_stride_b + (image.vis_start + i) * sizes_stride_l];
          log_sizes_data[i] = std::log(static_cast<float>(size));
        }
      }
      float* acc = partial.data() + image.partial_offset + kv_head * n;
      const at::Tensor keys_t = keys.t();
      for (int64_t first = 0; first < rows; first += chunk) {
        const int64_t block = std::min(chunk, rows - first);
        float* query_rows = queries.data_ptr<float>();
        for (int64_t r = 0; r < block; ++r) {
          const int64_t head = kv_head * group + (first + r) / count;
          const scalar_t* query = text_data + b * text.stride(0) + head * text.stride(1) +
                                  counted[(first + r) % count] * text.stride(2);
          copy_to_float(query, text.stride(3), dim, query_rows + r * dim);
        }
        at::Tensor block_logits = logits.narrow(0, 0, block);
        at::Tensor block_probs = probs.narrow(0, 0, block);
        at::addmm_out(block_logits, log_sizes, queries.narrow(0, 0, block), keys_t, 1.0, scale);
        at::_softmax_out(block_probs, block_logits, 1, false);
        const float* prob_rows = block_probs.const_data_ptr<float>();
        for (int64_t r = 0; r < block; ++r) {
          const float* row = prob_rows + r * n;
          for (int64_t i = 0; i < n; ++i) acc[i] += row[i];
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
        for (int64_t h = 0; h < kv_heads; ++h) total += acc[h * image.vis_len + i];
        row[i] = total / denominator;
      }
    }
  });
}

at::Tensor score_cpu(const at::Tensor& k, const at::Tensor& text, const at::Tensor& images,
                     const std::optional<at::Tensor>& text_mask,
                     const std::optional<at::Tensor>& sizes, double scale, int64_t text_rows) {
  LIGHTKV_CHECK(k.device().is_cpu(), "lightkv::score: k must be a CPU tensor, got ", k.device());
  lightkv::check_score_args(k, text, images, text_mask, sizes, scale, text_rows);
  const int64_t batch = k.size(0), kv_heads = k.size(1), tokens = k.size(2);
  const int64_t text_tokens = text.size(2);
  if (sizes.has_value()) {
    const auto sizes_rows = sizes->accessor<int32_t, 2>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t l = 0; l < tokens; ++l) {
        LIGHTKV_CHECK(sizes_rows[b][l] >= 1, "lightkv::score: sizes must be >= 1, got ",
                      sizes_rows[b][l], " at (", b, ", ", l, ")");
      }
    }
  }

  const ImageSet image_set =
      read_images(images, text_mask, batch, tokens, text_tokens, kv_heads);
  LIGHTKV_CHECK(text_rows < 0 || text_rows >= image_set.text_rows, "lightkv::score: text_rows (", text_rows,
                ") must be at least the images' total text_len (", image_set.text_rows, ")");
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
