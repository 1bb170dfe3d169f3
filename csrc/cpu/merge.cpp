// CPU kernel of lightkv::merge (contract: csrc/lightkv.cpp).
//
// Three passes, each parallel and free of cross-thread reductions, so the outputs are bitwise
// identical whatever the number of threads:
//   1. per window (tiles of srcs): bipartite matching, decided in float64 (see match_windows),
//      records for every merged src its dst token;
//   2. per batch row: output slots of kept tokens (prefix count), assignment, group member lists,
//      sizes_out;
//   3. per output token: weighted average of its group (float32), or a bitwise copy.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "op_checks.h"

namespace lightkv_cpu {
namespace {

constexpr int64_t kNotMerged = -1;

// Float64 dot products with a fixed set of partial sums: vectorisable, and the summation order
// depends only on n, so results never depend on threading. The blocked variant computes several
// dot products against one shared vector at once, each summed exactly as dot_double sums it.
constexpr int kDoubleLanes = 4;
constexpr int kDstBlock = 4;  // dsts compared with one src at a time

inline double combine_lanes(const double* lanes) {
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

template <typename stored_t>
inline double dot_double(const stored_t* a, const stored_t* b, int64_t n) {
  double lanes[kDoubleLanes] = {};
  int64_t j = 0;
  for (; j + kDoubleLanes <= n; j += kDoubleLanes) {
    for (int u = 0; u < kDoubleLanes; ++u) {
      lanes[u] += static_cast<double>(a[j + u]) * static_cast<double>(b[j + u]);
    }
  }
  double sum = combine_lanes(lanes);
  for (; j < n; ++j) sum += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return sum;
}

// out[q] = dot_double(a, b[q], n) for q < kDstBlock.
template <typename stored_t>
inline void dot_double_block(const stored_t* a, const stored_t* const* b, int64_t n, double* out) {
  double lanes[kDstBlock][kDoubleLanes] = {};
  int64_t j = 0;
  for (; j + kDoubleLanes <= n; j += kDoubleLanes) {
    for (int u = 0; u < kDoubleLanes; ++u) {
      const double x = static_cast<double>(a[j + u]);
      for (int q = 0; q < kDstBlock; ++q) lanes[q][u] += x * static_cast<double>(b[q][j + u]);
    }
  }
  for (int q = 0; q < kDstBlock; ++q) {
    double sum = combine_lanes(lanes[q]);
    for (int64_t t = j; t < n; ++t) {
      sum += static_cast<double>(a[t]) * static_cast<double>(b[q][t]);
    }
    out[q] = sum;
  }
}

int64_t merge_count(double ratio, int64_t window_len) {
  const auto wanted =
      static_cast<int64_t>(std::floor(ratio * static_cast<double>(window_len) + 1e-6));
  return std::min(wanted, window_len / 2);
}

// Checks that every token of every row appears exactly once, that a window stays inside one
// batch row, and that a window lists its tokens in increasing l.
void check_windows(const int64_t* window_tokens, const int64_t* window_offsets, int64_t windows,
                   int64_t batch, int64_t tokens, int64_t max_window) {
  const int64_t total = batch * tokens;
  LIGHTKV_CHECK(window_offsets[0] == 0, "lightkv::merge: window_offsets[0] must be 0, got ",
                window_offsets[0]);
  LIGHTKV_CHECK(window_offsets[windows] == total, "lightkv::merge: window_offsets[-1] must be ",
                total, " (B * L), got ", window_offsets[windows]);
  std::vector<uint8_t> seen(static_cast<size_t>(total), 0);
  for (int64_t w = 0; w < windows; ++w) {
    const int64_t begin = window_offsets[w], end = window_offsets[w + 1];
    LIGHTKV_CHECK(begin <= end, "lightkv::merge: window_offsets must be non-decreasing, window ", w,
                  " has offsets ", begin, " > ", end);
    LIGHTKV_CHECK(end - begin <= max_window, "lightkv::merge: window ", w, " has ", end - begin,
                  " tokens, more than max_window = ", max_window);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t token = window_tokens[p];
      LIGHTKV_CHECK(token >= 0 && token < total, "lightkv::merge: window_tokens[", p, "] = ", token,
                    " is outside [0, ", total, ")");
      LIGHTKV_CHECK(!seen[static_cast<size_t>(token)], "lightkv::merge: token ", token,
                    " appears more than once in window_tokens");
      seen[static_cast<size_t>(token)] = 1;
      if (p > begin) {
        const int64_t previous = window_tokens[p - 1];
        LIGHTKV_CHECK(token / tokens == previous / tokens, "lightkv::merge: window ", w,
                      " mixes batch rows ", previous / tokens, " and ", token / tokens);
        LIGHTKV_CHECK(token > previous, "lightkv::merge: window ", w,
                      " must list its tokens in increasing l, got ", previous, " then ", token);
      }
    }
  }
}

// Srcs of one window compared against all its dsts in one work item: bounds the float32
// similarity tile (kSrcTile x dsts) whatever the window size.
constexpr int64_t kSrcTile = 256;
// Windows with fewer dsts are matched with exact float64 dot products only.
constexpr int64_t kMinScreenedDsts = 8;

// Relative error bound of a float32 dot product of n terms, however it is summed:
// |fl(<a, b>) - <a, b>| <= gamma_n * sum |a_i b_i| <= gamma_n * |a| |b|.
double float_dot_error_bound(int64_t n) {
  const double unit_roundoff = std::ldexp(1.0, -24);
  const double n_u = static_cast<double>(n) * unit_roundoff;
  return n_u < 0.5 ? n_u / (1.0 - n_u) : std::numeric_limits<double>::infinity();
}

// Pass 1. merge_target[g] = flat id of the dst that token g merges into, or kNotMerged.
//
// Every similarity that decides something is the float64 one, dot_double(a, b) / (|a| |b| +
// 1e-8), so decisions do not depend on threads, tiling or BLAS. To avoid computing all of them,
// a float32 metric is first screened with a float32 GEMM per tile of srcs: the float32
// similarity of a pair is within tolerance of its float64 one (error bound above, the norms
// are the same float64 ones), so only dsts whose screened similarity is within twice the
// tolerance of the best screened one can be a src's best dst; those few are recomputed in
// float64. Float64 metrics and small windows skip the screening.
template <typename metric_t>
void match_windows(const at::Tensor& metric, const int64_t* window_tokens,
                   const int64_t* window_offsets, int64_t windows, double ratio,
                   std::vector<int64_t>& merge_target) {
  // float and half metrics convert exactly to float, and float products are exact in double.
  using stored_t = std::conditional_t<std::is_same_v<metric_t, double>, double, float>;
  constexpr bool screened = std::is_same_v<stored_t, float>;
  const int64_t tokens = metric.size(1), heads = metric.size(2), channels = metric.size(3);
  const int64_t width = heads * channels;
  const metric_t* data = metric.const_data_ptr<metric_t>();
  const int64_t stride_b = metric.stride(0), stride_l = metric.stride(1);
  const int64_t stride_g = metric.stride(2), stride_c = metric.stride(3);
  const double tolerance = 2.0 * float_dot_error_bound(width) + 1e-30;
  const bool screening = screened && std::isfinite(tolerance) && tolerance < 0.01;

  // Windows that merge something, and the window of each position of window_tokens.
  std::vector<int64_t> active;
  std::vector<int64_t> window_of(static_cast<size_t>(window_offsets[windows]), -1);
  for (int64_t w = 0; w < windows; ++w) {
    if (merge_count(ratio, window_offsets[w + 1] - window_offsets[w]) == 0) continue;
    active.push_back(w);
    std::fill(window_of.begin() + window_offsets[w], window_of.begin() + window_offsets[w + 1], w);
  }
  if (active.empty()) return;

  // Metric vectors of the active windows' tokens, row p = token window_tokens[p] (so a window's
  // srcs and dsts are every other row), and their float64 norms. Its own tensor, so that BLAS
  // sees 64-byte aligned rows whatever the input's layout.
  const int64_t total = window_offsets[windows];
  at::Tensor vectors = at::empty({total, width}, metric.options().dtype(
                                                     c10::CppTypeToScalarType<stored_t>::value));
  stored_t* vectors_data = vectors.data_ptr<stored_t>();
  std::vector<double> norms(static_cast<size_t>(total), 0.0);
  at::parallel_for(0, total, 64, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      if (window_of[p] < 0) continue;
      const int64_t token = window_tokens[p];
      const metric_t* base = data + (token / tokens) * stride_b + (token % tokens) * stride_l;
      stored_t* out = vectors_data + p * width;
      for (int64_t g = 0; g < heads; ++g) {
        const metric_t* head = base + g * stride_g;
        stored_t* head_out = out + g * channels;
        for (int64_t c = 0; c < channels; ++c) head_out[c] = static_cast<stored_t>(head[c * stride_c]);
      }
      norms[p] = std::sqrt(dot_double(out, out, width));
    }
  });

  // Work items: a tile of one window's srcs. Finer tiles when there are few windows keep all
  // threads busy; the results do not depend on the tiling.
  struct Tile {
    int64_t window, first_src, src_count;
  };
  std::vector<Tile> tiles;
  const int64_t threads = at::get_num_threads();
  for (const int64_t w : active) {
    const int64_t src_count = (window_offsets[w + 1] - window_offsets[w] + 1) / 2;
    const int64_t tile = std::min(kSrcTile, std::max<int64_t>(32, (src_count + threads - 1) / threads));
    for (int64_t first = 0; first < src_count; first += tile) {
      tiles.push_back({w, first, std::min(tile, src_count - first)});
    }
  }

  // best_score / best_dst of the src at window position 2 i, stored at window offset + i.
  std::vector<double> best_scores(static_cast<size_t>(total));
  std::vector<int64_t> best_dsts(static_cast<size_t>(total));
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    at::Tensor screen;  // (srcs, dsts) float32 dot products of the tile
    for (int64_t t = begin; t < end; ++t) {
      const Tile& tile = tiles[t];
      const int64_t offset = window_offsets[tile.window];
      const int64_t* window = window_tokens + offset;
      const int64_t dst_count = (window_offsets[tile.window + 1] - offset) / 2;
      const stored_t* window_vectors = vectors_data + offset * width;
      const double* window_norms = norms.data() + offset;
      const bool screen_tile = screening && dst_count >= kMinScreenedDsts;
      if (screen_tile) {
        // Row stride 2 * width: srcs are the even rows, dsts the odd rows of the window.
        auto rows = [&](int64_t first_row, int64_t count) {
          return at::from_blob(const_cast<stored_t*>(window_vectors + first_row * width),
                               {count, width}, {2 * width, 1}, vectors.options());
        };
        screen = at::mm(rows(2 * tile.first_src, tile.src_count), rows(1, dst_count).t());
      }
      std::vector<int64_t> candidates;
      for (int64_t i = tile.first_src; i < tile.first_src + tile.src_count; ++i) {
        const stored_t* src = window_vectors + 2 * i * width;
        const double src_norm = window_norms[2 * i];
        auto similarity = [&](int64_t j, double dot) {
          const double value = dot / (src_norm * window_norms[2 * j + 1] + 1e-8);
          LIGHTKV_CHECK(!std::isnan(value), "lightkv::merge: metric must be finite; the "
                        "similarity of tokens ", window[2 * i], " and ", window[2 * j + 1],
                        " is NaN");
          return value;
        };
        double best_score = 0.0;
        int64_t best_dst = -1;
        auto consider = [&](int64_t j, double value) {
          if (best_dst < 0 || value > best_score) {  // strict: ties keep the lowest dst
            best_score = value;
            best_dst = j;
          }
        };
        bool exact_all = !screen_tile;
        if (screen_tile) {
          const float* dots = screen.const_data_ptr<float>() + (i - tile.first_src) * dst_count;
          double best_screened = -std::numeric_limits<double>::infinity();
          for (int64_t j = 0; j < dst_count; ++j) {
            const double value =
                static_cast<double>(dots[j]) / (src_norm * window_norms[2 * j + 1] + 1e-8);
            if (!std::isfinite(value)) {  // float32 overflow or NaN: decide in float64
              exact_all = true;
              break;
            }
            best_screened = std::max(best_screened, value);
          }
          if (!exact_all) {
            candidates.clear();
            for (int64_t j = 0; j < dst_count; ++j) {
              const double value =
                  static_cast<double>(dots[j]) / (src_norm * window_norms[2 * j + 1] + 1e-8);
              if (value >= best_screened - 2.0 * tolerance) candidates.push_back(j);
            }
            for (const int64_t j : candidates) {
              consider(j, similarity(j, dot_double(src, window_vectors + (2 * j + 1) * width,
                                                   width)));
            }
          }
        }
        if (exact_all) {
          int64_t j = 0;
          for (; j + kDstBlock <= dst_count; j += kDstBlock) {
            const stored_t* dst_rows[kDstBlock];
            for (int q = 0; q < kDstBlock; ++q) {
              dst_rows[q] = window_vectors + (2 * (j + q) + 1) * width;
            }
            double dots[kDstBlock];
            dot_double_block(src, dst_rows, width, dots);
            for (int q = 0; q < kDstBlock; ++q) consider(j + q, similarity(j + q, dots[q]));
          }
          for (; j < dst_count; ++j) {
            consider(j, similarity(j, dot_double(src, window_vectors + (2 * j + 1) * width,
                                                 width)));
          }
        }
        best_scores[static_cast<size_t>(offset + i)] = best_score;
        best_dsts[static_cast<size_t>(offset + i)] = best_dst;
      }
    }
  });

  at::parallel_for(0, static_cast<int64_t>(active.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> src_order;
    for (int64_t entry = begin; entry < end; ++entry) {
      const int64_t w = active[entry];
      const int64_t offset = window_offsets[w];
      const int64_t* window = window_tokens + offset;
      const int64_t n = window_offsets[w + 1] - offset;
      const int64_t merged = merge_count(ratio, n);
      const double* scores = best_scores.data() + offset;
      src_order.resize(static_cast<size_t>((n + 1) / 2));
      std::iota(src_order.begin(), src_order.end(), int64_t{0});
      std::partial_sort(src_order.begin(), src_order.begin() + merged, src_order.end(),
                        [&](int64_t a, int64_t b) {
                          if (scores[a] != scores[b]) return scores[a] > scores[b];
                          return a < b;
                        });
      for (int64_t rank = 0; rank < merged; ++rank) {
        const int64_t i = src_order[rank];
        merge_target[static_cast<size_t>(window[2 * i])] = window[2 * best_dsts[offset + i] + 1];
      }
    }
  });
}

// Members of each output token's group, anchor first, then the merged srcs in increasing l.
struct Groups {
  std::vector<int64_t> begin;    // (B * M) offsets into members
  std::vector<int64_t> count;    // (B * M)
  std::vector<int64_t> members;  // (B * L) row-local token positions l
};

// Pass 2.
Groups assign_slots(const std::vector<int64_t>& merge_target, const at::Tensor& sizes,
                    int64_t batch, int64_t tokens, int64_t kept, at::Tensor& sizes_out,
                    at::Tensor& index, at::Tensor& assignment) {
  Groups groups;
  groups.begin.assign(static_cast<size_t>(batch * kept), 0);
  groups.count.assign(static_cast<size_t>(batch * kept), 0);
  groups.members.assign(static_cast<size_t>(batch * tokens), 0);
  const int32_t* sizes_data = sizes.const_data_ptr<int32_t>();
  const int64_t sizes_stride_b = sizes.stride(0), sizes_stride_l = sizes.stride(1);
  int32_t* sizes_out_data = sizes_out.data_ptr<int32_t>();
  int64_t* index_data = index.data_ptr<int64_t>();
  int64_t* assignment_data = assignment.data_ptr<int64_t>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cursor;
    for (int64_t b = begin; b < end; ++b) {
      int64_t* row_assignment = assignment_data + b * tokens;
      int64_t* row_index = index_data + b * kept;
      int64_t* row_count = groups.count.data() + b * kept;
      int64_t* row_begin = groups.begin.data() + b * kept;
      const int64_t* row_target = merge_target.data() + b * tokens;
      int64_t slots = 0;
      for (int64_t l = 0; l < tokens; ++l) {
        if (row_target[l] != kNotMerged) continue;
        LIGHTKV_CHECK(slots < kept, "lightkv::merge: batch row ", b, " keeps more than kept = ",
                      kept, " tokens");
        row_assignment[l] = slots;
        row_index[slots] = l;
        row_count[slots] = 1;
        ++slots;
      }
      LIGHTKV_CHECK(slots == kept, "lightkv::merge: batch row ", b, " keeps ", slots,
                    " tokens, expected kept = ", kept);
      for (int64_t l = 0; l < tokens; ++l) {
        if (row_target[l] == kNotMerged) continue;
        // A merge target is always a dst, and dsts are never merged, so its slot is set.
        const int64_t slot = row_assignment[row_target[l] - b * tokens];
        row_assignment[l] = slot;
        ++row_count[slot];
      }
      cursor.resize(static_cast<size_t>(kept));
      int64_t offset = b * tokens;
      for (int64_t m = 0; m < kept; ++m) {
        row_begin[m] = offset;
        groups.members[static_cast<size_t>(offset)] = row_index[m];
        cursor[m] = offset + 1;
        offset += row_count[m];
      }
      std::vector<int64_t> size_sums(static_cast<size_t>(kept), 0);
      for (int64_t l = 0; l < tokens; ++l) {
        const int64_t slot = row_assignment[l];
        size_sums[slot] += sizes_data[b * sizes_stride_b + l * sizes_stride_l];
        if (row_target[l] != kNotMerged) groups.members[static_cast<size_t>(cursor[slot]++)] = l;
      }
      for (int64_t m = 0; m < kept; ++m) {
        LIGHTKV_CHECK(size_sums[m] <= std::numeric_limits<int32_t>::max(),
                      "lightkv::merge: merged size ", size_sums[m], " does not fit in int32");
        sizes_out_data[b * kept + m] = static_cast<int32_t>(size_sums[m]);
      }
    }
  });
  return groups;
}

// Pass 3, for one of k / v.
template <typename scalar_t>
void average_groups(const at::Tensor& input, const at::Tensor& importance, const Groups& groups,
                    int64_t kept, at::Tensor& output) {
  const int64_t heads = input.size(1), dim = input.size(3);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.data_ptr<scalar_t>();
  const float* weights_data = importance.const_data_ptr<float>();
  const int64_t in_b = input.stride(0), in_h = input.stride(1);
  const int64_t in_l = input.stride(2), in_d = input.stride(3);
  const int64_t out_b = output.stride(0), out_h = output.stride(1);
  const int64_t out_m = output.stride(2), out_d = output.stride(3);
  const int64_t w_b = importance.stride(0), w_l = importance.stride(1);
  const int64_t outputs = output.size(0) * kept;
  const bool unit_stride = in_d == 1 && out_d == 1;

  at::parallel_for(0, outputs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights;
    std::vector<float> acc(static_cast<size_t>(dim));
    for (int64_t slot = begin; slot < end; ++slot) {
      const int64_t b = slot / kept, m = slot % kept;
      const int64_t* members = groups.members.data() + groups.begin[slot];
      const int64_t size = groups.count[slot];
      const scalar_t* in_row = in + b * in_b;
      scalar_t* out_token = out + b * out_b + m * out_m;
      if (size == 1) {
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* src = in_row + h * in_h + members[0] * in_l;
          scalar_t* dst = out_token + h * out_h;
          if (unit_stride) {
            std::copy(src, src + dim, dst);
          } else {
            for (int64_t d = 0; d < dim; ++d) dst[d * out_d] = src[d * in_d];
          }
        }
        continue;
      }
      weights.resize(static_cast<size_t>(size));
      float total = 0.f;
      for (int64_t j = 0; j < size; ++j) {
        weights[j] = weights_data[b * w_b + members[j] * w_l];
        total += weights[j];
      }
      if (total == 0.f) {  // all-zero weights: plain mean
        std::fill(weights.begin(), weights.end(), 1.f);
        total = static_cast<float>(size);
      }
      for (int64_t h = 0; h < heads; ++h) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < size; ++j) {
          const scalar_t* src = in_row + h * in_h + members[j] * in_l;
          const float weight = weights[j];
          if (unit_stride) {
            for (int64_t d = 0; d < dim; ++d) acc[d] += weight * static_cast<float>(src[d]);
          } else {
            for (int64_t d = 0; d < dim; ++d) acc[d] += weight * static_cast<float>(src[d * in_d]);
          }
        }
        scalar_t* dst = out_token + h * out_h;
        for (int64_t d = 0; d < dim; ++d) dst[d * out_d] = static_cast<scalar_t>(acc[d] / total);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_cpu(
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& metric,
    const at::Tensor& importance, const at::Tensor& sizes, const at::Tensor& window_tokens,
    const at::Tensor& window_offsets, double ratio, int64_t kept, int64_t max_window, bool token_major,
    const std::optional<at::Tensor>& local_bases) {
  LIGHTKV_CHECK(k.device().is_cpu(), "lightkv::merge: k must be a CPU tensor, got ", k.device());
  lightkv::check_merge_args(k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept,
                            max_window, local_bases);
  const int64_t batch = k.size(0), heads = k.size(1), tokens = k.size(2), dim = k.size(3);

  const auto weight_rows = importance.accessor<float, 2>();
  const auto size_rows = sizes.accessor<int32_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t l = 0; l < tokens; ++l) {
      const float weight = weight_rows[b][l];
      LIGHTKV_CHECK(std::isfinite(weight) && weight >= 0.f, "lightkv::merge: importance must be "
                    "finite and non-negative, got ", weight, " at (", b, ", ", l, ")");
      LIGHTKV_CHECK(size_rows[b][l] >= 1, "lightkv::merge: sizes must be >= 1, got ",
                    size_rows[b][l], " at (", b, ", ", l, ")");
    }
  }
  const at::Tensor tokens_list = window_tokens.contiguous();
  const at::Tensor offsets_list = window_offsets.contiguous();
  const int64_t windows = offsets_list.size(0) - 1;
  check_windows(tokens_list.const_data_ptr<int64_t>(), offsets_list.const_data_ptr<int64_t>(),
                windows, batch, tokens, max_window);

  std::vector<int64_t> merge_target(static_cast<size_t>(batch * tokens), kNotMerged);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(),
                                  "lightkv_match_cpu", [&] {
    match_windows<scalar_t>(metric, tokens_list.const_data_ptr<int64_t>(),
                            offsets_list.const_data_ptr<int64_t>(), windows, ratio, merge_target);
  });

  const auto index_options = k.options().dtype(at::kLong);
  at::Tensor sizes_out = at::empty({batch, kept}, k.options().dtype(at::kInt));
  at::Tensor index = at::empty({batch, kept}, index_options);
  at::Tensor assignment = at::empty({batch, tokens}, index_options);
  const Groups groups =
      assign_slots(merge_target, sizes, batch, tokens, kept, sizes_out, index, assignment);

  auto allocate = [&]() {
    if (token_major) return at::empty({batch, kept, heads, dim}, k.options()).permute({0, 2, 1, 3});
    return at::empty({batch, heads, kept, dim}, k.options());
  };
  at::Tensor k_out = allocate();
  at::Tensor v_out = allocate();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(),
                                  "lightkv_merge_cpu", [&] {
    average_groups<scalar_t>(k, importance, groups, kept, k_out);
    average_groups<scalar_t>(v, importance, groups, kept, v_out);
  });
  if (local_bases) {  // image-local numbers (the groups above were built from the row's)
    index.sub_(local_bases->select(0, 0).gather(1, index));
    assignment.sub_(local_bases->select(0, 1));
  }
  return {k_out, v_out, sizes_out, index, assignment};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightkv, CPU, m) { m.impl("merge", &merge_cpu); }

}  // namespace lightkv_cpu
