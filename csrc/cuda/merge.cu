// Segmented window merge (contract: `merge` in csrc/lightkv.cpp), all windows of all rows in
// one pass of kernels:
//   1. window_tiles_kernel + offsets scan: 64-src tiles of every window that merges anything.
//   2. norms_kernel: |metric| per token in float64 (one warp per token).
//   3. init_slots_kernel: sort keys -inf, window position of every slot of window_tokens.
//   4. similarity_kernel: per (window, 64-src tile, dst range) item, loops over the range's dsts
//      in 64-dst tiles (so any window size works), float64 tile products (4 x 4 per thread,
//      features in chunks of 16 through shared memory), cosine, best dst per src (ties: lowest
//      dst) of the range. The windows' dsts are cut into `dst_split` ranges (a shape-only choice)
//      when there are too few src tiles to fill the GPU; best_of_ranges_kernel then picks the
//      best of the ranges in range order, which is the same lowest-dst maximum, and writes the
//      src's score as its sort key.
//   5. cub::DeviceSegmentedSort::StableSortPairsDescending per window: srcs by score, ties in
//      window order (stable), dsts (-inf) last.
//   6. select_kernel: the first r sorted entries of each window are merged: merged_into[src] = dst.
//   7. kept flags -> cub::DeviceScan::ExclusiveSum -> output slot of every kept token; index,
//      assignment and a (slot, token) key per token.
//   8. cub::DeviceRadixSort::SortPairs on (slot, token): each group's members contiguous and in
//      increasing token order; group_bounds_kernel finds each group's range.
//   9. merge_values_kernel: one block per (output slot, element chunk): float32 weighted sum of the
//      members in that fixed order; single-member groups are copied bitwise. 16-byte vectors
//      where the layout allows.
// No float atomics anywhere: the result is bitwise reproducible.
#include <cub/block/block_reduce.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>

#include <algorithm>
#include <climits>
#include <cmath>

#include "common.cuh"

namespace lightkv_cuda {
namespace {

using detail::ceil_div;
using detail::find_segment;
using detail::to_double;
using detail::to_float;

constexpr int kTile = 64;     // srcs per block tile, dsts per inner tile
constexpr int kChunkF = 16;   // metric features staged in shared memory per step
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 similarities each
constexpr int kMicro = 4;
constexpr int kSide = 16;
constexpr int kMergeThreads = 128;
constexpr int64_t kMaxGrid = 1 << 20;
constexpr int64_t kMaxSimilarityGrid = 1 << 16;
constexpr int64_t kTargetSimilarityItems = 1024;  // dst ranges aim at this many work items
constexpr int64_t kMaxDstSplit = 64;
constexpr int64_t kMaxRangeBestBytes = int64_t{256} << 20;

struct Params {
  const void* metric;
  int64_t metric_stride[4];
  int64_t metric_inner;  // C (features are f = g * C + c)
  int64_t features;      // G * C
  const int64_t* window_tokens;
  const int64_t* window_offsets;
  int64_t num_windows;
  int64_t total;  // window tokens
  int64_t L;
  double ratio;
  const int64_t* tile_offsets;
  const double* norms;
  int64_t dst_split;
  double* range_best;         // (dst_split, total): best similarity of the range, per src slot
  int32_t* range_best_dst;    // (dst_split, total): its dst index j (position 2 j + 1), INT_MAX if none
  double* keys;
  int32_t* best_dst;
};

// Merged srcs of a window of n tokens: min(floor(ratio * n + 1e-6), n / 2) in float64. The
// explicit _rn intrinsics stop the compiler from fusing into an fma, which rounds differently
// from the host formula.
__device__ __forceinline__ int64_t merge_count(double ratio, int64_t n) {
  const int64_t r = static_cast<int64_t>(floor(__dadd_rn(__dmul_rn(ratio, static_cast<double>(n)), 1e-6)));
  return min(r, n / 2);
}

__global__ void window_tiles_kernel(const int64_t* __restrict__ offsets, int64_t num_windows, double ratio,
                                    int64_t* __restrict__ tiles) {
  for (int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; w < num_windows;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = offsets[w + 1] - offsets[w];
    // A window that merges nothing needs no similarities at all (ratio 0, single tokens).
    tiles[w] = merge_count(ratio, n) > 0 ? ceil_div((n + 1) / 2, kTile) : 0;
  }
}

template <typename M>
__device__ __forceinline__ double metric_at(const Params& p, int64_t base, int64_t f) {
  const int64_t g = f / p.metric_inner, c = f - g * p.metric_inner;
  return to_double(static_cast<const M*>(p.metric)[base + g * p.metric_stride[2] + c * p.metric_stride[3]]);
}

template <typename M>
__global__ void norms_kernel(const Params p, int64_t tokens, double* __restrict__ norms) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = blockDim.x / 32;
  for (int64_t token = blockIdx.x * warps + threadIdx.x / 32; token < tokens;
       token += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t base = (token / p.L) * p.metric_stride[0] + (token % p.L) * p.metric_stride[1];
    double sum = 0.0;
    for (int64_t f = lane; f < p.features; f += 32) {
      const double x = metric_at<M>(p, base, f);
      sum = fma(x, x, sum);
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) norms[token] = sqrt(sum);
  }
}

__global__ void init_slots_kernel(const Params p, int32_t* __restrict__ positions) {
  for (int64_t slot = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; slot < p.total;
       slot += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = find_segment(p.window_offsets, p.num_windows, slot);
    positions[slot] = static_cast<int32_t>(slot - p.window_offsets[w]);
    p.keys[slot] = -INFINITY;
    p.best_dst[slot] = -1;
  }
}

struct SimilaritySmem {
  double src[kChunkF][kTile + 1];
  double dst[kChunkF][kTile + 1];
  int64_t src_base[kTile];
  int64_t dst_base[kTile];
  double src_norm[kTile];
  double dst_norm[kTile];
  bool src_ok[kTile];
  bool dst_ok[kTile];
};

// (value, dst) of `other` beats (value, dst): larger similarity, ties to the lower dst.
__device__ __forceinline__ bool beats(double other_value, int other_dst, double value, int dst) {
  return other_value > value || (other_value == value && other_dst < dst);
}

template <typename M>
__global__ void __launch_bounds__(kThreads, 2) similarity_kernel(const Params p) {
  __shared__ SimilaritySmem sm;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t items = p.tile_offsets[p.num_windows] * p.dst_split;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t tile = item / p.dst_split, range = item % p.dst_split;
    const int64_t w = find_segment(p.tile_offsets, p.num_windows, tile);
    const int64_t src_tile = tile - p.tile_offsets[w];
    const int64_t start = p.window_offsets[w], n = p.window_offsets[w + 1] - start;
    const int64_t n_src = (n + 1) / 2, n_dst = n / 2;
    const int64_t per_range = ceil_div(ceil_div(n_dst, kTile), p.dst_split);
    const int64_t dst_tile_end = min(ceil_div(n_dst, kTile), (range + 1) * per_range);

    __syncthreads();  // the previous item is done with the shared src data
    for (int local = threadIdx.x; local < kTile; local += kThreads) {
      const int64_t i = src_tile * kTile + local;
      const bool ok = i < n_src;
      const int64_t token = ok ? p.window_tokens[start + 2 * i] : 0;
      sm.src_ok[local] = ok;
      sm.src_base[local] = (token / p.L) * p.metric_stride[0] + (token % p.L) * p.metric_stride[1];
      sm.src_norm[local] = ok ? p.norms[token] : 0.0;
    }
    __syncthreads();  // src_ok is read at the end even when this dst range is empty
    double best[kMicro];
    int best_at[kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      best[i] = -INFINITY;
      best_at[i] = INT_MAX;
    }
    for (int64_t dst_tile = range * per_range; dst_tile < dst_tile_end; ++dst_tile) {
      for (int local = threadIdx.x; local < kTile; local += kThreads) {
        const int64_t j = dst_tile * kTile + local;
        const bool ok = j < n_dst;
        const int64_t token = ok ? p.window_tokens[start + 2 * j + 1] : 0;
        sm.dst_ok[local] = ok;
        sm.dst_base[local] = (token / p.L) * p.metric_stride[0] + (token % p.L) * p.metric_stride[1];
        sm.dst_norm[local] = ok ? p.norms[token] : 0.0;
      }
      __syncthreads();
      double acc[kMicro][kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] = 0.0;
      }
      for (int64_t f0 = 0; f0 < p.features; f0 += kChunkF) {
        for (int e = threadIdx.x; e < kTile * kChunkF; e += kThreads) {
          const int row = e / kChunkF, kk = e % kChunkF;
          const int64_t f = f0 + kk;
          const bool live = f < p.features;
          sm.src[kk][row] = (live && sm.src_ok[row]) ? metric_at<M>(p, sm.src_base[row], f) : 0.0;
          sm.dst[kk][row] = (live && sm.dst_ok[row]) ? metric_at<M>(p, sm.dst_base[row], f) : 0.0;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kChunkF; ++kk) {
          double a[kMicro], b[kMicro];
#pragma unroll
          for (int i = 0; i < kMicro; ++i) a[i] = sm.src[kk][ty + kSide * i];
#pragma unroll
          for (int j = 0; j < kMicro; ++j) b[j] = sm.dst[kk][tx + kSide * j];
#pragma unroll
          for (int i = 0; i < kMicro; ++i) {
#pragma unroll
            for (int j = 0; j < kMicro; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
          }
        }
        __syncthreads();
      }
      // Columns visited in increasing dst order, so a strict > keeps the lowest dst on ties.
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int col = tx + kSide * j;
        if (!sm.dst_ok[col]) continue;
#pragma unroll
        for (int i = 0; i < kMicro; ++i) {
          const double sim = acc[i][j] / (sm.src_norm[ty + kSide * i] * sm.dst_norm[col] + 1e-8);
          if (sim > best[i]) {
            best[i] = sim;
            best_at[i] = static_cast<int>(dst_tile * kTile + col);
          }
        }
      }
      __syncthreads();  // dst data of this tile are read before the next tile's setup
    }
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      for (int offset = kSide / 2; offset > 0; offset /= 2) {
        const double other = __shfl_xor_sync(0xffffffffu, best[i], offset);
        const int other_at = __shfl_xor_sync(0xffffffffu, best_at[i], offset);
        if (beats(other, other_at, best[i], best_at[i])) {
          best[i] = other;
          best_at[i] = other_at;
        }
      }
    }
    if (tx == 0) {
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        const int local = ty + kSide * i;
        if (!sm.src_ok[local]) continue;
        const int64_t slot = range * p.total + start + 2 * (src_tile * kTile + local);
        p.range_best[slot] = best[i];
        p.range_best_dst[slot] = best_at[i];
      }
    }
  }
}

// Best dst of every src of a merging window over its dst ranges, taken in range order.
__global__ void best_of_ranges_kernel(const Params p) {
  for (int64_t slot = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; slot < p.total;
       slot += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = find_segment(p.window_offsets, p.num_windows, slot);
    const int64_t start = p.window_offsets[w], n = p.window_offsets[w + 1] - start;
    if ((slot - start) % 2 != 0 || merge_count(p.ratio, n) == 0) continue;  // dst, or no similarities
    double best = -INFINITY;
    int best_at = INT_MAX;
    for (int64_t range = 0; range < p.dst_split; ++range) {
      const double value = p.range_best[range * p.total + slot];
      const int at = p.range_best_dst[range * p.total + slot];
      if (beats(value, at, best, best_at)) {
        best = value;
        best_at = at;
      }
    }
    if (best_at == INT_MAX) continue;  // no comparable dst (NaN metric): keeps the -inf key
    p.keys[slot] = best == 0.0 ? 0.0 : best;  // +0.0 for -0.0 so the radix sort sees one zero
    p.best_dst[slot] = static_cast<int32_t>(2 * static_cast<int64_t>(best_at) + 1);
  }
}

// The first r entries of every sorted window are the merged srcs.
__global__ void select_kernel(const Params p, const int32_t* __restrict__ sorted_positions,
                              int64_t* __restrict__ merged_into) {
  for (int64_t slot = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; slot < p.total;
       slot += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = find_segment(p.window_offsets, p.num_windows, slot);
    const int64_t start = p.window_offsets[w], n = p.window_offsets[w + 1] - start;
    if (slot - start >= merge_count(p.ratio, n)) continue;
    const int64_t src_slot = start + sorted_positions[slot];
    const int32_t dst_position = p.best_dst[src_slot];
    if (dst_position < 0) continue;
    merged_into[p.window_tokens[src_slot]] = p.window_tokens[start + dst_position];
  }
}

__global__ void kept_flags_kernel(const int64_t* __restrict__ merged_into, int64_t tokens,
                                  int64_t* __restrict__ flags) {
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < tokens;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    flags[g] = merged_into[g] < 0 ? 1 : 0;
  }
}

// Output slot of every token's group; index / assignment; the (slot, token) sort pairs.
// Slots at or past M (only if the caller's `kept` is wrong) are dropped instead of written.
__global__ void slots_kernel(const int64_t* __restrict__ merged_into, const int64_t* __restrict__ kept_before,
                             int64_t tokens, int64_t L, int64_t kept, int64_t* __restrict__ index,
                             int64_t* __restrict__ assignment, uint64_t* __restrict__ slot_key,
                             int64_t* __restrict__ token_id) {
  const int64_t rows = tokens / L;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < tokens;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = g / L;
    const int64_t anchor = merged_into[g] < 0 ? g : merged_into[g];
    const int64_t m = kept_before[anchor] - kept_before[b * L];
    const bool valid = m >= 0 && m < kept;
    assignment[g] = m;
    if (valid && anchor == g) index[b * kept + m] = g - b * L;
    slot_key[g] = static_cast<uint64_t>(valid ? b * kept + m : rows * kept);
    token_id[g] = g;
  }
}

__global__ void group_bounds_kernel(const uint64_t* __restrict__ sorted_slot, int64_t tokens, uint64_t slots,
                                    int64_t* __restrict__ group_begin, int64_t* __restrict__ group_end) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < tokens;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t key = sorted_slot[j];
    if (key >= slots) continue;
    if (j == 0 || sorted_slot[j - 1] != key) group_begin[key] = j;
    if (j + 1 == tokens || sorted_slot[j + 1] != key) group_end[key] = j + 1;
  }
}

// VEC consecutive elements of the head dim; VEC > 1 only when they form one aligned 16 bytes.
template <typename T, int VEC>
struct Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* ptr) {
  Vec<T, VEC> out;
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
    memcpy(&out, &raw, 16);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.v[i] = ptr[i];
  }
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, VEC>& value) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    memcpy(&raw, &value, 16);
    *reinterpret_cast<uint4*>(ptr) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) ptr[i] = value.v[i];
  }
}

struct ValueParams {
  const void* x;
  int64_t x_stride[4];
  void* out;
  int64_t out_stride[4];
  int64_t H, D, L, kept, slots;
  const int64_t* group_begin;
  const int64_t* group_end;
  const int64_t* members;  // token ids sorted by (slot, token)
  const float* importance;
  const int32_t* sizes;
  int32_t* sizes_out;  // written by the blocks of element chunk 0 when not null
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kMergeThreads) merge_values_kernel(const ValueParams p) {
  using WeightReduce = cub::BlockReduce<float, kMergeThreads>;
  using SizeReduce = cub::BlockReduce<int64_t, kMergeThreads>;
  __shared__ typename WeightReduce::TempStorage weight_storage;
  __shared__ typename SizeReduce::TempStorage size_storage;
  __shared__ int64_t member_l[kMergeThreads];
  __shared__ float member_w[kMergeThreads];
  __shared__ float weight_total;
  __shared__ int64_t size_total;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ out = static_cast<T*>(p.out);
  const int64_t vectors_per_head = p.D / VEC;
  const int64_t e = static_cast<int64_t>(blockIdx.y) * kMergeThreads + threadIdx.x;
  const bool live = e < p.H * vectors_per_head;
  const int64_t h = live ? e / vectors_per_head : 0;
  const int64_t d = live ? (e % vectors_per_head) * VEC : 0;

  for (int64_t slot = blockIdx.x; slot < p.slots; slot += gridDim.x) {
    const int64_t begin = p.group_begin[slot], end = p.group_end[slot];
    if (end <= begin) continue;  // no member (only with a wrong `kept`): leave the slot alone
    const int64_t b = slot / p.kept, m = slot % p.kept;
    T* out_at = out + b * p.out_stride[0] + h * p.out_stride[1] + m * p.out_stride[2] + d * p.out_stride[3];
    const int64_t x_head = b * p.x_stride[0] + h * p.x_stride[1] + d * p.x_stride[3];
    if (end - begin == 1) {  // kept token without merged srcs: bitwise copy
      const int64_t l = p.members[begin] - b * p.L;
      if (live) store_vec<T, VEC>(out_at, load_vec<T, VEC>(x + x_head + l * p.x_stride[2]));
      if (p.sizes_out != nullptr && blockIdx.y == 0 && threadIdx.x == 0) {
        p.sizes_out[slot] = p.sizes[p.members[begin]];
      }
      continue;
    }
    float weighted[VEC], plain[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) weighted[i] = plain[i] = 0.f;
    if (threadIdx.x == 0) {
      weight_total = 0.f;
      size_total = 0;
    }
    for (int64_t chunk = begin; chunk < end; chunk += kMergeThreads) {
      const int64_t j = chunk + threadIdx.x;
      float w = 0.f;
      int64_t size = 0;
      if (j < end) {
        const int64_t g = p.members[j];
        w = p.importance[g];
        size = p.sizes[g];
        member_l[threadIdx.x] = g - b * p.L;
        member_w[threadIdx.x] = w;
      }
      const float chunk_weight = WeightReduce(weight_storage).Sum(w);
      const int64_t chunk_size = SizeReduce(size_storage).Sum(size);
      if (threadIdx.x == 0) {  // chunks added in order: fixed summation order
        weight_total += chunk_weight;
        size_total += chunk_size;
      }
      __syncthreads();
      const int count = static_cast<int>(min(static_cast<int64_t>(kMergeThreads), end - chunk));
      if (live) {
        for (int i = 0; i < count; ++i) {
          const Vec<T, VEC> value = load_vec<T, VEC>(x + x_head + member_l[i] * p.x_stride[2]);
          const float wi = member_w[i];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float xv = to_float(value.v[k]);
            weighted[k] = fmaf(wi, xv, weighted[k]);
            plain[k] += xv;
          }
        }
      }
      __syncthreads();  // members of this chunk (and the reduce storage) are free again
    }
    const float total = weight_total;
    if (live) {
      Vec<T, VEC> result;
      const float members = static_cast<float>(end - begin);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        result.v[k] = detail::from_float<T>(total == 0.f ? plain[k] / members : weighted[k] / total);
      }
      store_vec<T, VEC>(out_at, result);
    }
    if (p.sizes_out != nullptr && blockIdx.y == 0 && threadIdx.x == 0) {
      p.sizes_out[slot] = static_cast<int32_t>(size_total);
    }
    __syncthreads();  // weight_total / size_total are read before the next slot resets them
  }
}

template <typename T>
bool vector_ok(const void* data, const int64_t* stride, int64_t D, int vec) {
  if (vec == 1) return true;
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0 || stride[3] != 1 || D % vec != 0) return false;
  return stride[0] % vec == 0 && stride[1] % vec == 0 && stride[2] % vec == 0;
}

template <typename T>
cudaError_t launch_values(ValueParams vp, int64_t slots, cudaStream_t stream) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  const bool vectorised = vector_ok<T>(vp.x, vp.x_stride, vp.D, kVec) && vector_ok<T>(vp.out, vp.out_stride, vp.D, kVec);
  const int vec = vectorised ? kVec : 1;
  const dim3 grid(detail::grid_for(slots, kMaxGrid),
                  static_cast<unsigned int>(ceil_div(vp.H * (vp.D / vec), kMergeThreads)));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  if (vectorised) {
    merge_values_kernel<T, kVec><<<grid, kMergeThreads, 0, stream>>>(vp);
  } else {
    merge_values_kernel<T, 1><<<grid, kMergeThreads, 0, stream>>>(vp);
  }
  return cudaGetLastError();
}

struct Plan {
  int64_t B, H, L, D, tokens, slots, total, windows;
  int64_t dst_split;  // dst ranges per src tile (shape-only, so results do not depend on the GPU)
  int end_bit;  // bits of the (slot, token) sort keys, sentinel slot included
};

Plan make_plan(const MergeArgs& a) {
  Plan plan{};
  plan.B = a.k.size[0];
  plan.H = a.k.size[1];
  plan.L = a.k.size[2];
  plan.D = a.k.size[3];
  plan.tokens = plan.B * plan.L;
  plan.slots = plan.B * a.kept;
  plan.total = a.total_tokens;
  plan.windows = a.num_windows;
  const int64_t src_tiles = plan.total / (2 * kTile) + plan.windows + 1;  // upper bound
  plan.dst_split = std::max<int64_t>(1, std::min({ceil_div(kTargetSimilarityItems, src_tiles), kMaxDstSplit,
                                                  kMaxRangeBestBytes / std::max<int64_t>(plan.total * 12, 1)}));
  plan.end_bit = 1;
  while (plan.end_bit < 64 && (static_cast<uint64_t>(plan.slots) >> plan.end_bit) != 0) ++plan.end_bit;
  return plan;
}

struct Workspace {
  int64_t* window_tiles;
  int64_t* tile_offsets;
  double* norms;
  double* keys;
  double* sorted_keys;
  int32_t* positions;
  int32_t* sorted_positions;
  int32_t* best_dst;
  double* range_best;
  int32_t* range_best_dst;
  int64_t* merged_into;
  int64_t* kept_flags;
  int64_t* kept_before;
  uint64_t* slot_key;
  uint64_t* sorted_slot_key;
  int64_t* token_id;
  int64_t* sorted_token_id;
  int64_t* group_begin;
  int64_t* group_end;
  void* cub_temp;
  size_t cub_bytes;
  size_t bytes;
};

cudaError_t cub_temp_bytes(const Plan& plan, cudaStream_t stream, size_t* bytes) {
  size_t sort_bytes = 0, scan_bytes = 0, radix_bytes = 0;
  LIGHTKV_RETURN_IF_ERROR(cub::DeviceSegmentedSort::StableSortPairsDescending(
      nullptr, sort_bytes, static_cast<const double*>(nullptr), static_cast<double*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), plan.total, plan.windows,
      static_cast<const int64_t*>(nullptr), static_cast<const int64_t*>(nullptr), stream));
  LIGHTKV_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int64_t*>(nullptr),
                                                        static_cast<int64_t*>(nullptr), plan.tokens, stream));
  LIGHTKV_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
      nullptr, radix_bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), plan.tokens, 0, plan.end_bit, stream));
  *bytes = std::max({sort_bytes, scan_bytes, radix_bytes, size_t{1}});
  return cudaSuccess;
}

Workspace carve(const Plan& plan, size_t cub_bytes, void* base) {
  detail::WorkspaceCarver carver(base);
  Workspace ws{};
  ws.window_tiles = carver.take<int64_t>(plan.windows);
  ws.tile_offsets = carver.take<int64_t>(plan.windows + 1);
  ws.norms = carver.take<double>(plan.tokens);
  ws.keys = carver.take<double>(plan.total);
  ws.sorted_keys = carver.take<double>(plan.total);
  ws.positions = carver.take<int32_t>(plan.total);
  ws.sorted_positions = carver.take<int32_t>(plan.total);
  ws.best_dst = carver.take<int32_t>(plan.total);
  ws.range_best = carver.take<double>(plan.dst_split * plan.total);
  ws.range_best_dst = carver.take<int32_t>(plan.dst_split * plan.total);
  ws.merged_into = carver.take<int64_t>(plan.tokens);
  ws.kept_flags = carver.take<int64_t>(plan.tokens);
  ws.kept_before = carver.take<int64_t>(plan.tokens);
  ws.slot_key = carver.take<uint64_t>(plan.tokens);
  ws.sorted_slot_key = carver.take<uint64_t>(plan.tokens);
  ws.token_id = carver.take<int64_t>(plan.tokens);
  ws.sorted_token_id = carver.take<int64_t>(plan.tokens);
  ws.group_begin = carver.take<int64_t>(plan.slots);
  ws.group_end = carver.take<int64_t>(plan.slots);
  ws.cub_temp = carver.take<char>(static_cast<int64_t>(cub_bytes));
  ws.cub_bytes = cub_bytes;
  ws.bytes = carver.bytes();
  return ws;
}

unsigned int flat_grid(int64_t items) { return detail::grid_for(ceil_div(items, 256), kMaxGrid); }

template <typename M>
cudaError_t launch_matching(const Params& p, const Plan& plan, const Workspace& ws, cudaStream_t stream) {
  norms_kernel<M><<<detail::grid_for(ceil_div(plan.tokens, 8), kMaxGrid), 256, 0, stream>>>(p, plan.tokens, ws.norms);
  LIGHTKV_RETURN_IF_ERROR(cudaGetLastError());
  // Upper bound on the src tiles: every window contributes at most n / 128 + 1 of them.
  const int64_t tile_bound = plan.total / (2 * kTile) + plan.windows + 1;
  similarity_kernel<M><<<detail::grid_for(tile_bound * plan.dst_split, kMaxSimilarityGrid), kThreads, 0, stream>>>(p);
  LIGHTKV_RETURN_IF_ERROR(cudaGetLastError());
  best_of_ranges_kernel<<<flat_grid(plan.total), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t merge_workspace_size(const MergeArgs& args) {
  const Plan plan = make_plan(args);
  size_t cub_bytes = 0;
  if (cub_temp_bytes(plan, nullptr, &cub_bytes) != cudaSuccess) return 0;
  return carve(plan, cub_bytes, nullptr).bytes;
}

cudaError_t launch_merge(const MergeArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const Plan plan = make_plan(a);
  const bool shapes_ok = a.v.dtype == a.k.dtype && a.k.dtype != DType::Float64 && a.kept >= 0 && a.kept <= plan.L &&
                         a.num_windows >= 0 && plan.total == plan.tokens && plan.L < INT32_MAX &&
                         (plan.tokens == 0 || a.num_windows > 0) &&
                         a.metric.size[0] == plan.B && a.metric.size[1] == plan.L &&
                         a.k_out.size[2] == a.kept && a.v_out.size[2] == a.kept;
  for (int i = 0; i < 4; ++i) {
    if (a.v.size[i] != a.k.size[i]) return cudaErrorInvalidValue;
  }
  if (!shapes_ok) return cudaErrorInvalidValue;
  if (plan.tokens == 0) return cudaSuccess;
  size_t cub_bytes = 0;
  LIGHTKV_RETURN_IF_ERROR(cub_temp_bytes(plan, stream, &cub_bytes));
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(workspace) + 255) & ~static_cast<uintptr_t>(255);
  const Workspace ws = carve(plan, cub_bytes, reinterpret_cast<void*>(aligned));
  if (workspace == nullptr || workspace_bytes < ws.bytes) return cudaErrorInvalidValue;

  Params p{};
  p.metric = a.metric.data;
  for (int i = 0; i < 4; ++i) p.metric_stride[i] = a.metric.stride[i];
  p.metric_inner = std::max<int64_t>(a.metric.size[3], 1);
  p.features = a.metric.size[2] * a.metric.size[3];
  p.window_tokens = a.window_tokens;
  p.window_offsets = a.window_offsets;
  p.num_windows = plan.windows;
  p.total = plan.total;
  p.L = plan.L;
  p.ratio = a.ratio;
  p.tile_offsets = ws.tile_offsets;
  p.norms = ws.norms;
  p.dst_split = plan.dst_split;
  p.range_best = ws.range_best;
  p.range_best_dst = ws.range_best_dst;
  p.keys = ws.keys;
  p.best_dst = ws.best_dst;

  // 1-4: tiles, norms, sort keys, best dst per src.
  window_tiles_kernel<<<flat_grid(plan.windows), 256, 0, stream>>>(a.window_offsets, plan.windows, a.ratio,
                                                                   ws.window_tiles);
  LIGHTKV_RETURN_IF_ERROR(cudaGetLastError());
  LIGHTKV_RETURN_IF_ERROR(detail::launch_exclusive_offsets(ws.window_tiles, plan.windows, 1, ws.tile_offsets, stream));
  init_slots_kernel<<<flat_grid(plan.total), 256, 0, stream>>>(p, ws.positions);
  LIGHTKV_RETURN_IF_ERROR(cudaGetLastError());
  switch (a.metric.dtype) {
    case DType::Float32:
      LIGHTKV_RETURN_IF_ERROR(launch_matching<float>(p, plan, ws, stream));
      break;
    case DType::Float16:
      LIGHTKV_RETURN_IF_ERROR(launch_matching<__half>(p, plan, ws, stream));
      break;
    case DType::BFloat16:
      LIGHTKV_RETURN_IF_ERROR(launch_matching<__nv_bfloat16>(p, plan, ws, stream));
      break;
    case DType::Float64:
      LIGHTKV_RETURN_IF_ERROR(launch_matching<double>(p, plan, ws, stream));
      break;
  }

  // 5-6: rank srcs per window, mark the merged ones.
  size_t temp_bytes = ws.cub_bytes;
  LIGHTKV_RETURN_IF_ERROR(cub::DeviceSegmentedSort::StableSortPairsDescending(
      ws.cub_temp, temp_bytes, ws.keys, ws.sorted_keys, ws.positions, ws.sorted_positions, plan.total, plan.windows,
      a.window_offsets, a.window_offsets + 1, stream));
  LIGHTKV_RETURN_IF_ERROR(cudaMemsetAsync(ws.merged_into, 0xFF, sizeof(int64_t) * plan.tokens, stream));  // -1
  select_kernel<<<flat_grid(plan.total), 256, 0, stream>>>(p, ws.sorted_positions, ws.merged_into);
  LIGHTKV_RETURN_IF_ERROR(cudaGetLastError());

  // 7: output slots.
  kept_flags_kernel<<<flat_grid(plan.tokens), 256, 0, stream>>>(ws.merged_into, plan.tokens, ws.kept_flags);
  LIGHTKV_RETURN_IF_ERROR(cudaGetLastError());
  temp_bytes = ws.cub_bytes;
  LIGHTKV_RETURN_IF_ERROR(
      cub::DeviceScan::ExclusiveSum(ws.cub_temp, temp_bytes, ws.kept_flags, ws.kept_before, plan.tokens, stream));
  slots_kernel<<<flat_grid(plan.tokens), 256, 0, stream>>>(ws.merged_into, ws.kept_before, plan.tokens, plan.L,
                                                            a.kept, a.index, a.assignment, ws.slot_key, ws.token_id);
  LIGHTKV_RETURN_IF_ERROR(cudaGetLastError());
  if (plan.slots == 0) return cudaSuccess;

  // 8: group members contiguous, in token order.
  temp_bytes = ws.cub_bytes;
  LIGHTKV_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(ws.cub_temp, temp_bytes, ws.slot_key, ws.sorted_slot_key,
                                                          ws.token_id, ws.sorted_token_id, plan.tokens, 0,
                                                          plan.end_bit, stream));
  // Empty bounds for any slot no token reaches (only with a wrong `kept`): copies nothing.
  LIGHTKV_RETURN_IF_ERROR(cudaMemsetAsync(ws.group_begin, 0, sizeof(int64_t) * plan.slots, stream));
  LIGHTKV_RETURN_IF_ERROR(cudaMemsetAsync(ws.group_end, 0, sizeof(int64_t) * plan.slots, stream));
  group_bounds_kernel<<<flat_grid(plan.tokens), 256, 0, stream>>>(ws.sorted_slot_key, plan.tokens,
                                                                   static_cast<uint64_t>(plan.slots), ws.group_begin,
                                                                   ws.group_end);
  LIGHTKV_RETURN_IF_ERROR(cudaGetLastError());

  // 9: weighted merge of k and v straight into the outputs.
  ValueParams vp{};
  vp.H = plan.H;
  vp.D = plan.D;
  vp.L = plan.L;
  vp.kept = a.kept;
  vp.slots = plan.slots;
  vp.group_begin = ws.group_begin;
  vp.group_end = ws.group_end;
  vp.members = ws.sorted_token_id;
  vp.importance = a.importance;
  vp.sizes = a.sizes;
  for (int tensor = 0; tensor < 2; ++tensor) {
    const Tensor4& in = tensor == 0 ? a.k : a.v;
    const OutTensor4& out = tensor == 0 ? a.k_out : a.v_out;
    vp.x = in.data;
    vp.out = out.data;
    for (int i = 0; i < 4; ++i) {
      vp.x_stride[i] = in.stride[i];
      vp.out_stride[i] = out.stride[i];
    }
    vp.sizes_out = tensor == 0 ? a.sizes_out : nullptr;
    switch (a.k.dtype) {
      case DType::Float32:
        LIGHTKV_RETURN_IF_ERROR(launch_values<float>(vp, plan.slots, stream));
        break;
      case DType::Float16:
        LIGHTKV_RETURN_IF_ERROR(launch_values<__half>(vp, plan.slots, stream));
        break;
      case DType::BFloat16:
        LIGHTKV_RETURN_IF_ERROR(launch_values<__nv_bfloat16>(vp, plan.slots, stream));
        break;
      case DType::Float64:
        return cudaErrorInvalidValue;
    }
  }
  return cudaSuccess;
}

}  // namespace lightkv_cuda
