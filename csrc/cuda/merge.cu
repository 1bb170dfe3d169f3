// Segmented window merge (contract: `merge` in csrc/lightkv.cpp), all windows of all rows in
// one pass of kernels. Steps 1-3 decide, per window, which srcs merge into which dst; they run in
// one of two modes, picked on the host from the caller's max_window:
// Exact mode, two launches, when every window has at most kExactWindow = 64 tokens (LLaVA-1.5's
// 4x4 windows, video frames), or at most kExactMaxWindow = 512 and all pairs of all windows cost
// little next to a screening pass (kExactMaxWork: Qwen2.5-VL images at small batch):
//   exact_dots_kernel: one warp per (window, feature split, 8-src block, 8-dst block), or per
//      group of 3 x 3 such block pairs where there are many windows of at most 3 blocks (LLaVA-1.5
//      at large batch: its 36-token windows are 3 x 3 block pairs): float64 dot products of the
//      (src, dst) pairs on the float64 tensor cores, and squared norms, the metric rows copied
//      ahead of the products into a ring of shared memory per lane. Block groups of a 16-bit
//      metric take screened sums instead: the 16-bit tensor cores, float32 over 32 features,
//      added in float64, within exact_screen_eps of the exact cosines.
//   exact_select_kernel: per window (a block per 16 srcs for windows over 64 tokens, the last to
//      finish ranking), the splits summed in order, each src's best dst, the srcs ranked, the
//      first r merged (on screened sums, a float64 recheck of what they leave open: the best
//      of a src's dsts within 2 eps, the order of srcs whose keys are within 2 eps around the
//      r-th); then step 4 for rows of at most kRowTokens: the window's block lays out
//      its groups' members (a window's tokens are all of its groups' members), and the block
//      that finishes a row's last window numbers the row's kept tokens.
// Screened mode (larger windows, or many mid-sized ones):
//   1. prepare_kernel: per window that merges anything, exclusive offsets of its 64-src tiles
//      and of its (64-src tile, 64-dst tile) pairs; |metric| per token in float64 (one warp per
//      token); every token starts kept.
//   2. Matching, exact to float64 but screened in fast arithmetic:
//      a. screen_kernel: 64 x 64 tiles of src-dst dot products over the metric features, on
//         tensor cores (mma.sync, float32 accumulation) for 16-bit metrics, float32 FMA for
//         float32 and float64 FMA for float64 metrics. Every screened cosine is within `eps` of
//         the exact one (a worst-case rounding bound). Each src keeps its kTopK best (screened
//         value, dst) over its dst range; windows are tiled, so any window size works.
//         Few, long tiles (small windows, many features) are split over the features instead
//         ("partial" mode): the kernel writes partial dot tiles and reduce_partials_kernel sums
//         them in split order before keeping the best.
//      b. choose_kernel, one warp per src: the exact float64 cosine of every listed dst within
//         2 eps of the best screened value (no other dst can be the exact best or tie it), or of
//         every dst when the list cannot prove that (kTopK near-ties, non-finite values). The
//         exact best (ties: lowest dst) gives the src's dst and its score, the float64 value.
//   3. rank_select_kernel: each src's rank in its window (score descending, ties: lower
//      position) by counting the srcs that beat it; the first r are merged: merged_into[src] = dst.
// Then, in both modes:
//   4. Output slot of every kept token in its row, index, assignment, and the members of every
//      group contiguous in token order: for rows of at most kRowTokens tokens, in exact mode
//      exact_select_kernel (the groups window by window, then number_row: a block scan per row),
//      in screened mode row_groups_kernel (group_row: a block scan and a block radix sort per
//      row); longer rows: kept flags -> cub::DeviceScan -> slots_kernel -> cub::DeviceRadixSort
//      on (slot, token) -> group_bounds_kernel.
//   5. merge_values_kernel: one block per (output slot, element chunk) of both k and v (the
//      group's record and weights read once for both), or whole warps per slot where a slot's
//      vectors fill at most half a block (few KV heads): float32 weighted sum of the members in
//      that fixed order; single-member groups are copied bitwise. The values of up to 3 members
//      are loaded at once (copied asynchronously to shared memory), one round trip after the
//      group's record, which holds their ids. 16-byte vectors where the layout allows.
// No float atomics anywhere: the result is bitwise reproducible, and the merge decisions are
// those of float64 arithmetic in either mode. A LLaVA-1.5 image takes 3 launches. Steps 1-4
// (launch_merge_decisions) never read the importance; step 5 (launch_merge_values) does.
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include "common.cuh"

namespace lightkv_cuda {
namespace {

using detail::ceil_div;
using detail::find_segment;
using detail::to_double;
using detail::to_float;

constexpr int kTile = 64;            // srcs and dsts per screened tile
constexpr int kScreenThreads = 128;  // 4 warps, each owning a 32 x 32 quarter of the tile
constexpr int kTopK = 8;             // screened candidates kept per src
constexpr int kMergeThreads = 128;
constexpr int kMergeVectors = 2;  // vectors of each of k and v per merge_values thread
constexpr int kStagedMembers = 3;  // group members whose values merge_values_kernel loads at once
constexpr int kMergeBlocksPerSm = 8;  // merge_values_kernel: at most 64 registers
constexpr int kChooseThreads = 256;  // one warp per src
// choose_kernel: a row pair of at most this many warp-wide steps (Qwen2.5-VL's 4 x 128 16-bit
// features: 2) is read in one round trip at 4 blocks per SM (64 registers); longer rows
// (LLaVA-NeXT's 4096 features: 16 steps) keep 4 steps in flight at 3 blocks per SM.
constexpr int kChooseShortRow = 2;
constexpr int kPrepareThreads = 256;
constexpr int kRankThreads = 256;
constexpr int kRowThreads = 512;
constexpr int kRowItemsMax = 8;  // tokens per thread of group_row: 2, 4 or 8, the fewest that hold a row
constexpr int64_t kRowTokens = kRowThreads * kRowItemsMax;  // rows up to this long: group_row
constexpr int64_t kMaxGrid = 1 << 20;
constexpr int64_t kMaxScreenGrid = 1 << 16;
constexpr int64_t kTargetScreenItems = 1024;  // dst ranges aim at this many work items
constexpr int64_t kMaxDstSplit = 64;
constexpr int64_t kMaxRangeListBytes = int64_t{256} << 20;
constexpr int64_t kPartialItems = 512;   // partial mode: at most this many (tile pair, split) items
constexpr int64_t kMaxFeatureSplit = 32;
constexpr int64_t kMinSplitChunks = 4;  // feature chunks per split at least: fewer would not pay for the sums
// Exact mode: float64 dot products of all pairs (see the top of the file for when).
constexpr int kExactWindow = 64;  // windows up to this size: exact mode whatever the work
constexpr int kExactSmallPairs = (kExactWindow / 2) * (kExactWindow / 2);  // pairs of such a window, at most
constexpr int64_t kExactMaxWindow = 512;
constexpr int64_t kExactMaxWork = int64_t{1} << 28;  // float64 FMAs of all pairs, windows > 64
constexpr int64_t kExactMaxSums = int64_t{1} << 22;  // float64 sums of all splits, windows > 64 (32 MiB)
// Exact mode's screened sums: features per float32 sum (a 16-byte vector of 8 per lane of a quad).
constexpr int64_t kScreenedRun = 32;
constexpr int kExactBlock = 8;  // srcs (and dsts) per exact_dots item: one 8 x 8 float64 mma tile
// 4 warps, an item each; 4 blocks per SM (at 5, float16 spills), 2 for block groups (210 registers)
constexpr int kExactThreads = 128;
constexpr int kExactBlocksPerSm = 4;
constexpr int kExactGroupBlocksPerSm = 2;
constexpr int kExactVectors = 4;    // 16 bytes of each of its 2 rows a lane loads 4 times per step
constexpr int kExactStages = 3;     // exact_dots_kernel: batches a lane holds in shared memory (2 in flight)
constexpr int64_t kExactTargetWarps = 8192;  // feature splits aim at this many items: ~4 waves of an H100
// Block groups (exact_dots_kernel<M, kExactGroup>) for windows of at most kExactGroup blocks, where
// the block pairs alone make this many items (LLaVA-1.5 at batch 32: 512 windows of 9): fewer,
// longer items, whose feature splits aim at kExactGroupTargetWarps.
constexpr int kExactGroup = 3;
constexpr int64_t kExactGroupMinPairs = 4096;
constexpr int64_t kExactGroupTargetWarps = 2048;
constexpr int64_t kMaxExactSplit = 16;  // exact_select_kernel: at most 2 round trips for a window of <= 64 tokens
constexpr int kSelectThreads = 512;  // exact_select_kernel: a warp per src, 16 srcs at a time
// v up to this size is fetched into L2 while the decisions run (a third of an H100's 50 MB L2,
// so that what the decisions and the scoring read stays there too; batch 1 of the presets but
// LLaVA-NeXT's 5 images).
constexpr int64_t kPrefetchBytes = int64_t{16} << 20;

// Per metric dtype: how screened tiles are staged and accumulated. 16-bit metrics stay as raw
// bits for the tensor cores; wider ones are staged in their own type.
template <typename M>
struct Screen {
  using Stage = uint16_t;
  using Acc = float;
  static constexpr int kChunk = 128;  // features staged per step: one memory round trip each
  static constexpr int kPad = 8;      // row stride of 68 words: conflict-free fragment loads
};
template <>
struct Screen<float> {
  using Stage = float;
  using Acc = float;
  static constexpr int kChunk = 32;
  static constexpr int kPad = 1;
};
template <>
struct Screen<double> {
  using Stage = double;
  using Acc = double;
  static constexpr int kChunk = 16;
  static constexpr int kPad = 1;
};

// An output slot's group: its members are members[begin, end), in token order. The first
// kStagedMembers are also kept here, so that merge_values_kernel starts loading a group of up to
// that many members (nearly all groups) after one load. begin = end = 0: no member (only with a
// wrong `kept`).
struct alignas(16) Group {
  int64_t begin, end;
  int64_t first[kStagedMembers];  // members[begin + i] where the group has them
};

// MergeArgs::local_bases as two per-token tables: what a kept token's index entry (l) and a
// token's assignment (slot) count from; both 0 without it.
struct LocalBases {
  const int64_t* l = nullptr;
  const int64_t* slot = nullptr;
  __device__ __forceinline__ int64_t l_of(int64_t g) const { return l != nullptr ? l[g] : 0; }
  __device__ __forceinline__ int64_t slot_of(int64_t g) const { return slot != nullptr ? slot[g] : 0; }
};

struct Params {
  const void* metric;
  int64_t metric_stride[4];
  int64_t metric_inner;  // C (features are f = g * C + c)
  int64_t features;      // G * C
  const int64_t* window_tokens;
  const int64_t* window_offsets;
  int64_t num_windows;
  int64_t total;  // window tokens
  int64_t tokens;  // B * L
  int64_t L;
  double ratio;
  int64_t* tile_offsets;  // per window: 64-src tiles, exclusive offsets (num_windows + 1)
  int64_t* pair_offsets;  // per window: (src tile, dst tile) pairs, exclusive offsets
  int64_t* src_offsets;   // per window: srcs, exclusive offsets
  double* norms;
  int64_t dst_split;
  int64_t feature_chunks;      // staged feature chunks of the whole metric
  bool vector_stage;           // stage whole chunks with 16-byte loads (vector_staging)
  bool vector_rows;            // lane_dot reads rows 16 bytes at a time (vector_rows)
  int64_t max_feature_split;   // shape-only bound; the split in use is feature_split() below
  void* partial;               // partial mode: (split, pair, kTile, kTile) dot tiles
  int64_t partial_capacity;    // elements of `partial`
  double eps;                  // bound on |screened cosine - exact cosine|
  double* range_value;         // (dst_split, total, kTopK): screened values, best first
  int32_t* range_dst;          // same layout: dst index j (position 2 j + 1), INT_MAX if none
  double* keys;                // per src slot of a merging window: the exact best similarity (screened
  int32_t* best_dst;           // mode, or exact with select_groups > 1) and its dst's window position, -1 if none
  int64_t* merged_into;        // per token: the token it is merged into, -1 if kept
  int64_t exact_window;        // exact mode: the caller's max_window (larger windows stay unmerged)
  int64_t exact_blocks;        // exact mode: 8-token blocks of the srcs (or dsts) of the largest window
  int64_t exact_split;         // exact mode: feature splits per block pair
  int64_t exact_steps;         // exact mode: exact_dots_kernel's steps over the whole metric
  int64_t exact_slot;          // exact mode: float64 sums per window token, ceil(exact_window / 4) + 1
  double* exact_partial;       // exact mode: (split, total * exact_slot) float64 sums, by window start
  int64_t select_groups;       // exact mode: exact_select_kernel's blocks per window, at most
  unsigned int* select_tickets;  // per window if select_groups > 1 (zeroed by exact_dots), else null
  // v's elements, when they fill one range of at most kPrefetchBytes (else 0 bytes): the first
  // decision kernel starts fetching it into L2 for merge_values_kernel.
  const void* prefetch_base;
  int64_t prefetch_bytes;
  // Exact mode with rows of at most kRowTokens: exact_select_kernel also does row_groups_kernel's
  // work, a row by the block whose window completes its merged_into (row_tickets count its tokens).
  bool fused_row_groups;
  unsigned int* row_tickets;  // per row if fused_row_groups (zeroed by exact_dots), else null
  int64_t kept;
  int row_key_bits;
  int64_t* index;
  int64_t* assignment;
  LocalBases bases;
  int64_t* members;
  Group* groups;
  Group* token_groups;  // fused_row_groups: per kept token, its group's record, for number_row
};

// Merged srcs of a window of n tokens: min(floor(ratio * n + 1e-6), n / 2) in float64. The
// explicit _rn intrinsics stop the compiler from fusing into an fma, which rounds differently
// from the host formula.
__device__ __forceinline__ int64_t merge_count(double ratio, int64_t n) {
  const int64_t r = static_cast<int64_t>(floor(__dadd_rn(__dmul_rn(ratio, static_cast<double>(n)), 1e-6)));
  return min(r, n / 2);
}


// Walks features f = first, first + step, ... as (head g, channel c) element offsets without
// divisions: offset() = g * stride[2] + c * stride[3].
class FeatureCursor {
 public:
  __device__ FeatureCursor(const Params& p, int64_t first)
      : p_(p), c_(first % p.metric_inner), offset_(first / p.metric_inner * p.metric_stride[2] + c_ * p.metric_stride[3]) {}
  __device__ __forceinline__ int64_t offset() const { return offset_; }
  // The offset follows the channel along (additions, not a multiply per read).
  __device__ __forceinline__ void advance(int64_t step) {
    c_ += step;
    offset_ += step * p_.metric_stride[3];
    while (c_ >= p_.metric_inner) {  // into the next head: back over its channels, on by a head
      c_ -= p_.metric_inner;
      offset_ += p_.metric_stride[2] - p_.metric_inner * p_.metric_stride[3];
    }
  }

 private:
  const Params& p_;
  int64_t c_;       // channel
  int64_t offset_;  // element offset of (head, channel c_)
};

__device__ __forceinline__ int64_t token_base(const Params& p, int64_t token) {
  return (token / p.L) * p.metric_stride[0] + (token % p.L) * p.metric_stride[1];
}

// Features of a warp-wide step of lane_dot over 16-byte vectors (p.vector_rows).
template <typename M>
__host__ __device__ constexpr int64_t lane_step_features() {
  return 32 * (16 / sizeof(M));
}

// This lane's share of the float64 dot product of two tokens' metric rows, in a fixed order:
// 16-byte vectors v = lane, lane + 32, ... when p.vector_rows, else features f = lane, lane + 32, ...
// kInFlight: steps whose loads are issued before their FMAs (the same sums for any).
template <typename M, int kInFlight = 4>
__device__ double lane_dot(const Params& p, int64_t a_base, int64_t b_base, int lane) {
  const M* __restrict__ metric = static_cast<const M*>(p.metric);
  double dot = 0.0;
  if (p.vector_rows) {
    constexpr int kPerVector = 16 / sizeof(M);
    constexpr int64_t kStep = lane_step_features<M>();
    FeatureCursor feature(p, kPerVector * lane);
    for (int64_t f0 = kPerVector * lane; f0 < p.features; f0 += kInFlight * kStep) {
      uint4 a_raw[kInFlight], b_raw[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        a_raw[u] = b_raw[u] = make_uint4(0, 0, 0, 0);
        if (f0 + u * kStep < p.features) {
          a_raw[u] = *reinterpret_cast<const uint4*>(metric + a_base + feature.offset());
          b_raw[u] = *reinterpret_cast<const uint4*>(metric + b_base + feature.offset());
          feature.advance(kStep);
        }
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        if (f0 + u * kStep >= p.features) break;
        M a[kPerVector], b[kPerVector];
        memcpy(a, &a_raw[u], 16);
        memcpy(b, &b_raw[u], 16);
#pragma unroll
        for (int i = 0; i < kPerVector; ++i) dot = fma(to_double(a[i]), to_double(b[i]), dot);
      }
    }
  } else {
    FeatureCursor feature(p, lane);
    for (int64_t f = lane; f < p.features; f += 32, feature.advance(32)) {
      dot = fma(to_double(metric[a_base + feature.offset()]), to_double(metric[b_base + feature.offset()]), dot);
    }
  }
  return dot;
}

__device__ __forceinline__ double warp_sum(double x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Blocks 0, 1 and 2 first write the exclusive offsets of every window's 64-src tiles (block 0),
// of its (src tile, dst tile) pairs (block 1) and of its srcs (block 2); a window that merges
// nothing (ratio 0, single tokens) needs no similarities, so it has none. Then every block:
// |metric| per token in float64, one warp per token, and the token starts kept.
template <typename M>
__global__ void __launch_bounds__(kPrepareThreads) prepare_kernel(const Params p) {
  detail::await_previous_kernel();
  detail::prefetch_to_l2(p.prefetch_base, p.prefetch_bytes);
  if (blockIdx.x < 3) {
    const auto count = [&](int64_t w) -> int64_t {
      const int64_t n = p.window_offsets[w + 1] - p.window_offsets[w];
      if (merge_count(p.ratio, n) == 0) return 0;
      const int64_t src_tiles = ceil_div((n + 1) / 2, kTile);
      return blockIdx.x == 0 ? src_tiles : blockIdx.x == 1 ? src_tiles * ceil_div(n / 2, kTile) : (n + 1) / 2;
    };
    int64_t* const offsets[] = {p.tile_offsets, p.pair_offsets, p.src_offsets};
    detail::block_exclusive_offsets<kPrepareThreads>(count, p.num_windows, offsets[blockIdx.x]);
  }
  const int lane = threadIdx.x % 32;
  constexpr int64_t kWarps = kPrepareThreads / 32;
  for (int64_t token = blockIdx.x * kWarps + threadIdx.x / 32; token < p.tokens; token += gridDim.x * kWarps) {
    const int64_t base = token_base(p, token);
    const double norm = sqrt(warp_sum(lane_dot<M>(p, base, base, lane)));
    if (lane == 0) {
      p.norms[token] = norm;
      p.merged_into[token] = -1;  // until rank_select_kernel merges it
    }
  }
}

// (value, dst) of `other` beats (value, dst): larger similarity, ties to the lower dst.
template <typename V>
__device__ __forceinline__ bool beats(V other_value, int other_dst, V value, int dst) {
  return other_value > value || (other_value == value && other_dst < dst);
}

// The kTopK best (value, dst) pairs seen, best first, padded with (-inf, INT_MAX). Fully
// unrolled so the lists live in registers.
template <typename V>
struct TopList {
  V value[kTopK];
  int dst[kTopK];

  __device__ __forceinline__ TopList() {
#pragma unroll
    for (int i = 0; i < kTopK; ++i) {
      value[i] = -INFINITY;
      dst[i] = INT_MAX;
    }
  }
  __device__ __forceinline__ void insert(V v, int d) {
    if (!beats(v, d, value[kTopK - 1], dst[kTopK - 1])) return;
    value[kTopK - 1] = v;
    dst[kTopK - 1] = d;
#pragma unroll
    for (int i = kTopK - 1; i > 0; --i) {
      if (beats(value[i], dst[i], value[i - 1], dst[i - 1])) {
        const V tv = value[i];
        value[i] = value[i - 1];
        value[i - 1] = tv;
        const int td = dst[i];
        dst[i] = dst[i - 1];
        dst[i - 1] = td;
      }
    }
  }
};

template <typename M>
struct ScreenSmem {
  using S = typename Screen<M>::Stage;
  using Acc = typename Screen<M>::Acc;
  static constexpr int kRow = Screen<M>::kChunk + Screen<M>::kPad;
  union {
    struct {
      alignas(16) S src[kTile][kRow];
      alignas(16) S dst[kTile][kRow];
    } stage;
    Acc dot[kTile][kTile + 1];  // the finished tile; reuses the staging space
  };
  int64_t src_base[kTile];
  int64_t dst_base[kTile];
  double src_norm[kTile];
  double dst_norm[kTile];
  bool src_ok[kTile];
  bool dst_ok[kTile];
};

// Live slots of tile `tile` of a side of `count` tokens.
__device__ __forceinline__ int live_slots(int64_t tile, int64_t count) {
  return static_cast<int>(min(int64_t{kTile}, count - kTile * tile));
}

// A slot's norm on its way to shared memory: loaded by the slot's setup, stored by store() once
// the tile's product is done, before keep_best reads it, so that its round trip overlaps the
// staging instead of preceding it. Partial tiles need no norms: there the load is dead code.
struct PendingNorm {
  double* at = nullptr;  // null: no slot set up by this thread
  double value = 0.0;
  __device__ __forceinline__ void store() const {
    if (at != nullptr) *at = value;
  }
};

// Slot `local` of tile `tile` of the srcs (parity 0: window positions 0, 2, ...) or dsts (parity 1)
// of the window at `start`, of which there are `count`: the element offset of its metric row and
// its liveness, and its norm to store.
__device__ __forceinline__ PendingNorm setup_slot(const Params& p, int64_t start, int parity, int64_t tile,
                                                  int64_t count, int local, int64_t* base, double* norm, bool* ok) {
  const bool is_live = local < live_slots(tile, count);
  const int64_t token = is_live ? p.window_tokens[start + 2 * (kTile * tile + local) + parity] : 0;
  ok[local] = is_live;
  base[local] = token_base(p, token);
  return {&norm[local], is_live ? p.norms[token] : 0.0};
}

// The sides of the tile pair (src_tile, dst_tile), a thread per slot, for an item that walks its
// src tile's dst tiles. At the item's first dst tile (`first`, after the item's barrier) both
// sides at once, the srcs by the first kTile threads and the dsts by the others: one round trip
// for the token ids where one side after the other took two. Later dst tiles set up the dst side
// alone, once the previous tile's epilogue is done with it.
template <typename M>
__device__ __forceinline__ PendingNorm setup_tiles(const Params& p, ScreenSmem<M>& sm, int64_t start,
                                                   int64_t src_tile, int64_t n_src, int64_t dst_tile, int64_t n_dst,
                                                   bool first) {
  static_assert(kScreenThreads == 2 * kTile, "a thread per slot of both sides");
  if (!first) __syncthreads();  // uniform: the previous tile's epilogue is done with the dst side data
  const int local = static_cast<int>(threadIdx.x) % kTile;
  if (first && threadIdx.x < kTile) {
    return setup_slot(p, start, 0, src_tile, n_src, local, sm.src_base, sm.src_norm, sm.src_ok);
  }
  if (first || threadIdx.x < kTile) {
    return setup_slot(p, start, 1, dst_tile, n_dst, local, sm.dst_base, sm.dst_norm, sm.dst_ok);
  }
  return {};
}

template <typename M>
__device__ __forceinline__ typename Screen<M>::Stage stage_value(const Params& p, int64_t index) {
  using S = typename Screen<M>::Stage;
  return static_cast<const S*>(p.metric)[index];  // 16-bit metrics: the raw bits
}

template <typename M>
__device__ __forceinline__ double staged_to_double(typename Screen<M>::Stage value) {
  if constexpr (sizeof(M) == 2) {
    return static_cast<double>(detail::bits_to_float(value, M()));
  } else {
    return static_cast<double>(value);
  }
}

// sm.dot = the (src, dst) dot products of the tile over features [f_begin, f_end), as
// Screen<M>::Acc. Expects the sides' row offsets and liveness to be visible; ends with a barrier.
template <typename M>
__device__ void tile_dots(const Params& p, ScreenSmem<M>& sm, int64_t f_begin, int64_t f_end) {
  using S = typename Screen<M>::Stage;
  using Acc = typename Screen<M>::Acc;
  constexpr int kChunk = Screen<M>::kChunk;
  constexpr int kRowsPerPass = kScreenThreads / kChunk;
  constexpr bool kTensorCores = sizeof(S) == 2;
  const int kk = threadIdx.x % kChunk, row0 = threadIdx.x / kChunk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Tensor-core layout: warp (wr, wc) owns rows 32 wr.., columns 32 wc..; mma fragments
  // (m16n8k16): group = lane / 4 picks the row / column, quad = lane % 4 the k pair.
  const int wr = warp / 2, wc = warp % 2, group = lane / 4, quad = lane % 4;
  // SIMT layout: rows ty + 16 i, columns tx + 8 j.
  const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
  float mma_acc[2][4][4];
  Acc simt_acc[4][8];
  if constexpr (kTensorCores) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) mma_acc[mt][nt][e] = 0.f;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) simt_acc[i][j] = Acc(0);
  }
  // Vector staging: thread t copies the 16 bytes at chunk element `vector_at` of rows
  // t / kVectors + ...; a vector never crosses a head (see vector_staging).
  constexpr int kPerVector = 16 / sizeof(S), kVectors = kChunk / kPerVector;
  const int vector_at = kPerVector * (threadIdx.x % kVectors), vector_row0 = threadIdx.x / kVectors;
  FeatureCursor feature(p, f_begin + kk);
  for (int64_t f0 = f_begin; f0 < f_end; f0 += kChunk, feature.advance(p.vector_stage ? 0 : kChunk)) {
    __syncthreads();  // the previous chunk (or the previous tile's epilogue) is done with the stage
    if (p.vector_stage) {
      const int64_t f = f0 + vector_at;
      const bool in_range = f < f_end;
      const S* metric = static_cast<const S*>(p.metric) +
                        (in_range ? (f / p.metric_inner) * p.metric_stride[2] + (f % p.metric_inner) * p.metric_stride[3] : 0);
      constexpr int kRowStep = kScreenThreads / kVectors, kRowsPerThread = kTile / kRowStep;
      if constexpr (kTensorCores) {
        // Rows padded to a multiple of 16 bytes: copied straight to shared memory, all of a
        // thread's copies in flight together (one memory round trip per chunk).
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          const int row = vector_row0 + i * kRowStep;
          detail::copy_16_bytes_async(&sm.stage.src[row][vector_at], metric + sm.src_base[row], in_range && sm.src_ok[row],
                                      metric);
          detail::copy_16_bytes_async(&sm.stage.dst[row][vector_at], metric + sm.dst_base[row], in_range && sm.dst_ok[row],
                                      metric);
        }
        detail::wait_async_copies();
      } else {
        // Batches of loads issued before their stores, so they are in flight together.
        constexpr int kBatch = kRowsPerThread < 4 ? kRowsPerThread : 4;
#pragma unroll
        for (int first = 0; first < kRowsPerThread; first += kBatch) {
          uint4 src_raw[kBatch], dst_raw[kBatch];
#pragma unroll
          for (int b = 0; b < kBatch; ++b) {
            const int row = vector_row0 + (first + b) * kRowStep;
            src_raw[b] = detail::load_16_bytes(in_range && sm.src_ok[row], metric + sm.src_base[row]);
            dst_raw[b] = detail::load_16_bytes(in_range && sm.dst_ok[row], metric + sm.dst_base[row]);
          }
#pragma unroll
          for (int b = 0; b < kBatch; ++b) {
            const int row = vector_row0 + (first + b) * kRowStep;
            detail::store_16_bytes(src_raw[b], &sm.stage.src[row][vector_at]);
            detail::store_16_bytes(dst_raw[b], &sm.stage.dst[row][vector_at]);
          }
        }
      }
    } else {
      const bool live = f0 + kk < f_end;
      const int64_t offset = live ? feature.offset() : 0;
#pragma unroll 4
      for (int row = row0; row < kTile; row += kRowsPerPass) {
        sm.stage.src[row][kk] = live && sm.src_ok[row] ? stage_value<M>(p, sm.src_base[row] + offset) : S(0);
        sm.stage.dst[row][kk] = live && sm.dst_ok[row] ? stage_value<M>(p, sm.dst_base[row] + offset) : S(0);
      }
    }
    __syncthreads();
    if constexpr (kTensorCores) {
#pragma unroll
      for (int k0 = 0; k0 < kChunk; k0 += 16) {
        if (f0 + k0 >= f_end) break;  // the zero-filled tail of the last chunk
        uint32_t a[2][4], b[4][2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int r = 32 * wr + 16 * mt + group;
          a[mt][0] = detail::load_pair(&sm.stage.src[r][k0 + 2 * quad]);
          a[mt][1] = detail::load_pair(&sm.stage.src[r + 8][k0 + 2 * quad]);
          a[mt][2] = detail::load_pair(&sm.stage.src[r][k0 + 8 + 2 * quad]);
          a[mt][3] = detail::load_pair(&sm.stage.src[r + 8][k0 + 8 + 2 * quad]);
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int c = 32 * wc + 8 * nt + group;
          b[nt][0] = detail::load_pair(&sm.stage.dst[c][k0 + 2 * quad]);
          b[nt][1] = detail::load_pair(&sm.stage.dst[c][k0 + 8 + 2 * quad]);
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) detail::mma_m16n8k16<M>(mma_acc[mt][nt], a[mt], b[nt]);
      }
    } else {
#pragma unroll 4
      for (int k = 0; k < kChunk; ++k) {
        Acc x[4], y[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = static_cast<Acc>(sm.stage.src[ty + 16 * i][k]);
#pragma unroll
        for (int j = 0; j < 8; ++j) y[j] = static_cast<Acc>(sm.stage.dst[tx + 8 * j][k]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) simt_acc[i][j] = fma(x[i], y[j], simt_acc[i][j]);
      }
    }
  }
  __syncthreads();  // the stage is read by all warps before the tile overwrites it
  if constexpr (kTensorCores) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int r = 32 * wr + 16 * mt + group, c = 32 * wc + 8 * nt + 2 * quad;
        sm.dot[r][c] = mma_acc[mt][nt][0];
        sm.dot[r][c + 1] = mma_acc[mt][nt][1];
        sm.dot[r + 8][c] = mma_acc[mt][nt][2];
        sm.dot[r + 8][c + 1] = mma_acc[mt][nt][3];
      }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) sm.dot[ty + 16 * i][tx + 8 * j] = simt_acc[i][j];
  }
  __syncthreads();
}

// Two threads per src row, 32 columns each: screened cosines of the finished tile into `top`.
// A non-finite value or denominator (an overflow of the screening type) enters as +inf, which
// sends the src to the exact scan of all dsts.
template <typename M>
__device__ __forceinline__ void keep_best(const ScreenSmem<M>& sm, int64_t dst_tile,
                                          TopList<typename Screen<M>::Acc>& top) {
  using Acc = typename Screen<M>::Acc;
  const int row = threadIdx.x / 2, half = threadIdx.x % 2;
  if (!sm.src_ok[row]) return;
  for (int c = 32 * half; c < 32 * half + 32; ++c) {
    if (!sm.dst_ok[c]) continue;
    const Acc denominator = static_cast<Acc>(sm.src_norm[row] * sm.dst_norm[c] + 1e-8);
    Acc value = sm.dot[row][c] / denominator;
    if (!isfinite(value) || !isfinite(denominator)) value = INFINITY;
    top.insert(value, static_cast<int>(dst_tile * kTile + c));
  }
}

// Joins the lists of the two threads of a row and writes the row's list for dst range `range`.
template <typename M>
__device__ __forceinline__ void write_list(const Params& p, const ScreenSmem<M>& sm, int64_t start,
                                           int64_t src_tile, int64_t range, TopList<typename Screen<M>::Acc>& top) {
  using Acc = typename Screen<M>::Acc;
  Acc other_value[kTopK];
  int other_dst[kTopK];
#pragma unroll
  for (int i = 0; i < kTopK; ++i) {
    other_value[i] = __shfl_xor_sync(0xffffffffu, top.value[i], 1);
    other_dst[i] = __shfl_xor_sync(0xffffffffu, top.dst[i], 1);
  }
#pragma unroll
  for (int i = 0; i < kTopK; ++i) top.insert(other_value[i], other_dst[i]);
  const int row = threadIdx.x / 2;
  if (threadIdx.x % 2 != 0 || !sm.src_ok[row]) return;
  const int64_t slot = start + 2 * (src_tile * kTile + row);
  const int64_t at = (range * p.total + slot) * kTopK;
#pragma unroll
  for (int i = 0; i < kTopK; ++i) {
    p.range_value[at + i] = static_cast<double>(top.value[i]);
    p.range_dst[at + i] = top.dst[i];
  }
}

// Dst ranges of a window in direct mode that hold dsts, and so a screened list: range r covers
// dst tiles [r per_range, (r + 1) per_range); ranges past the window's last dst tile stay empty.
__device__ __forceinline__ int64_t used_dst_ranges(int64_t n_dst, int64_t dst_split) {
  const int64_t dst_tiles = ceil_div(n_dst, kTile);
  return ceil_div(dst_tiles, ceil_div(dst_tiles, dst_split));
}

// Feature split in use: > 1 only when the tile pairs are too few to fill the GPU and their
// partial tiles fit the buffer. Read from the device offsets, so no host sync; the decisions
// do not depend on it (only the screening order does).
__device__ __forceinline__ int64_t feature_split(const Params& p) {
  const int64_t pairs = p.pair_offsets[p.num_windows];
  if (pairs == 0 || p.max_feature_split < 2) return 1;
  const int64_t split = min(min(p.max_feature_split, p.feature_chunks / kMinSplitChunks),
                            min(kPartialItems, p.partial_capacity / (kTile * kTile)) / pairs);
  if (split < 2) return 1;
  return ceil_div(p.feature_chunks, ceil_div(p.feature_chunks, split));  // no empty split
}

// Direct mode: item (src tile, dst range) keeps the best of the range's dsts per src.
// Partial mode: item (tile pair, feature split) writes its partial dot tile.
template <typename M>
__global__ void __launch_bounds__(kScreenThreads) screen_kernel(const Params p) {
  detail::await_previous_kernel();
  using Acc = typename Screen<M>::Acc;
  __shared__ ScreenSmem<M> sm;
  const int64_t split = feature_split(p);
  const bool partial = split > 1;
  const int64_t items = partial ? p.pair_offsets[p.num_windows] * split : p.tile_offsets[p.num_windows] * p.dst_split;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t unit = item / (partial ? split : p.dst_split), part = item % (partial ? split : p.dst_split);
    const int64_t w = find_segment(partial ? p.pair_offsets : p.tile_offsets, p.num_windows, unit);
    const int64_t start = p.window_offsets[w], n = p.window_offsets[w + 1] - start;
    const int64_t n_src = (n + 1) / 2, n_dst = n / 2, dst_tiles = ceil_div(n_dst, kTile);
    if (!partial && part >= used_dst_ranges(n_dst, p.dst_split)) continue;  // no dsts, no list; uniform
    __syncthreads();  // the previous item is done with the side data
    if (partial) {
      const int64_t local = unit - p.pair_offsets[w];
      const int64_t src_tile = local / dst_tiles, dst_tile = local % dst_tiles;
      setup_tiles(p, sm, start, src_tile, n_src, dst_tile, n_dst, true);
      const int src_live = live_slots(src_tile, n_src), dst_live = live_slots(dst_tile, n_dst);
      const int64_t per_split = ceil_div(p.feature_chunks, split) * Screen<M>::kChunk;
      tile_dots<M>(p, sm, part * per_split, min(p.features, (part + 1) * per_split));
      // Only the live corner: small windows fill a few hundred of the tile's 4096 entries.
      Acc* out = static_cast<Acc*>(p.partial) + (part * p.pair_offsets[p.num_windows] + unit) * kTile * kTile;
      for (int e = threadIdx.x; e < src_live * dst_live; e += kScreenThreads) {
        const int r = e / dst_live, c = e % dst_live;
        out[r * kTile + c] = sm.dot[r][c];
      }
      continue;
    }
    const int64_t src_tile = unit - p.tile_offsets[w];
    const int64_t per_range = ceil_div(dst_tiles, p.dst_split), first_dst = part * per_range;
    TopList<Acc> top;
    // The range holds a dst tile (used_dst_ranges); tile_dots' first barrier shows the sides.
    for (int64_t dst_tile = first_dst; dst_tile < min(dst_tiles, first_dst + per_range); ++dst_tile) {
      const PendingNorm norm = setup_tiles(p, sm, start, src_tile, n_src, dst_tile, n_dst, dst_tile == first_dst);
      tile_dots<M>(p, sm, 0, p.features);
      norm.store();
      __syncthreads();  // the norms are visible to keep_best
      keep_best<M>(sm, dst_tile, top);
    }
    write_list<M>(p, sm, start, src_tile, part, top);
  }
}

// Partial mode: per src tile, the dot tiles of all its dst tiles summed over the splits in split
// order, then the best per src as in direct mode (dst range 0).
template <typename M>
__global__ void __launch_bounds__(kScreenThreads) reduce_partials_kernel(const Params p) {
  detail::await_previous_kernel();
  using Acc = typename Screen<M>::Acc;
  __shared__ ScreenSmem<M> sm;
  const int64_t split = feature_split(p);
  if (split == 1) return;
  const int64_t pairs = p.pair_offsets[p.num_windows];
  const Acc* partial = static_cast<const Acc*>(p.partial);
  for (int64_t tile = blockIdx.x; tile < p.tile_offsets[p.num_windows]; tile += gridDim.x) {
    const int64_t w = find_segment(p.tile_offsets, p.num_windows, tile);
    const int64_t start = p.window_offsets[w], n = p.window_offsets[w + 1] - start;
    const int64_t n_src = (n + 1) / 2, n_dst = n / 2, dst_tiles = ceil_div(n_dst, kTile);
    const int64_t src_tile = tile - p.tile_offsets[w];
    __syncthreads();  // the previous item is done with the side data
    const int src_live = live_slots(src_tile, n_src);
    TopList<Acc> top;
    for (int64_t dst_tile = 0; dst_tile < dst_tiles; ++dst_tile) {
      // Later tiles: the previous tile's epilogue is also done with the tile.
      const PendingNorm norm = setup_tiles(p, sm, start, src_tile, n_src, dst_tile, n_dst, dst_tile == 0);
      const int dst_live = live_slots(dst_tile, n_dst);
      const int64_t pair = p.pair_offsets[w] + src_tile * dst_tiles + dst_tile;
      for (int e = threadIdx.x; e < src_live * dst_live; e += kScreenThreads) {  // the live corner
        const int r = e / dst_live, c = e % dst_live;
        const Acc* at = partial + pair * kTile * kTile + r * kTile + c;
        Acc sum = at[0];
#pragma unroll 8
        for (int64_t s = 1; s < split; ++s) sum += at[s * pairs * kTile * kTile];  // loads independent
        sm.dot[r][c] = sum;
      }
      norm.store();
      __syncthreads();
      keep_best<M>(sm, dst_tile, top);
    }
    write_list<M>(p, sm, start, src_tile, 0, top);
  }
}

// The contract's similarity from a float64 dot product and the two norms.
__device__ __forceinline__ double cosine(double dot, double norm_a, double norm_b) {
  return dot / (norm_a * norm_b + 1e-8);
}

// Exact float64 cosine of two tokens' metrics, summed in a fixed order; the same in every lane.
template <typename M, int kInFlight>
__device__ double exact_similarity(const Params& p, int64_t src_token, int64_t dst_token, int lane) {
  const double dot = warp_sum(lane_dot<M, kInFlight>(p, token_base(p, src_token), token_base(p, dst_token), lane));
  return cosine(dot, p.norms[src_token], p.norms[dst_token]);
}

// One warp per src of a merging window: its best dst by exact float64 cosine (see 4b above).
// The src's lists (one per dst range, kTopK entries each, padded with (-inf, INT_MAX)) hold
// distinct dsts, so their union's kTopK best are what merging the lists would keep: the exact
// scan covers every dst when at least kTopK entries are within 2 eps of the best screened value
// (the kTopK-th best is then within it too, and a dst past the lists could be as close), or when
// that value is not finite; else exactly the entries within 2 eps. Neither needs the lists merged
// or sorted: a warp maximum, a count, and the candidates in any order (the best by `beats` is the
// same in every order). The lane of entry e loads it: entries lane, lane + 32, ...
// kInFlight: lane_dot's steps in flight (kChooseShortRow or 4).
template <typename M, int kInFlight>
__global__ void __launch_bounds__(kChooseThreads, kInFlight == kChooseShortRow ? 4 : 3) choose_kernel(const Params p) {
  detail::await_previous_kernel();
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  const int64_t warps = kChooseThreads / 32;
  const bool partial = feature_split(p) > 1;
  const int64_t srcs = p.src_offsets[p.num_windows];
  for (int64_t src = blockIdx.x * warps + threadIdx.x / 32; src < srcs;
       src += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t w = find_segment(p.src_offsets, p.num_windows, src);
    const int64_t start = p.window_offsets[w], n = p.window_offsets[w + 1] - start;
    const int64_t slot = start + 2 * (src - p.src_offsets[w]);
    const int64_t entries = (partial ? 1 : used_dst_ranges(n / 2, p.dst_split)) * kTopK;
    // Entry e: place e % kTopK of the list of dst range e / kTopK.
    const auto entry_at = [&](int64_t e) { return (e / kTopK * p.total + slot) * kTopK + e % kTopK; };
    const int64_t src_token = p.window_tokens[slot];
    double best_screened = -INFINITY;  // padding is -inf, and no screened value is NaN (keep_best)
    for (int64_t e = lane; e < entries; e += 32) {
      best_screened = fmax(best_screened, p.range_value[entry_at(e)]);
      detail::prefetch_to_l1(&p.range_dst[entry_at(e)]);  // read by the candidates below
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      best_screened = fmax(best_screened, __shfl_xor_sync(kAll, best_screened, offset));
    }
    const double threshold = best_screened - 2.0 * p.eps;
    // Entry e is within 2 eps: with a finite best value, padding (-inf) never is.
    const auto near_entry = [&](int64_t e) { return e < entries && p.range_value[entry_at(e)] >= threshold; };
    int near = 0;
    for (int64_t e0 = 0; e0 < entries; e0 += 32) near += __popc(__ballot_sync(kAll, near_entry(e0 + lane)));
    const bool scan_all = !isfinite(best_screened) || near >= kTopK;
    double best = -INFINITY;
    int best_at = INT_MAX;
    if (scan_all) {
      // Increasing dst order with a strict >: the lowest dst wins ties; NaN never wins.
      for (int64_t j = 0; j < n / 2; ++j) {
        const double value = exact_similarity<M, kInFlight>(p, src_token, p.window_tokens[start + 2 * j + 1], lane);
        if (value > best) {
          best = value;
          best_at = static_cast<int>(j);
        }
      }
    } else {
      for (int64_t e0 = 0; e0 < entries; e0 += 32) {
        const bool listed = near_entry(e0 + lane);
        const int my_dst = listed ? p.range_dst[entry_at(e0 + lane)] : INT_MAX;
        for (unsigned candidates = __ballot_sync(kAll, listed); candidates != 0; candidates &= candidates - 1) {
          const int dst = __shfl_sync(kAll, my_dst, __ffs(candidates) - 1);
          const int64_t dst_token = p.window_tokens[start + 2 * int64_t{dst} + 1];
          const double value = exact_similarity<M, kInFlight>(p, src_token, dst_token, lane);
          if (beats(value, dst, best, best_at)) {
            best = value;
            best_at = dst;
          }
        }
      }
    }
    if (lane != 0) continue;
    const bool found = best_at != INT_MAX;  // else no comparable dst (NaN metric): ranked last, never merged
    p.keys[slot] = found ? best : -INFINITY;
    p.best_dst[slot] = found ? static_cast<int32_t>(2 * static_cast<int64_t>(best_at) + 1) : -1;
  }
}

// Per 64-src tile of a merging window: each src's rank among the window's srcs (score
// descending, ties: lower position first) is the number of srcs that beat it, counted by
// kRankParts threads per src over shared-memory chunks of keys. The first r srcs with a dst are
// merged. O(srcs^2) per window, spread over its tiles: cheap next to the similarities.
__global__ void __launch_bounds__(kRankThreads) rank_select_kernel(const Params p) {
  detail::await_previous_kernel();
  constexpr int kRankParts = kRankThreads / kTile;
  __shared__ double chunk_key[kRankThreads];
  __shared__ int32_t beaten_by[kRankParts][kTile];
  const int local = threadIdx.x % kTile, part = threadIdx.x / kTile;
  for (int64_t tile = blockIdx.x; tile < p.tile_offsets[p.num_windows]; tile += gridDim.x) {
    const int64_t w = find_segment(p.tile_offsets, p.num_windows, tile);
    const int64_t start = p.window_offsets[w], n = p.window_offsets[w + 1] - start, srcs = (n + 1) / 2;
    const int64_t i = (tile - p.tile_offsets[w]) * kTile + local;  // this thread's src
    const double key = i < srcs ? p.keys[start + 2 * i] : 0.0;
    int32_t count = 0;
    for (int64_t chunk = 0; chunk < srcs; chunk += kRankThreads) {
      const int64_t j = chunk + threadIdx.x;
      chunk_key[threadIdx.x] = j < srcs ? p.keys[start + 2 * j] : 0.0;
      __syncthreads();
      const int64_t chunk_srcs = min(int64_t{kRankThreads}, srcs - chunk);
      for (int64_t c = part; c < chunk_srcs; c += kRankParts) {
        const double other = chunk_key[c];
        count += other > key || (other == key && chunk + c < i) ? 1 : 0;
      }
      __syncthreads();  // the chunk is read before the next one replaces it
    }
    beaten_by[part][local] = count;
    __syncthreads();
    if (part == 0 && i < srcs) {
      int64_t rank = 0;
      for (int q = 0; q < kRankParts; ++q) rank += beaten_by[q][local];
      const int32_t dst_position = p.best_dst[start + 2 * i];
      if (rank < merge_count(p.ratio, n) && dst_position >= 0) {
        p.merged_into[p.window_tokens[start + 2 * i]] = p.window_tokens[start + dst_position];
      }
    }
    __syncthreads();  // beaten_by is read before the next tile writes it
  }
}

// Element e of the 16 bytes `raw` as a run of S.
template <typename S>
__device__ __forceinline__ S vector_element(const uint4& raw, int e) {
  S value;
  memcpy(&value, reinterpret_cast<const char*>(&raw) + e * sizeof(S), sizeof(S));
  return value;
}

// 32-bit word w of the 16 bytes `raw` (w a compile-time constant after unrolling).
__device__ __forceinline__ uint32_t vector_word(const uint4& raw, int w) {
  return w == 0 ? raw.x : w == 1 ? raw.y : w == 2 ? raw.z : raw.w;
}

// Features a warp of exact_dots_kernel covers per step: each lane loads kExactVectors 16-byte
// vectors of each of its two rows.
template <typename M>
__host__ __device__ constexpr int64_t exact_step_features() {
  return 4 * kExactVectors * (16 / sizeof(typename Screen<M>::Stage));
}

// Exact mode, one warp per item (window, feature split, group of kGroup 8-src blocks, group of
// kGroup 8-dst blocks), for every window of at most exact_window tokens that merges anything: the
// float64 dot products of the item's (src, dst) pairs over the split's features, and the squared
// norms of its tokens (the srcs' in the items of dst group 0, the dsts' in those of src group 0),
// into exact_partial at the window's start: pair (i, j) at i n_dst + j, then the norms by window
// position. No barrier: lane (row, quad) copies src `row` and dst `row` of each of its blocks,
// kExactVectors 16-byte vectors of each per step, in batches into a ring of kExactStages batches
// of its own in shared memory (cp.async), two batches ahead of the one it multiplies, so memory
// latency overlaps the products (loads straight into registers made the warp wait a round trip
// per batch: a third of its cycles at LLaVA-1.5 batch 32). A slot is read only by the lane that
// copied it, so the lane waits for its own copies, and for nothing else. Each value it holds is
// one k of a float64 mma.m8n8k4 (A[row][quad]: the src's, B[quad][row]: the dst's), so the
// accumulators end as D[row][2 quad, +1], and the lane sums its rows' squares in the same order;
// the quad then adds its four norm sums as (0 + 1) + (2 + 3). Which lane holds which feature
// depends on neither the layout, nor a token's position, nor kGroup: equal tokens get equal sums,
// and both variants the same sums for the same split. kGroup = 3 (a LLaVA-1.5 window's 3 x 3 block pairs in one item)
// converts each value to float64 once per item where a block pair's item (kGroup = 1) converts it
// once per partner block, and the conversions run at a quarter of the float64 rate. kStackedSrcs
// (groups, unless LIGHTKV_EXACT_MMA=8) multiplies src blocks 2 i and 2 i + 1 of a group by each dst
// block in one mma.m16n8k4 (sm_90 on) instead of two mma.m8n8k4: 6 float64 tensor-core
// instructions per k-step of a 3 x 3 group instead of 9, the same lanes holding the same values
// (H200, LLaVA-1.5 batch 32: 117 -> 93 µs, the same bits).
// kScreened (16-bit metrics, windows of at most kExactWindow tokens): the same lanes, rows and
// vectors, but each vector's 8 values per row are two k-steps of the 16-bit tensor cores
// (mma.m16n8k16, src blocks 2 i and 2 i + 1 stacked as rows 0-7 and 8-15, whose accumulators are
// laid out as the float64 ones), float32 sums over the vector's 32 features added into the
// float64 accumulators, and the squared norms likewise: screened sums, within
// exact_screen_eps of the exact cosines, that exact_select_kernel rechecks in float64 where they
// leave a decision open. No conversion to float64 per value (a quarter of the float64 rate).
template <typename M, int kGroup, bool kStackedSrcs = false, bool kScreened = false>
__global__ void __launch_bounds__(kExactThreads, kGroup == 1 ? kExactBlocksPerSm : kExactGroupBlocksPerSm)
    exact_dots_kernel(const Params p) {
  detail::await_previous_kernel();
  using S = typename Screen<M>::Stage;
  constexpr int kPerVector = 16 / sizeof(S);
  constexpr int64_t kStep = exact_step_features<M>();
  constexpr int kWarps = kExactThreads / 32;
  // Vectors of each row per batch: half a block pair's step; a group's 6 rows one vector at a time
  // (at 2, ptxas spills even with 255 registers).
  constexpr int kBatch = kGroup == 1 ? kExactVectors / 2 : 1;
  static_assert(kExactVectors % kBatch == 0, "whole batches per step");
  constexpr int kSlots = 2 * kGroup * kBatch;  // 16-byte vectors a lane copies per batch
  __shared__ uint4 staged[kWarps][kExactStages][kSlots][32];
  const S* __restrict__ metric = static_cast<const S*>(p.metric);
  const int lane = threadIdx.x % 32, row = lane / 4, quad = lane % 4;
  uint4 (&ring)[kExactStages][kSlots][32] = staged[threadIdx.x / 32];
  const int64_t groups = ceil_div(p.exact_blocks, kGroup), group_pairs = groups * groups;
  const int64_t items = p.num_windows * p.exact_split * group_pairs;
  const int64_t per_split = ceil_div(p.exact_steps, p.exact_split) * kStep;
  if (p.select_tickets != nullptr) {  // exact_select_kernel's tickets start at 0
    for (int64_t w = blockIdx.x * int64_t{kExactThreads} + threadIdx.x; w < p.num_windows;
         w += int64_t{gridDim.x} * kExactThreads) {
      p.select_tickets[w] = 0;
    }
  }
  if (p.row_tickets != nullptr && blockIdx.x == 0) {
    for (int64_t b = threadIdx.x; b < p.tokens / p.L; b += kExactThreads) p.row_tickets[b] = 0;
  }
  for (int64_t item = blockIdx.x * int64_t{kWarps} + threadIdx.x / 32; item < items;
       item += int64_t{gridDim.x} * kWarps) {
    const int64_t w = item / (p.exact_split * group_pairs), split = item / group_pairs % p.exact_split;
    const int64_t src_group = item % group_pairs / groups, dst_group = item % groups;
    const int64_t start = p.window_offsets[w], n = p.window_offsets[w + 1] - start;
    const int64_t n_src = (n + 1) / 2, n_dst = n / 2;
    const int64_t src_first = src_group * kGroup * kExactBlock, dst_first = dst_group * kGroup * kExactBlock;
    // Uniform over the warp: windows too large or not merging, groups past the window's end.
    if (n > p.exact_window || merge_count(p.ratio, n) == 0) continue;
    if (src_first >= n_src || dst_first >= n_dst) continue;
    // This lane's rows: src / dst `row` of each block of the item.
    bool src_live[kGroup], dst_live[kGroup];
    int64_t src_base[kGroup], dst_base[kGroup];
#pragma unroll
    for (int b = 0; b < kGroup; ++b) {
      const int64_t src = src_first + b * kExactBlock + row, dst = dst_first + b * kExactBlock + row;
      src_live[b] = src < n_src;
      dst_live[b] = dst < n_dst;
      src_base[b] = src_live[b] ? token_base(p, p.window_tokens[start + 2 * src]) : 0;
      dst_base[b] = dst_live[b] ? token_base(p, p.window_tokens[start + 2 * dst + 1]) : 0;
    }
    const int64_t f_begin = split * per_split, f_end = min(p.features, f_begin + per_split);
    // Vector v of the lane in a step: features kPerVector (quad + 4 v) + 0 .. kPerVector - 1 of it,
    // whatever the layout (so are the sums); one cursor walks the lane's vectors.
    FeatureCursor feature(p, f_begin + kPerVector * quad);
    double acc[kGroup][kGroup][2] = {}, src_norm[kGroup] = {}, dst_norm[kGroup] = {};
    // The steps, with the squared norms only where this item writes them (dst group 0: the srcs',
    // src group 0: the dsts'): the float64 pipe does no other item's norms (LLaVA-1.5's block
    // pairs: 4 of 9 do none). Compile-time flags, so the other items' loops hold no norm FMA.
    const auto steps = [&](auto with_src_norms, auto with_dst_norms) {
      // kScreened: one vector of each row (rows[2 g]: src block g's, rows[2 g + 1]: dst block g's).
      const auto screen_vector = [&](const uint4(&rows)[2 * kGroup]) {
        if constexpr (kScreened) {
          static_assert(4 * 16 / sizeof(S) == kScreenedRun, "exact_screen_eps bounds float32 sums of kScreenedRun features");
          constexpr int kStacks = (kGroup + 1) / 2;  // src blocks 2 s and 2 s + 1 (zeros past kGroup)
          float dots[kStacks][kGroup][4] = {};
#pragma unroll
          for (int half = 0; half < 2; ++half) {  // k-step: words 2 half (k = 2 quad, +1) and 2 half + 1 (k + 8)
#pragma unroll
            for (int s = 0; s < kStacks; ++s) {
              const bool bottom = 2 * s + 1 < kGroup;
              const uint32_t a[4] = {vector_word(rows[4 * s], 2 * half),
                                     bottom ? vector_word(rows[4 * s + 2], 2 * half) : 0u,
                                     vector_word(rows[4 * s], 2 * half + 1),
                                     bottom ? vector_word(rows[4 * s + 2], 2 * half + 1) : 0u};
#pragma unroll
              for (int db = 0; db < kGroup; ++db) {
                const uint32_t b[2] = {vector_word(rows[2 * db + 1], 2 * half), vector_word(rows[2 * db + 1], 2 * half + 1)};
                detail::mma_m16n8k16<M>(dots[s][db], a, b);
              }
            }
          }
#pragma unroll
          for (int s = 0; s < kStacks; ++s)
#pragma unroll
            for (int db = 0; db < kGroup; ++db)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                acc[2 * s][db][e] += static_cast<double>(dots[s][db][e]);
                if (2 * s + 1 < kGroup) acc[2 * s + 1][db][e] += static_cast<double>(dots[s][db][2 + e]);
              }
          constexpr int kPerVector = 16 / sizeof(S);
#pragma unroll
          for (int g = 0; g < kGroup; ++g) {
            float src_square = 0.f, dst_square = 0.f;
#pragma unroll
            for (int e = 0; e < kPerVector; ++e) {
              if constexpr (decltype(with_src_norms)::value) {
                const float x = detail::bits_to_float(vector_element<S>(rows[2 * g], e), M());
                src_square = fmaf(x, x, src_square);
              }
              if constexpr (decltype(with_dst_norms)::value) {
                const float y = detail::bits_to_float(vector_element<S>(rows[2 * g + 1], e), M());
                dst_square = fmaf(y, y, dst_square);
              }
            }
            if constexpr (decltype(with_src_norms)::value) src_norm[g] += static_cast<double>(src_square);
            if constexpr (decltype(with_dst_norms)::value) dst_norm[g] += static_cast<double>(dst_square);
          }
        }
      };
      // The next held value of each row: a[g], b[g] of the src and dst rows of block g.
      const auto add = [&](const S (&a)[kGroup], const S (&b)[kGroup]) {
        double x[kGroup], y[kGroup];
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          x[g] = staged_to_double<M>(a[g]);
          y[g] = staged_to_double<M>(b[g]);
          if constexpr (decltype(with_src_norms)::value) src_norm[g] = fma(x[g], x[g], src_norm[g]);
          if constexpr (decltype(with_dst_norms)::value) dst_norm[g] = fma(y[g], y[g], dst_norm[g]);
        }
        if constexpr (kStackedSrcs) {
#pragma unroll
          for (int sb = 0; sb + 1 < kGroup; sb += 2) {
#pragma unroll
            for (int db = 0; db < kGroup; ++db) {
              detail::mma_m16n8k4(acc[sb][db], acc[sb + 1][db], x[sb], x[sb + 1], y[db]);
            }
          }
          if constexpr (kGroup % 2 == 1) {
#pragma unroll
            for (int db = 0; db < kGroup; ++db) detail::mma_m8n8k4(acc[kGroup - 1][db], x[kGroup - 1], y[db]);
          }
        } else {
#pragma unroll
          for (int sb = 0; sb < kGroup; ++sb)
#pragma unroll
            for (int db = 0; db < kGroup; ++db) detail::mma_m8n8k4(acc[sb][db], x[sb], y[db]);
        }
      };
      if (p.vector_stage) {  // zeros past the split or the window
        const int64_t batches = ceil_div(max(f_end - f_begin, int64_t{0}), kStep) * (kExactVectors / kBatch);
        // Starts copying batch `batch` (when there is one) into stage `stage` of the lane's ring.
        const auto copy_batch = [&](int64_t batch, int stage) {
          if (batch < batches) {
#pragma unroll
            for (int v = 0; v < kBatch; ++v) {
              const bool in_range = f_begin + kPerVector * (quad + 4 * (batch * kBatch + v)) < f_end;
#pragma unroll
              for (int g = 0; g < kGroup; ++g) {
                detail::copy_16_bytes_async(&ring[stage][2 * (kGroup * v + g)][lane],
                                            metric + src_base[g] + feature.offset(), in_range && src_live[g], metric);
                detail::copy_16_bytes_async(&ring[stage][2 * (kGroup * v + g) + 1][lane],
                                            metric + dst_base[g] + feature.offset(), in_range && dst_live[g], metric);
              }
              feature.advance(4 * kPerVector);
            }
          }
          detail::close_async_copy_group();
        };
        for (int stage = 0; stage < kExactStages - 1; ++stage) copy_batch(stage, stage);
        int read_stage = 0;
#pragma unroll 1
        for (int64_t batch = 0; batch < batches; ++batch) {
          detail::wait_async_copy_groups_but_newest<kExactStages - 2>();  // this batch has landed
          uint4 raw[kSlots];
#pragma unroll
          for (int q = 0; q < kSlots; ++q) raw[q] = ring[read_stage][q][lane];
          // Into the stage of the previous batch, whose values the previous iteration multiplied.
          const int write_stage = read_stage == 0 ? kExactStages - 1 : read_stage - 1;
          copy_batch(batch + kExactStages - 1, write_stage);
          read_stage = read_stage + 1 == kExactStages ? 0 : read_stage + 1;
#pragma unroll
          for (int v = 0; v < kBatch; ++v) {
            if constexpr (kScreened) {
              uint4 rows[2 * kGroup];
#pragma unroll
              for (int q = 0; q < 2 * kGroup; ++q) rows[q] = raw[2 * kGroup * v + q];
              screen_vector(rows);
            } else {
#pragma unroll
              for (int e = 0; e < kPerVector; ++e) {
                S a[kGroup], b[kGroup];
#pragma unroll
                for (int g = 0; g < kGroup; ++g) {
                  a[g] = vector_element<S>(raw[2 * (kGroup * v + g)], e);
                  b[g] = vector_element<S>(raw[2 * (kGroup * v + g) + 1], e);
                }
                add(a, b);
              }
            }
          }
        }
      } else {  // odd layouts: the same values in the same order, one at a time
        for (int64_t f0 = f_begin; f0 < f_end; f0 += kStep) {
#pragma unroll 1
          for (int v = 0; v < kExactVectors; ++v) {
            const int64_t first = f0 + kPerVector * (quad + 4 * v);
            FeatureCursor at = feature;
            S vectors[2 * kGroup][kPerVector];  // kScreened: the vectors' values, as the vector path holds them
#pragma unroll
            for (int e = 0; e < kPerVector; ++e) {
              const bool in_range = first + e < f_end;
              S a[kGroup], b[kGroup];
#pragma unroll
              for (int g = 0; g < kGroup; ++g) {
                a[g] = in_range && src_live[g] ? stage_value<M>(p, src_base[g] + at.offset()) : S(0);
                b[g] = in_range && dst_live[g] ? stage_value<M>(p, dst_base[g] + at.offset()) : S(0);
                vectors[2 * g][e] = a[g];
                vectors[2 * g + 1][e] = b[g];
              }
              if constexpr (!kScreened) add(a, b);
              at.advance(1);
            }
            if constexpr (kScreened) {
              uint4 rows[2 * kGroup];
#pragma unroll
              for (int q = 0; q < 2 * kGroup; ++q) memcpy(&rows[q], vectors[q], sizeof(uint4));
              screen_vector(rows);
            }
            feature.advance(4 * kPerVector);
          }
        }
      }
    };
    const bool src_norms = dst_group == 0, dst_norms = src_group == 0;  // uniform over the warp
    if (src_norms && dst_norms) {
      steps(std::true_type{}, std::true_type{});
    } else if (src_norms) {
      steps(std::true_type{}, std::false_type{});
    } else if (dst_norms) {
      steps(std::false_type{}, std::true_type{});
    } else {
      steps(std::false_type{}, std::false_type{});
    }
    double* out = p.exact_partial + (split * p.total + start) * p.exact_slot;
    double* norm_out = out + n_src * n_dst;
#pragma unroll
    for (int sb = 0; sb < kGroup; ++sb) {
      const int64_t src = src_first + sb * kExactBlock + row;
#pragma unroll
      for (int db = 0; db < kGroup; ++db) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = dst_first + db * kExactBlock + 2 * quad + e;
          if (src_live[sb] && j < n_dst) out[src * n_dst + j] = acc[sb][db][e];
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      // (0 + 1), (2 + 3), then their sum: addition commutes bitwise, so every lane of a quad agrees.
#pragma unroll
      for (int offset = 1; offset <= 2; offset *= 2) {
        src_norm[g] += __shfl_xor_sync(0xffffffffu, src_norm[g], offset);
        dst_norm[g] += __shfl_xor_sync(0xffffffffu, dst_norm[g], offset);
      }
      const int64_t src = src_first + g * kExactBlock + row, dst = dst_first + g * kExactBlock + row;
      if (quad == 0 && src_norms && src_live[g]) norm_out[2 * src] = src_norm[g];
      if (quad == 0 && dst_norms && dst_live[g]) norm_out[2 * dst + 1] = dst_norm[g];
    }
  }
  // Last, where it takes no registers from the products (at the start, float16 block pairs spill).
  detail::prefetch_to_l2(p.prefetch_base, p.prefetch_bytes);
}

// Position j of n in a list sorted by group key (sorted[j] its group's key), holding member token
// `token`, into its group's record: begin / end (plus `offset`) where j starts / ends the group,
// and the member where it is among the group's first kStagedMembers.
template <typename Key>
__device__ __forceinline__ void record_member(Group& group, const Key* sorted, int64_t j, int64_t n, int64_t offset,
                                              int64_t token) {
  const Key key = sorted[j];
  int at = 0;  // position in the group, as far as it matters
  while (at < kStagedMembers && j > at && sorted[j - at - 1] == key) ++at;
  if (at == 0) group.begin = offset + j;
  if (at < kStagedMembers) group.first[at] = token;
  if (j + 1 == n || sorted[j + 1] != key) group.end = offset + j + 1;
}

__global__ void kept_flags_kernel(const int64_t* __restrict__ merged_into, int64_t tokens,
                                  int64_t* __restrict__ flags) {
  detail::await_previous_kernel();
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < tokens;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    flags[g] = merged_into[g] < 0 ? 1 : 0;
  }
}

// Output slot of every token's group; index / assignment; the (slot, token) sort pairs.
// Slots at or past M (only if the caller's `kept` is wrong) are dropped instead of written.
__global__ void slots_kernel(const int64_t* __restrict__ merged_into, const int64_t* __restrict__ kept_before,
                             int64_t tokens, int64_t L, int64_t kept, int64_t* __restrict__ index,
                             int64_t* __restrict__ assignment, LocalBases bases, uint64_t* __restrict__ slot_key,
                             int64_t* __restrict__ token_id) {
  detail::await_previous_kernel();
  const int64_t rows = tokens / L;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < tokens;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = g / L;
    const int64_t anchor = merged_into[g] < 0 ? g : merged_into[g];
    const int64_t m = kept_before[anchor] - kept_before[b * L];
    const bool valid = m >= 0 && m < kept;
    assignment[g] = m - bases.slot_of(g);
    if (valid && anchor == g) index[b * kept + m] = g - b * L - bases.l_of(g);
    slot_key[g] = static_cast<uint64_t>(valid ? b * kept + m : rows * kept);
    token_id[g] = g;
  }
}

__global__ void group_bounds_kernel(const uint64_t* __restrict__ sorted_slot, const int64_t* __restrict__ sorted_token,
                                    int64_t tokens, uint64_t slots, Group* __restrict__ groups) {
  detail::await_previous_kernel();
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < tokens;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t key = sorted_slot[j];
    if (key < slots) record_member(groups[key], sorted_slot, j, tokens, 0, sorted_token[j]);
  }
}

using RowScan = cub::BlockScan<int32_t, kRowThreads>;

// Shared memory of group_row.
template <int kRowItems>
struct RowGroupsSmem {
  using Sort = cub::BlockRadixSort<uint32_t, kRowThreads, kRowItems, uint32_t>;
  union {
    typename RowScan::TempStorage scan;
    typename Sort::TempStorage sort;
  } storage;
  uint32_t slot_of[kRowThreads * kRowItems];  // slot of each kept token by l, then the sorted slots
};

// The first steps of group_row and number_row for row `row` (its first flat id) of L tokens, by a
// block of kRowThreads threads, thread t holding tokens l = kRowItems t + i (CUB's blocked
// arrangement): anchor[i], the l of the kept token that token l ends in (merged_into read with
// __ldcg: other blocks of the calling kernel may have written it), and slot_of[l] of every kept
// token, numbered in token order by a block scan (read it after a barrier). Returns the row's
// kept tokens.
template <int kRowItems>
__device__ int32_t number_kept_tokens(const int64_t* __restrict__ merged_into, int64_t row, int64_t L,
                                      typename RowScan::TempStorage& scan, uint32_t* slot_of,
                                      int32_t (&anchor)[kRowItems]) {
  int32_t kept_here = 0;
#pragma unroll
  for (int i = 0; i < kRowItems; ++i) {
    const int64_t l = kRowItems * static_cast<int64_t>(threadIdx.x) + i;
    const int64_t into = l < L ? __ldcg(merged_into + row + l) : -1;
    anchor[i] = static_cast<int32_t>(into < 0 ? l : into - row);
    kept_here += l < L && anchor[i] == l ? 1 : 0;
  }
  int32_t next_slot = 0, row_kept = 0;
  RowScan(scan).ExclusiveSum(kept_here, next_slot, row_kept);
#pragma unroll
  for (int i = 0; i < kRowItems; ++i) {
    const int l = kRowItems * static_cast<int>(threadIdx.x) + i;
    if (l < L && anchor[i] == l) slot_of[l] = static_cast<uint32_t>(next_slot++);
  }
  return row_kept;
}

// Row b of at most kRowThreads * kRowItems tokens, by a block of kRowThreads threads: what the
// general path gets from the kept-flag scan, slots_kernel, the radix sort and group_bounds_kernel.
// Thread t holds tokens l = kRowItems t + i (CUB's blocked arrangement); the block scan numbers
// the kept tokens, and a stable block radix sort on the slot groups the members in token order.
// Reads merged_into with __ldcg (other blocks of the calling kernel may have written it); ends
// with the block done with `smem`.
template <int kRowItems>
__device__ void group_row(const int64_t* __restrict__ merged_into, int64_t b, int64_t L, int64_t kept, int key_bits,
                          int64_t* __restrict__ index, int64_t* __restrict__ assignment, LocalBases bases,
                          int64_t* __restrict__ members, Group* __restrict__ groups, RowGroupsSmem<kRowItems>& smem) {
  using Smem = RowGroupsSmem<kRowItems>;
  const uint32_t none = static_cast<uint32_t>(kept);  // slot key of padding and of slots >= kept
  const int64_t row = b * L;
  for (int64_t m = threadIdx.x; m < kept; m += kRowThreads) {  // empty unless a member says otherwise
    groups[b * kept + m] = Group{};
  }
  int32_t anchor[kRowItems];
  number_kept_tokens<kRowItems>(merged_into, row, L, smem.storage.scan, smem.slot_of, anchor);
  __syncthreads();
  uint32_t key[kRowItems], token[kRowItems];
#pragma unroll
  for (int i = 0; i < kRowItems; ++i) {
    const int l = kRowItems * static_cast<int>(threadIdx.x) + i;
    token[i] = static_cast<uint32_t>(l);
    key[i] = none;
    if (l >= L) continue;
    const uint32_t m = smem.slot_of[anchor[i]];
    assignment[row + l] = m - bases.slot_of(row + l);
    if (m < none) {
      key[i] = m;
      if (anchor[i] == l) index[b * kept + m] = l - bases.l_of(row + l);
    }
  }
  __syncthreads();  // slot_of is read before it holds the sorted slots
  typename Smem::Sort(smem.storage.sort).Sort(key, token, 0, key_bits);
#pragma unroll
  for (int i = 0; i < kRowItems; ++i) {
    const int j = kRowItems * static_cast<int>(threadIdx.x) + i;
    smem.slot_of[j] = key[i];
    if (j < L) members[row + j] = row + token[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kRowItems; ++i) {
    const int j = kRowItems * static_cast<int>(threadIdx.x) + i;
    if (j >= L || key[i] == none) continue;
    record_member(groups[b * kept + key[i]], smem.slot_of, j, L, row, row + token[i]);
  }
  __syncthreads();  // slot_of and the sort storage are free for the next row
}

// Rows of at most kRowThreads * kRowItems tokens, one block each (group_row), where exact mode
// does not group them itself (screened mode, or LIGHTKV_FUSED_GROUPS=0).
template <int kRowItems>
__global__ void __launch_bounds__(kRowThreads)
    row_groups_kernel(const int64_t* __restrict__ merged_into, int64_t rows, int64_t L, int64_t kept, int key_bits,
                      int64_t* __restrict__ index, int64_t* __restrict__ assignment, LocalBases bases,
                      int64_t* __restrict__ members, Group* __restrict__ groups) {
  detail::await_previous_kernel();
  __shared__ RowGroupsSmem<kRowItems> smem;
  for (int64_t b = blockIdx.x; b < rows; b += gridDim.x) {
    group_row<kRowItems>(merged_into, b, L, kept, key_bits, index, assignment, bases, members, groups, smem);
  }
}

// A group written by another block of the running kernel, read from L2 (__ldcg).
__device__ __forceinline__ Group load_group(const Group* from) {
  Group group;
  group.begin = __ldcg(&from->begin);
  group.end = __ldcg(&from->end);
#pragma unroll
  for (int i = 0; i < kStagedMembers; ++i) group.first[i] = __ldcg(&from->first[i]);
  return group;
}

// Shared memory of number_row.
template <int kRowItems>
struct RowSlotsSmem {
  typename RowScan::TempStorage scan;
  uint32_t slot_of[kRowThreads * kRowItems];  // slot of each kept token, by l
};

// group_row's results for row b of at most kRowThreads * kRowItems tokens, by a block of
// kRowThreads threads, where exact_select_kernel has already laid out every group's members and
// left the group's record at its kept token (token_groups): what is left is a block scan that
// numbers the kept tokens, no sort. Reads merged_into and token_groups with __ldcg (other blocks
// of the calling kernel wrote them); ends with the block done with `smem`.
template <int kRowItems>
__device__ void number_row(const int64_t* __restrict__ merged_into, const Group* __restrict__ token_groups, int64_t b,
                           int64_t L, int64_t kept, int64_t* __restrict__ index, int64_t* __restrict__ assignment,
                           LocalBases bases, Group* __restrict__ groups, RowSlotsSmem<kRowItems>& smem) {
  const int64_t row = b * L;
  int32_t anchor[kRowItems];
  const int32_t row_kept = number_kept_tokens<kRowItems>(merged_into, row, L, smem.scan, smem.slot_of, anchor);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kRowItems; ++i) {
    const int l = kRowItems * static_cast<int>(threadIdx.x) + i;
    if (l >= L) continue;
    const uint32_t m = smem.slot_of[anchor[i]];
    assignment[row + l] = m - bases.slot_of(row + l);
    if (anchor[i] == l && m < kept) {  // slots past `kept` (only a wrong one) are dropped
      index[b * kept + m] = l - bases.l_of(row + l);
      groups[b * kept + m] = load_group(token_groups + row + l);
    }
  }
  for (int64_t m = row_kept + threadIdx.x; m < kept; m += kRowThreads) groups[b * kept + m] = Group{};  // a wrong `kept`
  __syncthreads();  // slot_of and the scan storage are free for the next row
}

// exact_select_kernel on screened sums (p.eps > 0): decides in float64 what they leave open, after
// the window's srcs are ranked by screened key. Each screened key (a src's best screened cosine)
// is within eps of the exact one, so where the keys of ranks r - 1 and r are more than 2 eps
// apart, the first r are those of the exact keys. Otherwise ranks r - 1 and r and every rank
// joined to them by gaps of at most 2 eps form a cluster: a src ranked above it beats every src
// in it, and those every src below it, so only the cluster's own order is open. Its srcs get
// exact keys and are ranked among themselves, after the srcs above it. A src with more than one
// dst within 2 eps of its best gets its exact best among those (its candidates), wherever it
// ranks; a window with a non-finite screened value ranks all its srcs by exact keys. Exact means
// float64 dot products and norms summed in a fixed order (lane_dot), the same for equal tokens:
// ties stay ties, broken as the contract says. Ends with a barrier.
template <typename M, typename Window>
__device__ void recheck_window(const Params& p, int64_t start, int64_t n, int64_t r, Window& win, int t) {
  constexpr int kWarps = kSelectThreads / 32;
  const int n_src = static_cast<int>((n + 1) / 2), warp = t / 32, lane = t % 32;
  const double gap = 2.0 * p.eps;
  const auto ranked_in = [](unsigned int rank, int first, int last) {
    return static_cast<int>(rank) >= first && static_cast<int>(rank) <= last;
  };
  if (t < n_src) win.by_rank[win.rank[t]] = win.key[t];
  __syncthreads();
  if (t == 0) {
    int first = static_cast<int>(r), last = first - 1;  // no cluster
    if (win.any_non_finite) {
      first = 0;
      last = n_src - 1;
    } else if (r < n_src && win.by_rank[r - 1] - win.by_rank[r] <= gap) {
      first = static_cast<int>(r) - 1;
      last = first + 1;
      while (first > 0 && win.by_rank[first - 1] - win.by_rank[first] <= gap) --first;
      while (last + 1 < n_src && win.by_rank[last] - win.by_rank[last + 1] <= gap) ++last;
    }
    uint32_t dsts = 0u;  // the rechecked srcs' candidates (each has at least one)
    for (int i = 0; i < n_src; ++i) {
      if (win.needs_recheck[i] || ranked_in(win.rank[i], first, last)) dsts |= win.candidates[i];
    }
    win.recheck_first = first;
    win.recheck_last = last;
    win.recheck_dsts = dsts;
  }
  __syncthreads();
  if (win.recheck_dsts == 0u) return;  // nothing to recheck (uniform over the block)
  const int first = win.recheck_first, last = win.recheck_last;
  const auto in_cluster = [&](unsigned int rank) { return ranked_in(rank, first, last); };
  const auto rechecks = [&](int i) { return win.needs_recheck[i] || in_cluster(win.rank[i]); };
  const int n_dst = static_cast<int>(n / 2), pairs = n_src * n_dst;
  // The float64 values it needs, a warp each: the norms of the rechecked srcs and their candidates
  // (by position, into norm: the screened ones have chosen the candidates), then their dot
  // products (into staged).
  for (int e = warp; e < n + pairs; e += kWarps) {  // uniform over the warp
    int64_t a = 0, b = 0;
    if (e < n) {
      if (e % 2 == 0 ? !rechecks(e / 2) : (win.recheck_dsts >> (e / 2) & 1u) == 0) continue;
      a = b = token_base(p, p.window_tokens[start + e]);
    } else {
      const int i = (e - n) / n_dst, j = (e - n) % n_dst;
      if (!rechecks(i) || (win.candidates[i] >> j & 1u) == 0) continue;
      a = token_base(p, p.window_tokens[start + 2 * i]);
      b = token_base(p, p.window_tokens[start + 2 * j + 1]);
    }
    const double sum = warp_sum(lane_dot<M, 2>(p, a, b, lane));  // 4 in flight: spills in 64 registers
    if (lane == 0 && e < n) win.norm[e] = sqrt(sum);
    if (lane == 0 && e >= n) win.staged[e - n] = sum;
  }
  __syncthreads();
  if (t < n_src && rechecks(t)) {
    double best = -INFINITY;
    int best_at = -1;
    for (uint32_t left = win.candidates[t]; left != 0; left &= left - 1) {  // increasing dst, strict >
      const int j = __ffs(left) - 1;
      const double value = cosine(win.staged[t * n_dst + j], win.norm[2 * t], win.norm[2 * j + 1]);
      if (value > best) {
        best = value;
        best_at = j;
      }
    }
    win.key[t] = best;
    win.best_dst[t] = best_at >= 0 ? 2 * best_at + 1 : -1;
  }
  __syncthreads();
  // The cluster's srcs in exact key order (ties: lower position), after the first - 1 above them.
  const unsigned int old_rank = t < n_src ? win.rank[t] : 0u;
  const bool ranked_here = t < n_src && in_cluster(old_rank);
  unsigned int new_rank = static_cast<unsigned int>(first);
  if (ranked_here) {
    for (int q = 0; q < n_src; ++q) {
      new_rank += in_cluster(win.rank[q]) && (win.key[q] > win.key[t] || (win.key[q] == win.key[t] && q < t));
    }
  }
  __syncthreads();
  if (ranked_here) win.rank[t] = new_rank;
  __syncthreads();
}

// Exact mode: what choose_kernel and rank_select_kernel do for screened windows, from the float64
// sums of exact_dots_kernel, each added over the feature splits in split order. Each src's best
// dst (largest cosine, ties: lowest dst; NaN never wins), a warp per src; the srcs ranked by that
// score (ties: lower position first), the first r with a dst merged. A window of at most 64 tokens
// is one block's, its pair sums in shared memory. A larger one is spread over a block per 16 srcs
// (select_groups per window at most), each warp reading its src's dsts' sums where they are (the
// loads of all of a lane's dsts, of 4 splits, in flight together) and writing the src's score and
// dst to keys / best_dst; the last of the window's blocks to finish (a ticket per window) ranks
// it. On screened sums (RecheckM not void: windows of at most 64 tokens) each warp also records its src's
// candidates, the dsts within 2 eps of its best screened cosine, and recheck_window settles in
// float64 what the screened values leave open, after the ranking.
// Writes merged_into of every token of every window (-1: kept; all of a window larger than
// exact_window, which only a wrong max_window lets through). With p.fused_row_groups, the block
// that ranks a window also lays out its groups (group members and records, below), and the block
// whose window completes a row's merged_into (a ticket per row: its windows' tokens, L in all,
// as every token of a row is in one window) then numbers the row's kept tokens
// (number_row<kRowItems>): row_groups_kernel's work after this kernel, without its sort.
//
// A window's groups: every group lies in one window (a dst and the srcs merged into it, or a
// token alone), so the window's n tokens are exactly its groups' members. They go to
// members[start, start + n) (start: the window's offset in window_tokens, a range no other window
// uses), the groups in position order, each group's members in position order, which is token
// order. A src merged into dst j sets its bit in merged_srcs[j]; a group's size and a member's
// place in its group are bit counts, and a block scan over the group sizes gives where each
// group starts. The slot of each group is left to number_row: each record goes to token_groups
// at its kept token, and number_row copies it to the slot.
template <typename RecheckM, int kRowItems>  // RecheckM: the metric type on screened sums, void on float64 ones
__global__ void __launch_bounds__(kSelectThreads, kRowItems == 2 ? 2 : 1) exact_select_kernel(const Params p) {
  detail::await_previous_kernel();
  constexpr bool kScreened = !std::is_void<RecheckM>::value;
  constexpr int kMaxSrcs = static_cast<int>(kExactMaxWindow / 2), kWarps = kSelectThreads / 32;
  constexpr int kDstsPerLane = kMaxSrcs / 32, kSrcWords = kMaxSrcs / 32;
  static_assert(kSelectThreads == kRowThreads, "a block numbers a row's kept tokens as row_groups_kernel's do");
  static_assert(kExactMaxWindow <= kSelectThreads, "a thread per position of a merging window");
  using PositionScan = cub::BlockScan<int32_t, kSelectThreads>;
  struct Window {
    double staged[kExactSmallPairs];  // the pair sums of a window of at most 64 tokens
    double norm[kExactMaxWindow];     // by window position
    double key[kMaxSrcs];
    int best_dst[kMaxSrcs];  // window position, -1 if none
    unsigned int rank[kMaxSrcs];  // srcs that beat each src
    // Screened sums (p.eps > 0, windows of at most kExactWindow tokens): per src, the dsts its
    // float64 recheck compares and whether it needs one; the screened keys by rank; the window's
    // flags and the rank range [recheck_first, recheck_last] whose order the recheck decides.
    uint32_t candidates[kExactWindow / 2];
    uint8_t needs_recheck[kExactWindow / 2];
    double by_rank[kExactWindow / 2];
    int any_non_finite, recheck_first, recheck_last;
    uint32_t recheck_dsts;  // the dsts that are some rechecked src's candidates, 0: no recheck
    // From the ranking on, by window position (all but token and anchor: fused_row_groups only):
    int64_t token[kExactMaxWindow];
    int16_t anchor[kExactMaxWindow];       // the kept position the token ends in (itself if kept)
    int16_t group_begin[kExactMaxWindow];  // of a kept position: where its group's members start
    int16_t member[kExactMaxWindow];       // the members in order, as positions
    uint32_t merged_srcs[kMaxSrcs][kSrcWords];  // per dst j: bit i set if src i merges into it
    typename PositionScan::TempStorage scan;
  };
  union Smem {  // a window's arrays, then a row's numbering
    Window window;
    RowSlotsSmem<kRowItems> row;
  };
  __shared__ Smem smem;
  Window& win = smem.window;
  double(&staged)[kExactSmallPairs] = win.staged;
  double(&norm)[kExactMaxWindow] = win.norm;
  double(&key)[kMaxSrcs] = win.key;
  int(&best_dst)[kMaxSrcs] = win.best_dst;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  // The srcs below src `end` merged into dst j, from merged_srcs (the window's n_src srcs).
  const auto merged_below = [&](int j, int end) {
    int count = 0;
    for (int word = 0; 32 * word < end; ++word) {
      const int bits = end - 32 * word;
      count += __popc(bits >= 32 ? win.merged_srcs[j][word] : win.merged_srcs[j][word] & ((1u << bits) - 1u));
    }
    return count;
  };
  const double* __restrict__ partial = p.exact_partial;
  for (int64_t item = blockIdx.x; item < p.num_windows * p.select_groups; item += gridDim.x) {
    const int64_t w = item / p.select_groups;
    const int group = static_cast<int>(item % p.select_groups);
    const int64_t start = p.window_offsets[w], n = p.window_offsets[w + 1] - start;
    const int64_t r = n <= p.exact_window ? merge_count(p.ratio, n) : 0;
    const int n_src = static_cast<int>((n + 1) / 2), n_dst = static_cast<int>(n / 2), pairs = n_src * n_dst;
    const bool small = n <= kExactWindow;
    // Uniform over the block: the blocks that share the window, one unless it is large and merges.
    const int groups = small || r == 0 ? 1 : ceil_div(n_src, kWarps);
    if (group >= groups) continue;
    // The sums of window element e (pair or norm) of split s.
    const auto split_sums = [&](int64_t s) { return partial + (s * p.total + start) * p.exact_slot; };
    if (r > 0) {
      __syncthreads();  // the previous window's ranks are counted
      if (t < n_src) win.rank[t] = 0u;
      if (t == 0) win.any_non_finite = 0;
      if (p.fused_row_groups) {
        for (int e = t; e < n_dst * kSrcWords; e += kSelectThreads) win.merged_srcs[e / kSrcWords][e % kSrcWords] = 0u;
      }
      // Small windows: the pair sums too, by all threads (the loads of few per thread in flight).
      for (int e = (small ? 0 : pairs) + t; e < pairs + n; e += kSelectThreads) {
        // In split order, the loads of 8 splits in flight together (more: 98 registers, half the
        // blocks per SM).
        const double sum = detail::ordered_sum<8>(split_sums(0) + e, p.total * p.exact_slot, p.exact_split);
        if (e >= pairs) {
          norm[e - pairs] = sqrt(sum);
        } else {
          staged[e] = sum;
        }
      }
      __syncthreads();
      const int first_src = small ? 0 : group * kWarps, end_src = small ? n_src : min(n_src, first_src + kWarps);
      for (int i = first_src + warp; i < end_src; i += kWarps) {
        double dot[kDstsPerLane];
#pragma unroll
        for (int u = 0; u < kDstsPerLane; ++u) dot[u] = 0.0;
        if (small) {  // uniform: at most 32 dsts, one per lane
          if (lane < n_dst) dot[0] = staged[i * n_dst + lane];
        } else {  // the loads of all of a lane's dsts, of 4 splits, in flight together; sums in split order
#pragma unroll 4
          for (int64_t s = 0; s < p.exact_split; ++s) {
            const double* row = split_sums(s) + i * n_dst;
#pragma unroll
            for (int u = 0; u < kDstsPerLane; ++u) {
              if (lane + 32 * u < n_dst) dot[u] += row[lane + 32 * u];
            }
          }
        }
        double best = -INFINITY, own_value = -INFINITY;  // own_value: the lane's first dst's (small: its only one)
        int best_at = -1;
#pragma unroll
        for (int u = 0; u < kDstsPerLane; ++u) {  // increasing dst, strict >: the lowest dst wins ties
          const int j = lane + 32 * u;
          if (j >= n_dst) break;
          const double value = cosine(dot[u], norm[2 * i], norm[2 * j + 1]);
          if (u == 0) own_value = value;
          if (value > best) {
            best = value;
            best_at = j;
          }
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) {  // the same max and lowest dst in any order
          const double other = __shfl_xor_sync(0xffffffffu, best, offset);
          const int other_at = __shfl_xor_sync(0xffffffffu, best_at, offset);
          if (beats(other, other_at, best, best_at)) {
            best = other;
            best_at = other_at;
          }
        }
        if constexpr (kScreened) {  // (windows of at most kExactWindow tokens: see Plan::exact_screened)
          // Within eps of the exact cosines: the exact best is among the dsts within 2 eps of the
          // screened best, and is it when that is one dst. A non-finite value (an overflow of the
          // float32 sums, or a NaN metric) proves nothing: all dsts, and exact keys for the window.
          const bool finite = __ballot_sync(0xffffffffu, lane < n_dst && !isfinite(own_value)) == 0u;
          const uint32_t near = __ballot_sync(0xffffffffu, lane < n_dst && own_value >= best - 2.0 * p.eps);
          if (lane == 0) {
            win.candidates[i] = finite ? near : (n_dst == 32 ? ~0u : (1u << n_dst) - 1u);
            win.needs_recheck[i] = !finite || __popc(near) > 1;
            if (!finite) win.any_non_finite = 1;
          }
        }
        // best: -inf without a comparable dst (NaN metric), never merged.
        const int dst_position = best_at >= 0 ? 2 * best_at + 1 : -1;
        if (lane == 0 && small) {
          key[i] = best;
          best_dst[i] = dst_position;
        } else if (lane == 0) {
          p.keys[start + 2 * i] = best;
          p.best_dst[start + 2 * i] = dst_position;
        }
      }
      __syncthreads();
    }
    if (!small && r > 0) {  // uniform over the block
      if (!detail::last_to_arrive(&p.select_tickets[w], static_cast<unsigned int>(groups))) continue;
      for (int i = t; i < n_src; i += kSelectThreads) {
        key[i] = __ldcg(p.keys + start + 2 * i);
        best_dst[i] = __ldcg(p.best_dst + start + 2 * i);
      }
      __syncthreads();
    }
    if (r == 0) {  // every token kept, a group of its own (n may exceed kExactMaxWindow here)
      for (int64_t position = t; position < n; position += kSelectThreads) {
        const int64_t token = p.window_tokens[start + position];
        p.merged_into[token] = -1;
        if (p.fused_row_groups) {
          Group alone{};
          alone.begin = start + position;
          alone.end = alone.begin + 1;
          alone.first[0] = token;
          p.members[alone.begin] = token;
          p.token_groups[token] = alone;
        }
      }
    } else {  // n <= exact_window <= kExactMaxWindow: a thread per position
      const bool live = t < n;
      const int64_t token = live ? p.window_tokens[start + t] : 0;
      {  // Each src's rank (the srcs that beat it), counted by all threads: `parts` threads per src
        // (at least 2: n_src <= kSelectThreads / 2), each over every parts-th other src.
        const int parts = kSelectThreads / n_src, i = t % n_src, part = t / n_src;
        if (part < parts) {
          unsigned int beaten = 0;
          for (int other = part; other < n_src; other += parts) {
            beaten += key[other] > key[i] || (key[other] == key[i] && other < i);
          }
          atomicAdd(&win.rank[i], beaten);  // integer sums: the same in any order
        }
      }
      __syncthreads();
      if constexpr (kScreened) recheck_window<RecheckM>(p, start, n, r, win, t);
      if (live) {
        win.token[t] = token;
        int anchor = t;
        if (t % 2 == 0) {
          const int i = t / 2;
          if (win.rank[i] < r && best_dst[i] >= 0) {
            anchor = best_dst[i];
            if (p.fused_row_groups) atomicOr(&win.merged_srcs[anchor / 2][i / 32], 1u << (i % 32));
          }
        }
        win.anchor[t] = static_cast<int16_t>(anchor);
      }
      __syncthreads();
      const int anchor = live ? win.anchor[t] : 0;
      if (live) p.merged_into[win.token[t]] = anchor == t ? -1 : win.token[anchor];
      if (p.fused_row_groups) {  // uniform over the block
        // A kept dst's group: it and the srcs merged into it; a kept src's: itself.
        const int size = !live || anchor != t ? 0 : t % 2 == 1 ? 1 + merged_below(t / 2, n_src) : 1;
        int begin = 0;
        PositionScan(win.scan).ExclusiveSum(size, begin);
        if (size > 0) win.group_begin[t] = static_cast<int16_t>(begin);
        __syncthreads();
        if (live) {
          // Place in the group: the members at lower positions. A dst at 2 j + 1 follows the srcs
          // 0..j merged into it; a src at 2 i merged into dst j follows the lower srcs merged into
          // j, and the dst if j < i.
          const int i = t / 2, j = anchor / 2;
          const int place = anchor == t ? (t % 2 == 1 ? merged_below(j, j + 1) : 0) : merged_below(j, i) + (j < i ? 1 : 0);
          const int at = win.group_begin[anchor] + place;
          p.members[start + at] = win.token[t];
          win.member[at] = static_cast<int16_t>(t);
        }
        __syncthreads();
        if (size > 0) {
          Group group{};
          group.begin = start + begin;
          group.end = group.begin + size;
          for (int m = 0; m < size && m < kStagedMembers; ++m) group.first[m] = win.token[win.member[begin + m]];
          p.token_groups[win.token[t]] = group;
        }
      }
    }
    if (p.fused_row_groups && n > 0) {  // uniform over the block
      const int64_t b = p.window_tokens[start] / p.L;
      // The ticket's barrier: the window's arrays are read before number_row reuses their memory.
      if (b < p.tokens / p.L && detail::last_to_arrive(&p.row_tickets[b], static_cast<unsigned int>(p.L),
                                                       static_cast<unsigned int>(n))) {
        number_row<kRowItems>(p.merged_into, p.token_groups, b, p.L, p.kept, p.index, p.assignment, p.bases,
                              p.groups, smem.row);
      }
    }
  }
}

// VEC consecutive elements of the head dim; VEC > 1 only when they form one aligned 16 bytes,
// which are kept as 4 raw words (a 16-byte copy's source and target) and unpacked where read.
template <typename T, int VEC, bool kPacked = (VEC * sizeof(T) == 16)>
struct Vec {
  T v[VEC];
  __device__ __forceinline__ void load(const T* ptr) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = ptr[k];
  }
  __device__ __forceinline__ void store(T* ptr) const {
#pragma unroll
    for (int k = 0; k < VEC; ++k) ptr[k] = v[k];
  }
  __device__ __forceinline__ void stage(const T* ptr) { load(ptr); }  // into shared memory, synchronously
  __device__ __forceinline__ float get(int k) const { return to_float(v[k]); }
  __device__ __forceinline__ void set(int k, float x) { v[k] = detail::from_float<T>(x); }
};
template <typename T, int VEC>
struct alignas(16) Vec<T, VEC, true> {
  static constexpr int kPerWord = 4 / sizeof(T);
  uint32_t word[4];
  __device__ __forceinline__ void load(const T* ptr) {
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
    word[0] = raw.x;
    word[1] = raw.y;
    word[2] = raw.z;
    word[3] = raw.w;
  }
  __device__ __forceinline__ void store(T* ptr) const {
    *reinterpret_cast<uint4*>(ptr) = make_uint4(word[0], word[1], word[2], word[3]);
  }
  // Into shared memory, asynchronously: read after detail::wait_async_copies().
  __device__ __forceinline__ void stage(const T* ptr) { detail::copy_16_bytes_async(word, ptr, true, ptr); }
  __device__ __forceinline__ float get(int k) const {
    if constexpr (kPerWord == 1) {
      float out;
      memcpy(&out, &word[k], sizeof(out));
      return out;
    } else {
      return detail::bits_to_float(static_cast<uint16_t>(word[k / 2] >> (16 * (k % 2))), T());
    }
  }
  // Element k = x rounded to T; the word holding it must be zero before its first set.
  __device__ __forceinline__ void set(int k, float x) {
    if constexpr (kPerWord == 1) {
      memcpy(&word[k], &x, sizeof(x));
    } else {
      const T value = detail::from_float<T>(x);
      uint16_t bits;
      memcpy(&bits, &value, sizeof(bits));
      word[k / 2] |= static_cast<uint32_t>(bits) << (16 * (k % 2));
    }
  }
};

struct ValueParams {  // k (tensor 0) and v (tensor 1)
  const void* x[2];
  int64_t x_stride[2][4];
  void* out[2];
  int64_t out_stride[2][4];
  int64_t H, D, L, kept, slots;
  int slot_threads;        // threads per slot, a multiple of 32 dividing kMergeThreads (launch_values)
  const Group* groups;     // per slot
  const int64_t* members;  // token ids: each group's at [begin, end) of its record, in token order
  const float* importance;
  const int32_t* sizes;
  int32_t* sizes_out;  // written by the blocks of element chunk 0
};

// One block per (output slot, element chunk): the chunk is kMergeVectors vectors of VEC elements
// per thread, of k and of v alike, so a group's record and weights are read once for
// 2 kMergeVectors vectors per thread. A slot whose vectors fill at most half the block (few KV
// heads: Qwen2.5-VL's 4 x 128 elements are 64 vectors, a warp's) shares the block with others,
// p.slot_threads threads (whole warps) each, so that its idle threads serve slots of their own
// instead of a wave of blocks serving as many slots as blocks. Each output element is the
// members' weighted sum in member order, divided by the weights' sum, also in member order (as
// the CPU op sums them). The loads hang on a chain (group record -> members' values and
// weights), so all of a group's are issued together one round trip after the record, which
// holds the ids of its first kStagedMembers members: their values are copied to shared memory
// asynchronously (16-byte vectors; registers would hold one member's), each thread its own, so
// no barrier is needed. Larger groups take further rounds of kStagedMembers members.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMergeThreads, kMergeBlocksPerSm) merge_values_kernel(const ValueParams p) {
  detail::await_previous_kernel();
  __shared__ Vec<T, VEC> staged[kStagedMembers][2][kMergeVectors][kMergeThreads];
  const int thread = static_cast<int>(threadIdx.x) % p.slot_threads;  // among its slot's threads
  const int64_t block_slots = kMergeThreads / p.slot_threads;
  const bool writes_sizes = blockIdx.y == 0 && thread == 0;
  const int vectors_per_head = static_cast<int>(p.D / VEC);
  const int head_vectors = static_cast<int>(p.H) * vectors_per_head;  // < 2^24 (launch_values)
  // Vector u of this thread: head and first element, in both tensors (the offsets from a token's
  // row are recomputed where used: two multiply-adds, cheaper than 16 registers).
  bool live[kMergeVectors];
  int head[kMergeVectors], elem[kMergeVectors];
#pragma unroll
  for (int u = 0; u < kMergeVectors; ++u) {
    const int e = (static_cast<int>(blockIdx.y) * kMergeVectors + u) * p.slot_threads + thread;
    live[u] = e < head_vectors;
    head[u] = live[u] ? e / vectors_per_head : 0;
    elem[u] = live[u] ? (e % vectors_per_head) * VEC : 0;
  }
  const auto x_offset = [&](int t, int u) { return head[u] * p.x_stride[t][1] + elem[u] * p.x_stride[t][3]; };
  const auto out_offset = [&](int t, int u) { return head[u] * p.out_stride[t][1] + elem[u] * p.out_stride[t][3]; };
  // f(tensor, u) for each live vector u of this thread, of k (tensor 0) and v (tensor 1).
  const auto for_each_vector = [&](auto&& f) {
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int u = 0; u < kMergeVectors; ++u) {
        if (live[u]) f(t, u);
      }
    }
  };
  const auto mine = [&](int i, int t, int u) -> Vec<T, VEC>& { return staged[i][t][u][threadIdx.x]; };

  // No barrier below: a block's slots go their own ways. A warp's lanes share their slot; taken
  // from lane 0, it is known to be shared, so ptxas keeps the slot's values in uniform registers
  // (computed per lane, the 16-bit kernels spill 464 bytes instead of 44).
  const int64_t block_slot = __shfl_sync(0xffffffffu, threadIdx.x / p.slot_threads, 0);
  for (int64_t slot = blockIdx.x * block_slots + block_slot; slot < p.slots; slot += gridDim.x * block_slots) {
    const Group group = p.groups[slot];
    if (group.end <= group.begin) continue;  // no member (only with a wrong `kept`): leave the slot alone
    const int64_t b = slot / p.kept, m = slot % p.kept;
    const auto stage = [&](int i, int64_t g) {  // token g (of row b) into staged[i]
      const int64_t l = g - b * p.L;
      for_each_vector([&](int t, int u) {
        mine(i, t, u).stage(static_cast<const T*>(p.x[t]) + b * p.x_stride[t][0] + l * p.x_stride[t][2] +
                            x_offset(t, u));
      });
    };
    const auto store = [&](int t, int u, const Vec<T, VEC>& value) {  // at output token m of row b
      value.store(static_cast<T*>(p.out[t]) + b * p.out_stride[t][0] + m * p.out_stride[t][2] + out_offset(t, u));
    };
    if (group.end - group.begin == 1) {  // kept token without merged srcs: bitwise copy
      stage(0, group.first[0]);
      detail::wait_async_copies();
      for_each_vector([&](int t, int u) { store(t, u, mine(0, t, u)); });
      if (writes_sizes) p.sizes_out[slot] = p.sizes[group.first[0]];
      continue;
    }
    float sum[2][kMergeVectors][VEC];  // weighted; equal weights in a second pass if the group's weight is 0
    const auto add = [&](int i, float weight) {  // sum += weight staged[i]
      for_each_vector([&](int t, int u) {
        const Vec<T, VEC> value = mine(i, t, u);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[t][u][k] = fmaf(weight, value.get(k), sum[t][u][k]);
      });
    };
    const auto clear = [&] {  // dead vectors too: skipping them costs 20 registers (ptxas)
#pragma unroll
      for (int t = 0; t < 2; ++t) {
#pragma unroll
        for (int u = 0; u < kMergeVectors; ++u) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) sum[t][u][k] = 0.f;
        }
      }
    };
    clear();
    float total = 0.f;
    int64_t size_total = 0;
    // kStagedMembers members at a time (ids from the record, later ones from `members`): their
    // values staged and their weights and sizes loaded, all in flight together, then added in order.
    for (int64_t first = group.begin; first < group.end; first += kStagedMembers) {
      const int n = static_cast<int>(min(int64_t{kStagedMembers}, group.end - first));
      int64_t token[kStagedMembers];
#pragma unroll
      for (int i = 0; i < kStagedMembers; ++i) {
        if (i < n) token[i] = first == group.begin ? group.first[i] : p.members[first + i];
      }
      float weight[kStagedMembers];
      int32_t size[kStagedMembers];
#pragma unroll
      for (int i = 0; i < kStagedMembers; ++i) {
        if (i >= n) break;
        stage(i, token[i]);
        weight[i] = p.importance[token[i]];
        size[i] = writes_sizes ? p.sizes[token[i]] : 0;
      }
      detail::wait_async_copies();
#pragma unroll
      for (int i = 0; i < kStagedMembers; ++i) {
        if (i >= n) break;
        total += weight[i];
        size_total += size[i];
        add(i, weight[i]);
      }
    }
    // Weight 0 (rare: given zeros, or attention underflow): the plain sum, in the same member
    // order (1 x + s == x + s exactly), one member at a time. A second pass keeps the common path
    // at one accumulator per element (registers).
    if (total == 0.f) {
      clear();
#pragma unroll 1
      for (int64_t j = group.begin; j < group.end; ++j) {
        stage(0, p.members[j]);
        detail::wait_async_copies();
        add(0, 1.f);
      }
    }
    const float divisor = total == 0.f ? static_cast<float>(group.end - group.begin) : total;
    for_each_vector([&](int t, int u) {
      Vec<T, VEC> result{};
#pragma unroll
      for (int k = 0; k < VEC; ++k) result.set(k, sum[t][u][k] / divisor);
      store(t, u, result);
    });
    if (writes_sizes) p.sizes_out[slot] = static_cast<int32_t>(size_total);
  }
}

template <typename T>
cudaError_t launch_values(ValueParams vp, int64_t slots, const detail::KernelLauncher& launch) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  bool vectorised = vp.D % kVec == 0;
  for (int tensor = 0; tensor < 2; ++tensor) {
    vectorised = vectorised && detail::rows_16_byte_aligned(vp.x[tensor], vp.x_stride[tensor], kVec) &&
                 detail::rows_16_byte_aligned(vp.out[tensor], vp.out_stride[tensor], kVec);
  }
  const int64_t head_vectors = vp.H * (vp.D / (vectorised ? kVec : 1));
  vp.slot_threads = kMergeThreads;  // the fewest warps (a power of 2) that hold a slot's vectors
  while (vp.slot_threads > 32 && vp.slot_threads / 2 * kMergeVectors >= head_vectors) vp.slot_threads /= 2;
  const dim3 grid(detail::grid_for(ceil_div(slots, int64_t{kMergeThreads / vp.slot_threads}), kMaxGrid),
                  static_cast<unsigned int>(ceil_div(head_vectors, int64_t{vp.slot_threads} * kMergeVectors)));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  return vectorised ? launch(merge_values_kernel<T, kVec>, grid, kMergeThreads, vp)
                    : launch(merge_values_kernel<T, 1>, grid, kMergeThreads, vp);
}

struct Plan {
  int64_t B, H, L, D, tokens, slots, total, windows, features;
  int64_t dst_split;  // dst ranges per src tile (shape-only, so results do not depend on the GPU)
  int64_t max_feature_split;
  int64_t partial_capacity;  // elements of the partial-mode buffer
  size_t acc_bytes;          // bytes of a screened dot product
  bool exact;                // exact mode (see the top of the file)
  int64_t exact_blocks;      // exact mode: 8-token src (or dst) blocks of the largest window
  int64_t exact_slot;        // exact mode: float64 sums per window token
  int64_t exact_steps;       // exact mode: exact_dots_kernel's steps over the whole metric
  int64_t exact_split;       // exact mode: feature splits per item (shape-only)
  int exact_group;           // exact mode: blocks per side of an exact_dots_kernel item, 1 or kExactGroup
  bool exact_stacked;        // exact mode, groups: src blocks stacked in mma.m16n8k4 (LIGHTKV_EXACT_MMA=8: not)
  bool exact_screened;       // exact mode: 16-bit tensor-core sums, rechecked in float64 (exact_screen_eps)
  bool exact_recheck_all;    // ... every window rechecked (LIGHTKV_EXACT_DOTS=recheck: a test of the recheck)
  int64_t select_groups;     // exact mode: exact_select_kernel's blocks per window, at most
  bool row_groups;           // rows short enough for group_row (row_groups_kernel)
  bool fused_row_groups;     // exact mode with such rows: exact_select_kernel groups them
  int end_bit;  // bits of the (slot, token) sort keys, sentinel slot included
  int row_key_bits;  // the same for row_groups_kernel's row-local slots
};

int bit_width(uint64_t x) {
  int bits = 1;
  while (bits < 64 && (x >> bits) != 0) ++bits;
  return bits;
}

// LIGHTKV_EXACT_GROUP=1 or =3 makes exact_dots_kernel's items block pairs or groups of
// kExactGroup blocks whatever the shape (an A/B of the two: for the same feature split they give
// the same sums); otherwise 0, the shape decides.
int exact_group_knob() {
  if (knob_is("LIGHTKV_EXACT_GROUP", "1")) return 1;
  if (knob_is("LIGHTKV_EXACT_GROUP", "3")) return kExactGroup;
  return 0;
}

// Tokens per thread of group_row for the plan's rows: the fewest of 2, 4 and kRowItemsMax that
// hold a row (the block sorts kRowThreads times that many keys, padding included).
int row_items(const Plan& plan) {
  return plan.L <= kRowThreads * 2 ? 2 : plan.L <= kRowThreads * 4 ? 4 : kRowItemsMax;
}

// Upper bound on the 64-src tiles: every window contributes at most n / 128 + 1 of them.
int64_t tile_bound(const Plan& plan) { return plan.total / (2 * kTile) + plan.windows + 1; }

// exact_dots_kernel's items per window and feature split: pairs of groups of exact_group blocks.
int64_t exact_group_pairs(const Plan& plan) {
  const int64_t groups = ceil_div(plan.exact_blocks, plan.exact_group);
  return groups * groups;
}

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
  plan.features = a.metric.size[2] * a.metric.size[3];
  const int64_t src_tiles = tile_bound(plan);
  const int64_t list_bytes = plan.total * kTopK * static_cast<int64_t>(sizeof(double) + sizeof(int32_t));
  plan.dst_split = std::max<int64_t>(1, std::min({ceil_div(kTargetScreenItems, src_tiles), kMaxDstSplit,
                                                  kMaxRangeListBytes / std::max<int64_t>(list_bytes, 1)}));
  const bool wide = a.metric.dtype == DType::Float64;
  plan.acc_bytes = wide ? sizeof(double) : sizeof(float);
  plan.max_feature_split = std::min(kMaxFeatureSplit, ceil_div(plan.features, wide ? Screen<double>::kChunk
                                                                                    : Screen<float>::kChunk));
  // Pairs and norms of a window of n <= max_window tokens: n_src n_dst + n <= n (n / 4 + 1) sums.
  plan.exact_slot = a.max_window <= kExactMaxWindow ? ceil_div(std::max<int64_t>(a.max_window, 0), 4) + 1 : 0;
  const int64_t exact_sums = plan.total * plan.exact_slot;
  plan.exact = a.max_window <= kExactWindow ||
               (a.max_window <= kExactMaxWindow && exact_sums <= kExactMaxSums &&
                exact_sums * plan.features <= kExactMaxWork);
  plan.exact_blocks =
      plan.exact ? std::max<int64_t>(1, ceil_div(ceil_div(std::max<int64_t>(a.max_window, 0), 2), kExactBlock)) : 1;
  // Exact mode splits the features when the block pairs are too few to fill the GPU.
  const int64_t step = wide                               ? exact_step_features<double>()
                       : a.metric.dtype == DType::Float32 ? exact_step_features<float>()
                                                          : exact_step_features<__half>();
  plan.exact_steps = ceil_div(plan.features, step);
  const int64_t block_pairs = std::max<int64_t>(plan.windows, 1) * plan.exact_blocks * plan.exact_blocks;
  plan.exact_group = exact_group_knob();
  if (plan.exact_group == 0) {
    plan.exact_group = plan.exact_blocks <= kExactGroup && block_pairs >= kExactGroupMinPairs ? kExactGroup : 1;
  }
  plan.exact_stacked = plan.exact_group == kExactGroup && !knob_is("LIGHTKV_EXACT_MMA", "8");
  // Screened sums: for windows of at most kExactWindow tokens (a block ranks each) of a 16-bit
  // metric, by default where the items are block groups (many windows: throughput, where the
  // float64 products are the kernel's limit; at small batch a recheck would add its round trips
  // to the call's critical path). LIGHTKV_EXACT_DOTS=float64 | screened | recheck (screened, and
  // every window rechecked) forces a choice.
  const bool screened_knob = knob_is("LIGHTKV_EXACT_DOTS", "screened") || knob_is("LIGHTKV_EXACT_DOTS", "recheck");
  plan.exact_screened = plan.exact && a.max_window <= kExactWindow && detail::sixteen_bit(a.metric.dtype) &&
                        !knob_is("LIGHTKV_EXACT_DOTS", "float64") &&
                        (plan.exact_group == kExactGroup || screened_knob);
  plan.exact_recheck_all = plan.exact_screened && knob_is("LIGHTKV_EXACT_DOTS", "recheck");
  const int64_t items = std::max<int64_t>(plan.windows, 1) * exact_group_pairs(plan);
  const int64_t most_splits = std::max<int64_t>(
      1, std::min({ceil_div(plan.exact_group == 1 ? kExactTargetWarps : kExactGroupTargetWarps, items),
                   kMaxExactSplit, plan.exact_steps, kExactMaxSums / std::max<int64_t>(exact_sums, 1)}));
  // Of the splits up to that (none empty), the one of fewest waves x steps per item on a GPU of
  // detail::kWaveSms SMs, ties to the most splits: LLaVA-1.5 at batch 1 takes 11 splits of 3 steps in
  // one wave of 396 blocks rather than 16 of 2 steps in 576, a wave and a tail of 48 blocks.
  const int64_t wave_blocks =
      detail::kWaveSms * (plan.exact_group == 1 ? kExactBlocksPerSm : kExactGroupBlocksPerSm);
  plan.exact_split = 1;
  int64_t fewest = INT64_MAX;
  for (int64_t split = 1; split <= most_splits && plan.exact_steps > 0; ++split) {
    const int64_t steps = ceil_div(plan.exact_steps, split), splits = ceil_div(plan.exact_steps, steps);
    const int64_t cost = ceil_div(ceil_div(items * splits, kExactThreads / 32), wave_blocks) * steps;
    if (cost <= fewest) {
      fewest = cost;
      plan.exact_split = splits;
    }
  }
  plan.select_groups = plan.exact && a.max_window > kExactWindow
                           ? ceil_div(ceil_div(a.max_window, 2), kSelectThreads / 32)
                           : 1;
  // Partial mode can only pay off when the src tiles may be too few to fill the GPU.
  plan.partial_capacity = !plan.exact && plan.max_feature_split >= 2 && src_tiles < kPartialItems
                              ? kPartialItems * kTile * kTile
                              : 0;
  plan.row_groups = plan.L <= kRowTokens;
  plan.fused_row_groups = plan.exact && plan.row_groups && !knob_is("LIGHTKV_FUSED_GROUPS", "0");
  plan.end_bit = bit_width(static_cast<uint64_t>(plan.slots));
  plan.row_key_bits = bit_width(static_cast<uint64_t>(a.kept));
  return plan;
}

struct Workspace {  // the screened mode's arrays are empty in exact mode, the general slot path's when plan.row_groups
  double* exact_partial;
  unsigned int* select_tickets;  // null unless plan.select_groups > 1
  unsigned int* row_tickets;     // null unless plan.fused_row_groups
  Group* token_groups;           // empty unless plan.fused_row_groups
  int64_t* offsets;  // tile, pair and src offsets (num_windows + 1 each)
  double* norms;
  double* keys;
  int32_t* best_dst;
  double* range_value;
  int32_t* range_dst;
  void* partial;
  int64_t* merged_into;
  int64_t* kept_flags;
  int64_t* kept_before;
  uint64_t* slot_key;
  uint64_t* sorted_slot_key;
  int64_t* token_id;
  int64_t* sorted_token_id;
  Group* groups;
  void* cub_temp;
  size_t cub_bytes;
  size_t bytes;
};

cudaError_t cub_temp_bytes(const Plan& plan, cudaStream_t stream, size_t* bytes) {
  *bytes = 0;
  if (plan.row_groups) return cudaSuccess;
  size_t scan_bytes = 0, radix_bytes = 0;
  LIGHTKV_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int64_t*>(nullptr),
                                                        static_cast<int64_t*>(nullptr), plan.tokens, stream));
  LIGHTKV_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
      nullptr, radix_bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), plan.tokens, 0, plan.end_bit, stream));
  *bytes = std::max(scan_bytes, radix_bytes);
  return cudaSuccess;
}

Workspace carve(const Plan& plan, size_t cub_bytes, void* base) {
  detail::WorkspaceCarver carver(base);
  Workspace ws{};
  const int64_t general = plan.row_groups ? 0 : plan.tokens;
  const int64_t screened = plan.exact ? 0 : 1;
  const int64_t ranked_in_global = !plan.exact || plan.select_groups > 1 ? 1 : 0;  // keys and best_dst
  ws.exact_partial = carver.take<double>(plan.exact ? plan.exact_split * plan.total * plan.exact_slot : 0);
  // Null when unneeded (an empty carved array would have the next one's address).
  ws.select_tickets = plan.select_groups > 1 ? carver.take<unsigned int>(plan.windows) : nullptr;
  ws.row_tickets = plan.fused_row_groups ? carver.take<unsigned int>(plan.B) : nullptr;
  ws.token_groups = carver.take<Group>(plan.fused_row_groups ? plan.tokens : 0);
  ws.offsets = carver.take<int64_t>(screened * 3 * (plan.windows + 1));
  ws.norms = carver.take<double>(screened * plan.tokens);
  ws.keys = carver.take<double>(ranked_in_global * plan.total);
  ws.best_dst = carver.take<int32_t>(ranked_in_global * plan.total);
  ws.range_value = carver.take<double>(screened * plan.dst_split * plan.total * kTopK);
  ws.range_dst = carver.take<int32_t>(screened * plan.dst_split * plan.total * kTopK);
  ws.partial = carver.take<char>(plan.partial_capacity * static_cast<int64_t>(plan.acc_bytes));
  ws.merged_into = carver.take<int64_t>(plan.tokens);
  ws.kept_flags = carver.take<int64_t>(general);
  ws.kept_before = carver.take<int64_t>(general);
  ws.slot_key = carver.take<uint64_t>(general);
  ws.sorted_slot_key = carver.take<uint64_t>(general);
  ws.token_id = carver.take<int64_t>(general);
  ws.sorted_token_id = carver.take<int64_t>(plan.tokens);
  ws.groups = carver.take<Group>(plan.slots);
  ws.cub_temp = carver.take<char>(static_cast<int64_t>(cub_bytes));
  ws.cub_bytes = cub_bytes;
  ws.bytes = carver.bytes();
  return ws;
}

LocalBases local_bases(const MergeArgs& a, int64_t tokens) {
  return a.local_bases != nullptr ? LocalBases{a.local_bases, a.local_bases + tokens} : LocalBases{};
}

unsigned int flat_grid(int64_t items) { return detail::grid_for(ceil_div(items, 256), kMaxGrid); }

// Worst-case |screened cosine - exact cosine|: a sum of `features` products whose magnitudes add
// up to at most |a| |b| (Cauchy-Schwarz), divided by |a| |b| + 1e-8, with 4x the round-off unit
// of the accumulator as margin (tensor cores truncate when they accumulate) and slack for the
// split sums, the norm product and the division.
template <typename M>
double screen_eps(int64_t features, int64_t splits) {
  const bool wide = std::is_same<typename Screen<M>::Acc, double>::value;
  const double unit = std::ldexp(1.0, wide ? -50 : -22);
  return static_cast<double>(features + splits + 64) * unit + 1e-12;
}

// 16-byte staging loads are safe when no vector crosses a head (C a multiple of the vector),
// channels are contiguous, and every row and head starts 16-byte aligned.
template <typename M>
bool vector_staging(const Params& p) {
  constexpr int64_t kPerVector = 16 / sizeof(typename Screen<M>::Stage);
  return p.metric_inner % kPerVector == 0 && detail::rows_16_byte_aligned(p.metric, p.metric_stride, kPerVector);
}

// Step 4 for rows of any length: kept flags, their scan, slots_kernel, a radix sort on
// (slot, token) and group_bounds_kernel.
cudaError_t launch_general_groups(const Plan& plan, const Workspace& ws, const MergeArgs& a,
                                  const detail::KernelLauncher& launch, cudaStream_t stream) {
  LIGHTKV_RETURN_IF_ERROR(
      launch(kept_flags_kernel, flat_grid(plan.tokens), 256, ws.merged_into, plan.tokens, ws.kept_flags));
  size_t temp_bytes = ws.cub_bytes;
  LIGHTKV_RETURN_IF_ERROR(
      cub::DeviceScan::ExclusiveSum(ws.cub_temp, temp_bytes, ws.kept_flags, ws.kept_before, plan.tokens, stream));
  LIGHTKV_RETURN_IF_ERROR(launch(slots_kernel, flat_grid(plan.tokens), 256, ws.merged_into, ws.kept_before,
                                 plan.tokens, plan.L, a.kept, a.index, a.assignment, local_bases(a, plan.tokens),
                                 ws.slot_key, ws.token_id));
  if (plan.slots == 0) return cudaSuccess;
  temp_bytes = ws.cub_bytes;
  LIGHTKV_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(ws.cub_temp, temp_bytes, ws.slot_key, ws.sorted_slot_key,
                                                          ws.token_id, ws.sorted_token_id, plan.tokens, 0,
                                                          plan.end_bit, stream));
  // Empty bounds for any slot no token reaches (only with a wrong `kept`): copies nothing.
  LIGHTKV_RETURN_IF_ERROR(cudaMemsetAsync(ws.groups, 0, sizeof(Group) * plan.slots, stream));
  return launch(group_bounds_kernel, flat_grid(plan.tokens), 256, ws.sorted_slot_key, ws.sorted_token_id,
                plan.tokens, static_cast<uint64_t>(plan.slots), ws.groups);
}

// lane_dot's 16-byte loads are safe when no vector crosses a head (C a multiple of the vector)
// and every row and head starts 16-byte aligned.
template <typename M>
bool vector_rows(const Params& p) {
  return p.metric_inner % (16 / sizeof(M)) == 0 && detail::rows_16_byte_aligned(p.metric, p.metric_stride, 16 / sizeof(M));
}

template <typename M>
cudaError_t launch_matching(Params p, const Plan& plan, const detail::KernelLauncher& launch) {
  p.eps = screen_eps<M>(plan.features, plan.max_feature_split);
  p.feature_chunks = ceil_div(plan.features, Screen<M>::kChunk);
  p.vector_stage = vector_staging<M>(p);
  p.vector_rows = vector_rows<M>(p);
  // At least 3 blocks: blocks 0, 1 and 2 write the tile, pair and src offsets.
  const int64_t prepare_blocks = std::max<int64_t>(3, ceil_div(plan.tokens, kPrepareThreads / 32));
  LIGHTKV_RETURN_IF_ERROR(launch(prepare_kernel<M>, detail::grid_for(prepare_blocks, kMaxGrid), kPrepareThreads, p));
  const int64_t screen_items = std::max(tile_bound(plan) * plan.dst_split, plan.partial_capacity > 0 ? kPartialItems : 0);
  LIGHTKV_RETURN_IF_ERROR(launch(screen_kernel<M>, detail::grid_for(screen_items, kMaxScreenGrid), kScreenThreads, p));
  if (plan.partial_capacity > 0) {
    LIGHTKV_RETURN_IF_ERROR(
        launch(reduce_partials_kernel<M>, detail::grid_for(tile_bound(plan), kMaxScreenGrid), kScreenThreads, p));
  }
  const int64_t src_bound = (plan.total + plan.windows) / 2;
  const unsigned int choose_grid = detail::grid_for(ceil_div(src_bound, kChooseThreads / 32), kMaxGrid);
  const bool short_rows = !p.vector_rows || plan.features <= kChooseShortRow * lane_step_features<M>();
  LIGHTKV_RETURN_IF_ERROR(short_rows ? launch(choose_kernel<M, kChooseShortRow>, choose_grid, kChooseThreads, p)
                                     : launch(choose_kernel<M, 4>, choose_grid, kChooseThreads, p));
  return launch(rank_select_kernel, detail::grid_for(tile_bound(plan), kMaxScreenGrid), kRankThreads, p);
}

// Bound on |screened - exact cosine| of exact_dots_kernel's screened sums. A float32 sum of
// kScreenedRun bf16 / fp16 products (exact in float32), accumulated by the tensor cores from 0
// (they align to the largest term and truncate), is within kScreenedRun 2^-22 of the sum of the
// products' magnitudes, which is at most |a| |b| (the same unit per feature as screen_eps), and
// the squared norms, float32 sums of 8 exact squares, are within that of theirs: so the dot
// product is within kScreenedRun 2^-22 |a| |b| and the norms' product within about as much, each
// adding that to the cosine (|a| |b| + 1e-8 >= |a| |b|). Twice that, with slack for the float64
// sums, square roots and division; a tiny absolute term covers products flushed below float32's
// normal range (at most 2^-126 each, over a denominator of at least 1e-8).
double exact_screen_eps() { return static_cast<double>(2 * kScreenedRun + 16) * std::ldexp(1.0, -22) + 1e-12; }

// exact_dots_kernel and exact_select_kernel on screened sums (kScreened) or float64 ones.
template <typename M, bool kScreened>
cudaError_t launch_exact_kernels(const Params& p, const Plan& plan, const detail::KernelLauncher& launch) {
  const int64_t items = plan.windows * plan.exact_split * exact_group_pairs(plan);
  const unsigned int grid = detail::grid_for(ceil_div(items, kExactThreads / 32), kMaxGrid);
  // Screened groups always stack their src blocks (LIGHTKV_EXACT_MMA is a float64 knob): their
  // unstacked branch is the stacked kernel, not a third one.
  LIGHTKV_RETURN_IF_ERROR(
      plan.exact_group == 1 ? launch(exact_dots_kernel<M, 1, false, kScreened>, grid, kExactThreads, p)
      : plan.exact_stacked  ? launch(exact_dots_kernel<M, kExactGroup, true, kScreened>, grid, kExactThreads, p)
                            : launch(exact_dots_kernel<M, kExactGroup, kScreened, kScreened>, grid, kExactThreads, p));
  using RecheckM = typename std::conditional<kScreened, M, void>::type;
  const int group_row_items = plan.fused_row_groups ? row_items(plan) : 2;  // 2: the least shared memory
  const auto exact_select = group_row_items == 2   ? exact_select_kernel<RecheckM, 2>
                            : group_row_items == 4 ? exact_select_kernel<RecheckM, 4>
                                                   : exact_select_kernel<RecheckM, kRowItemsMax>;
  return launch(exact_select, detail::grid_for(plan.windows * plan.select_groups, kMaxGrid), kSelectThreads, p);
}

// Steps 1-3 in exact mode: two launches whatever the window count.
template <typename M>
cudaError_t launch_exact(Params p, const Plan& plan, const detail::KernelLauncher& launch) {
  p.vector_stage = vector_staging<M>(p);
  p.vector_rows = vector_rows<M>(p);
  p.eps = !plan.exact_screened ? 0.0 : plan.exact_recheck_all ? INFINITY : exact_screen_eps();
  p.exact_blocks = plan.exact_blocks;
  p.exact_split = plan.exact_split;
  p.exact_steps = plan.exact_steps;
  p.exact_slot = plan.exact_slot;
  p.select_groups = plan.select_groups;
  if constexpr (sizeof(typename Screen<M>::Stage) == 2) {  // (plan.exact_screened only for 16-bit metrics)
    if (plan.exact_screened) return launch_exact_kernels<M, true>(p, plan, launch);
  }
  return launch_exact_kernels<M, false>(p, plan, launch);
}

// Steps 1-3: merged_into of every token.
template <typename M>
cudaError_t launch_decisions(const Params& p, const Plan& plan, const detail::KernelLauncher& launch) {
  return plan.exact ? launch_exact<M>(p, plan, launch) : launch_matching<M>(p, plan, launch);
}

// A checked merge call: its plan, its carved workspace and a launcher on its stream.
struct MergeLaunch {
  Plan plan;
  Workspace ws;
  detail::KernelLauncher launch;
  cudaStream_t stream;
  bool run;  // false: no token, nothing to launch
};

// Checks the shapes, carves the workspace and creates the launcher.
cudaError_t begin_merge(const MergeArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                        MergeLaunch* m) {
  m->plan = make_plan(a);
  m->stream = stream;
  m->run = false;
  const Plan& plan = m->plan;
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
  m->ws = carve(plan, cub_bytes, reinterpret_cast<void*>(aligned));
  if (workspace == nullptr || workspace_bytes < m->ws.bytes) return cudaErrorInvalidValue;
  LIGHTKV_RETURN_IF_ERROR(detail::KernelLauncher::create(stream, rank_select_kernel, &m->launch));
  m->run = true;
  return cudaSuccess;
}

// Bytes of the one range that `t`'s elements fill when it is a permutation of a contiguous tensor
// (HF's layout, the packed token-major view) of at most kPrefetchBytes; 0 otherwise.
int64_t prefetch_bytes(const Tensor4& t) {
  int64_t elements = 1, span = 1;
  for (int i = 0; i < 4; ++i) {
    if (t.stride[i] < 0) return 0;
    elements *= t.size[i];
    span += (t.size[i] - 1) * t.stride[i];
  }
  const int64_t element_bytes = t.dtype == DType::Float32 ? 4 : 2;  // k and v are 16- or 32-bit
  const int64_t bytes = span * element_bytes;
  return elements > 0 && span == elements && bytes <= kPrefetchBytes ? bytes : 0;
}

// Steps 1-4: which tokens merge; index, assignment and the groups (never reads the importance).
cudaError_t decide(const MergeArgs& a, const MergeLaunch& m) {
  const Plan& plan = m.plan;
  const Workspace& ws = m.ws;
  const detail::KernelLauncher& launch = m.launch;
  Params p{};
  p.metric = a.metric.data;
  for (int i = 0; i < 4; ++i) p.metric_stride[i] = a.metric.stride[i];
  p.metric_inner = std::max<int64_t>(a.metric.size[3], 1);
  p.features = a.metric.size[2] * a.metric.size[3];
  p.window_tokens = a.window_tokens;
  p.window_offsets = a.window_offsets;
  p.num_windows = plan.windows;
  p.total = plan.total;
  p.tokens = plan.tokens;
  p.L = plan.L;
  p.ratio = a.ratio;
  p.tile_offsets = ws.offsets;
  p.pair_offsets = ws.offsets + plan.windows + 1;
  p.src_offsets = ws.offsets + 2 * (plan.windows + 1);
  p.norms = ws.norms;
  p.dst_split = plan.dst_split;
  p.max_feature_split = plan.max_feature_split;
  p.partial = ws.partial;
  p.partial_capacity = plan.partial_capacity;
  p.range_value = ws.range_value;
  p.range_dst = ws.range_dst;
  p.keys = ws.keys;
  p.best_dst = ws.best_dst;

  p.merged_into = ws.merged_into;
  p.exact_window = a.max_window;
  p.exact_partial = ws.exact_partial;
  p.select_tickets = ws.select_tickets;
  p.prefetch_base = a.v.data;
  p.prefetch_bytes = prefetch_bytes(a.v);
  p.fused_row_groups = plan.fused_row_groups;
  p.row_tickets = ws.row_tickets;
  p.token_groups = ws.token_groups;
  p.kept = a.kept;
  p.row_key_bits = plan.row_key_bits;
  p.index = a.index;
  p.assignment = a.assignment;
  p.bases = local_bases(a, plan.tokens);
  p.members = ws.sorted_token_id;
  p.groups = ws.groups;

  // 1-3: every src's best dst and score, the first r per window merged.
  switch (a.metric.dtype) {
    case DType::Float32:
      LIGHTKV_RETURN_IF_ERROR(launch_decisions<float>(p, plan, launch));
      break;
    case DType::Float16:
      LIGHTKV_RETURN_IF_ERROR(launch_decisions<__half>(p, plan, launch));
      break;
    case DType::BFloat16:
      LIGHTKV_RETURN_IF_ERROR(launch_decisions<__nv_bfloat16>(p, plan, launch));
      break;
    case DType::Float64:
      LIGHTKV_RETURN_IF_ERROR(launch_decisions<double>(p, plan, launch));
      break;
  }

  // 4: output slots, index, assignment; group members contiguous, in token order.
  if (plan.fused_row_groups) return cudaSuccess;  // exact_select_kernel did
  if (plan.row_groups) {
    const int items = row_items(plan);
    const auto row_groups = items == 2   ? row_groups_kernel<2>
                            : items == 4 ? row_groups_kernel<4>
                                         : row_groups_kernel<kRowItemsMax>;
    return launch(row_groups, detail::grid_for(plan.B, kMaxGrid), kRowThreads, ws.merged_into, plan.B, plan.L, a.kept,
                  plan.row_key_bits, a.index, a.assignment, p.bases, ws.sorted_token_id, ws.groups);
  }
  return launch_general_groups(plan, ws, a, launch, m.stream);
}

// Step 5: weighted merge of k and v straight into the outputs, and sizes_out.
cudaError_t average(const MergeArgs& a, const MergeLaunch& m) {
  const Plan& plan = m.plan;
  const Workspace& ws = m.ws;
  if (plan.slots == 0) return cudaSuccess;
  ValueParams vp{};
  vp.H = plan.H;
  vp.D = plan.D;
  vp.L = plan.L;
  vp.kept = a.kept;
  vp.slots = plan.slots;
  vp.groups = ws.groups;
  vp.members = ws.sorted_token_id;
  vp.importance = a.importance;
  vp.sizes = a.sizes;
  vp.sizes_out = a.sizes_out;
  for (int tensor = 0; tensor < 2; ++tensor) {
    const Tensor4& in = tensor == 0 ? a.k : a.v;
    const OutTensor4& out = tensor == 0 ? a.k_out : a.v_out;
    vp.x[tensor] = in.data;
    vp.out[tensor] = out.data;
    for (int i = 0; i < 4; ++i) {
      vp.x_stride[tensor][i] = in.stride[i];
      vp.out_stride[tensor][i] = out.stride[i];
    }
  }
  switch (a.k.dtype) {
    case DType::Float32:
      return launch_values<float>(vp, plan.slots, m.launch);
    case DType::Float16:
      return launch_values<__half>(vp, plan.slots, m.launch);
    case DType::BFloat16:
      return launch_values<__nv_bfloat16>(vp, plan.slots, m.launch);
    case DType::Float64:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t merge_workspace_size(const MergeArgs& args) {
  const Plan plan = make_plan(args);
  size_t cub_bytes = 0;
  if (cub_temp_bytes(plan, nullptr, &cub_bytes) != cudaSuccess) return 0;
  return carve(plan, cub_bytes, nullptr).bytes;
}

cudaError_t launch_merge_decisions(const MergeArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  MergeLaunch m;
  LIGHTKV_RETURN_IF_ERROR(begin_merge(a, workspace, workspace_bytes, stream, &m));
  return m.run ? decide(a, m) : cudaSuccess;
}

cudaError_t launch_merge_values(const MergeArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  MergeLaunch m;
  LIGHTKV_RETURN_IF_ERROR(begin_merge(a, workspace, workspace_bytes, stream, &m));
  return m.run ? average(a, m) : cudaSuccess;
}

cudaError_t launch_merge(const MergeArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  MergeLaunch m;
  LIGHTKV_RETURN_IF_ERROR(begin_merge(a, workspace, workspace_bytes, stream, &m));
  if (!m.run) return cudaSuccess;
  LIGHTKV_RETURN_IF_ERROR(decide(a, m));
  return average(a, m);
}

}  // namespace lightkv_cuda
