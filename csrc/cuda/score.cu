// Cross-modal scoring (contract: `score` in csrc/lightkv.cpp) without materialising the
// (H_q, T, N) probabilities.
//
// For one image and one KV head the logits form a (g * T_img) x N_img matrix: rows are the
// (query head of the group, text token) pairs, columns the image's vision tokens. Both passes
// compute 64 x 64 logit tiles with float32 accumulation, the head dim staged through shared
// memory. For float16 / bfloat16 that is on tensor cores (mma.sync m16n8k16, fed by ldmatrix):
// 4 warps, each holding 16 whole rows of the tile in its accumulators, 128 head dims per staging
// step (the whole head in the hot case, so the operand a pass keeps fixed is staged once per
// work item). For float32 it is a SIMT tile product, 16 x 16 threads of 4 x 4 logits. Either way
// the passes reduce the logits where tile_dot leaves them (TileLayout), in base 2 (logits times
// log2(e), log2 of the sizes: exp2 is one special-function instruction, exp a few more):
//   pass 1 (row_stats_kernel): online softmax over column tiles -> per row (max, sum-exp); the
//           vision tokens of an image may be cut into `nsplit` column ranges, each giving its own
//           (max, sum) pair that pass 2 combines in split order.
//   pass 2 (column_mass_kernel): for a column tile, sum 2^(l - max) / sum over a range of row
//           tiles (`rsplit` ranges per KV head) -> partial[(hk, range), token]; the last of a
//           column tile's H_kv * rsplit items to finish (a ticket per tile) writes importance =
//           the sum of the partials in (hk, range) order / (H_q * T_img). Where its items walk
//           several row tiles over many column ranges, row_finals_kernel combines each row's pairs
//           once between the passes, instead of every item for each of its rows.
// On tensor cores with the whole head in one staging step (D <= kChunkMma: the hot case), both
// passes keep the queries of their rows in registers (mma fragments) and stage keys in two slots
// of shared memory alternately: while one column tile's keys are multiplied, the next one's
// (pass 1: of the same rows; pass 2: of the block's next item) are in flight to the other slot,
// so a tile's load is no longer a round trip its warps wait for (row_stats_pipelined,
// column_mass_pipelined).
// Where the rows are at most 2048 tokens long, the text makes at most kOnePassRowTiles row tiles
// per image and the GPU runs thread block clusters (compute capability 9.0 on), one_pass_kernel
// can do both passes in one launch instead (by shape, or forced: score_passes_knob): a cluster of
// blocks covers all column tiles of an image's rows, each 64 x 64 tile's logits are computed once
// and kept in registers while the cluster combines its row stats through distributed shared
// memory, and then summed into column masses (half the tensor-core work and exponentials, one
// read of k). The two ways round differently (last bits).
// Work items are enumerated from per-image tile counts built on the device (no host sync), by
// image_offsets_kernel, or for at most kFusedImages images by the scoring kernels themselves;
// every block walks items in a grid-stride loop. Every sum has a fixed order, so the result is
// bitwise reproducible.
#include <algorithm>
#include <atomic>
#include <cmath>

#include "common.cuh"

namespace lightkv_cuda {
namespace {

using detail::ceil_div;
using detail::find_segment;
using detail::sixteen_bit;
using detail::to_float;

constexpr int kTileRows = 64;  // (query head, text token) rows per tile
constexpr int kTileCols = 64;  // vision tokens per tile
constexpr int kChunkD = 16;    // head-dim slice staged in shared memory (SIMT path)
constexpr int kChunkMma = 128;  // head-dim slice staged in shared memory (tensor-core path)
// Work splits depend on shapes only (never on the device), so that the results do not either.
constexpr int64_t kTargetBlocks = 512;  // row_stats_kernel's splits aim at this many work items
constexpr int64_t kMaxGrid = 16384;
constexpr int64_t kColumnBlocks = 2048;  // column_mass_kernel's grid, at most (see column_run)
// row_stats_kernel's column ranges, at most: column_mass_kernel loads a row's statistics of all of
// them at once.
constexpr int kSplitsInFlight = 16;
constexpr int64_t kMaxRowRanges = 16;  // column_mass_kernel's row ranges, at most
// The blocks per SM column_mass_kernel's row ranges are sized for (a wave of items): the 16-bit
// layout's occupancy when they were tuned on an H100 (5). The pipelined passes run 4 (TileLayout);
// the ranges are left as tuned until timed on a GPU.
constexpr int64_t kPlannedColumnBlocksPerSm = 5;
// The last scoring block of a column tile loads this many of its partial sums at once (LLaVA-1.5:
// all of its 32 KV heads').
constexpr int kPartsInFlight = 32;
constexpr int kOffsetThreads = 512;
constexpr int kFinalThreads = 128;  // row_finals_kernel
// row_finals_kernel runs where a row's column ranges are at least this many: fewer pairs cost its
// items less to combine than a launch (the 16-frame video preset: 2 ranges, 4 row tiles per item).
constexpr int64_t kFinalMinSplits = 8;
// Up to this many images, row_stats_kernel builds the image tables itself (each block the ones it
// reads, block 0 the ones column_mass_kernel reads, and copies to shared memory):
// image_offsets_kernel is not launched.
constexpr int64_t kFusedImages = 8;
// one_pass_kernel: the most row tiles an image may have (its partial sums are kept per row tile),
// column tiles per block (their values stay in registers: 1 or 2) and blocks per cluster (H100:
// 16 at most, past the portable 8).
constexpr int64_t kOnePassRowTiles = 16;
constexpr int kOnePassTiles = 2;
constexpr int kMaxClusterBlocks = 16;

// Sanitised image table columns.
enum ImageField { kRow = 0, kVisStart, kVisLen, kTextStart, kTextLen, kImageFields };
// Per-image count arrays fed to the offsets scan.
enum CountArray { kRowTiles = 0, kColTiles, kTextRows, kGroups, kCountArrays };

struct Params {
  const void* k;
  int64_t k_stride[4];
  const void* text;
  int64_t text_stride[4];
  const bool* text_mask;
  int64_t mask_stride[2];
  const int32_t* sizes;
  int64_t sizes_stride[2];
  int64_t L, S, D, H_kv, H_q, group, num_images;
  float scale_log2;             // scale * log2(e): the logits are kept in base 2, l * log2(e)
  const int64_t* raw_images;   // the caller's image table
  int64_t B;
  bool fused_tables;           // at most kFusedImages images: row_stats_kernel writes the tables below
  int64_t* images;             // sanitised, kImageFields per image
  int64_t* offsets;            // kCountArrays arrays of num_images + 1 exclusive offsets
  int64_t* text_counted;       // counted (mask True) text tokens per image
  float2* stats;               // (text row, H_q, nsplit) -> (max, sum of 2^(l - max)), base-2 logits, (-inf, 0) for a
                               // masked text token
  int64_t text_capacity;       // text rows of stats and finals; rows past it (a caller's too small bound) get none
  int64_t nsplit;
  float2* finals;              // (text row, H_q) -> (max, 1 / sum) over all column ranges (row_finals_kernel), or null
  float* partial;              // (H_kv * rsplit, B * L); one pass: (H_kv * an image's row tiles, B * L)
  int64_t rsplit;
  int64_t column_run;          // column_mass_kernel: consecutive items per block
  unsigned int* tickets;       // per column tile: its items done (zeroed by the kernel launched before)
  int64_t ticket_count;
  int64_t cluster_blocks;      // one_pass_kernel: blocks per cluster
  int64_t tokens;              // B * L
  bool vector_stage;           // tensor-core path: stage the head dim with 16-byte loads (vector_staging)
  float* importance;
};

__device__ __forceinline__ const int64_t* offsets_of(const Params& p, CountArray which) {
  return p.offsets + static_cast<int64_t>(which) * (p.num_images + 1);
}

struct Image {
  int64_t row, vis_start, vis_len, text_start, text_len;
};

// Image i of the caller's table, checked against the tensor shapes: an invalid row becomes an
// empty image, so no kernel can read out of bounds.
__device__ __forceinline__ Image checked_image(const int64_t* __restrict__ raw, int64_t i, int64_t B, int64_t L,
                                               int64_t S) {
  const Image im{raw[i * 5 + 0], raw[i * 5 + 1], raw[i * 5 + 2], raw[i * 5 + 3], raw[i * 5 + 4]};
  const bool ok = im.row >= 0 && im.row < B && im.vis_start >= 0 && im.vis_len >= 0 && im.vis_start <= L &&
                  im.vis_len <= L - im.vis_start && im.text_start >= 0 && im.text_len >= 0 && im.text_start <= S &&
                  im.text_len <= S - im.text_start;
  return ok ? im : Image{0, 0, 0, 0, 0};
}

// Per-image count of CountArray `array`.
__device__ __forceinline__ int64_t image_count(int array, const Image& im, int64_t group) {
  switch (array) {
    case kRowTiles:
      return ceil_div(group * im.text_len, kTileRows);
    case kColTiles:
      return ceil_div(im.vis_len, kTileCols);
    case kGroups:  // one_pass_kernel's groups per KV head: at least one, for the uniform importance
      return max(ceil_div(group * im.text_len, kTileRows), int64_t{1});
    default:
      return im.text_len;
  }
}

__device__ __forceinline__ void store_image(const Image& im, int64_t* out) {
  out[kRow] = im.row;
  out[kVisStart] = im.vis_start;
  out[kVisLen] = im.vis_len;
  out[kTextStart] = im.text_start;
  out[kTextLen] = im.text_len;
}

// Exclusive offsets of CountArray `array` over few images, by one thread.
__device__ void serial_offsets(int array, const int64_t* __restrict__ raw, int64_t num_images, int64_t B, int64_t L,
                               int64_t S, int64_t group, int64_t* out) {
  int64_t total = 0;
  for (int64_t i = 0; i < num_images; ++i) {
    out[i] = total;
    total += image_count(array, checked_image(raw, i, B, L, S), group);
  }
  out[num_images] = total;
}

// The checked image table and the counted text tokens of every image, one warp per image (all
// threads of the block call this).
template <int kThreadsPerBlock>
__device__ void write_images(const int64_t* __restrict__ raw, int64_t num_images, int64_t B, int64_t L, int64_t S,
                             const bool* __restrict__ mask, int64_t mask_stride_b, int64_t mask_stride_s,
                             int64_t* __restrict__ images, int64_t* __restrict__ text_counted) {
  const int lane = threadIdx.x % 32;
  for (int64_t i = threadIdx.x / 32; i < num_images; i += kThreadsPerBlock / 32) {
    const Image im = checked_image(raw, i, B, L, S);
    int64_t counted = 0;
    for (int64_t t = lane; t < im.text_len; t += 32) {
      counted += (mask == nullptr || mask[im.row * mask_stride_b + (im.text_start + t) * mask_stride_s]) ? 1 : 0;
    }
    for (int offset = 16; offset > 0; offset /= 2) counted += __shfl_xor_sync(0xffffffffu, counted, offset);
    if (lane == 0) {
      store_image(im, images + i * kImageFields);
      text_counted[i] = counted;
    }
  }
}

// Block `a` (one per CountArray) writes the exclusive offsets of that per-image count. Block 0
// first writes the checked image table and the counted text tokens. The blocks also zero
// `importance` and `tickets` (`tokens` and `ticket_count` of them; 0 where the scoring kernel that
// follows does it).
__global__ void __launch_bounds__(kOffsetThreads)
    image_offsets_kernel(const int64_t* __restrict__ raw, int64_t num_images, int64_t B, int64_t L, int64_t S,
                         int64_t group, const bool* __restrict__ mask, int64_t mask_stride_b, int64_t mask_stride_s,
                         int64_t* __restrict__ images, int64_t* __restrict__ offsets,
                         int64_t* __restrict__ text_counted, float* __restrict__ importance, int64_t tokens,
                         unsigned int* __restrict__ tickets, int64_t ticket_count) {
  detail::await_previous_kernel();
  detail::grid_fill(importance, tokens, 0.f);
  detail::grid_fill(tickets, ticket_count, 0u);
  const int array = blockIdx.x;
  if (array == 0) write_images<kOffsetThreads>(raw, num_images, B, L, S, mask, mask_stride_b, mask_stride_s, images,
                                               text_counted);
  const auto count = [&](int64_t i) { return image_count(array, checked_image(raw, i, B, L, S), group); };
  detail::block_exclusive_offsets<kOffsetThreads>(count, num_images, offsets + array * (num_images + 1));
}

static_assert(kTileRows == kTileCols, "tile_dot stages rows and columns with one index");

// Where tile_dot leaves the logits of a tile: thread t holds rows row(i), i < kRows, at columns
// col(j), j < kCols. The kRowLanes lanes that share a row are lane ^ 1, ^ 2 .. ^ (kRowLanes / 2);
// the lanes of a warp that share a column are lane ^ kRowLanes, ^ (2 kRowLanes) .. ^ 16.
template <typename T, bool kTensorCores = (sizeof(T) == 2)>
struct TileLayout {  // SIMT: 16 x 16 threads, 4 x 4 logits each
  static constexpr int kThreads = 256, kPassBlocksPerSm = 3, kRows = 4, kCols = 4, kRowLanes = 16;
  // one_pass_kernel, which keeps 1 or 2 tiles' logits in registers: blocks per SM without spills
  static constexpr int kOnePassBlocksPerSm[2] = {2, 1};
  __device__ static int row(int i) { return threadIdx.x / 16 + 16 * i; }
  __device__ static int col(int j) { return threadIdx.x % 16 + 16 * j; }
};
template <typename T>
struct TileLayout<T, true> {  // tensor cores: warp w holds rows 16 w .. 16 w + 15 as mma_m16n8k16 accumulators
  static constexpr int kThreads = 128, kRows = 2, kCols = 16, kRowLanes = 4;
  // The two passes keep their rows' queries in registers (32 more per thread): 4 blocks per SM
  static constexpr int kPassBlocksPerSm = 4;
  static constexpr int kOnePassBlocksPerSm[2] = {5, 3};
  __device__ static int row(int i) { return 16 * (threadIdx.x / 32) + threadIdx.x % 32 / 4 + 8 * i; }
  __device__ static int col(int j) { return 8 * (j / 2) + 2 * (threadIdx.x % 4) + j % 2; }
};
static_assert(TileLayout<__half>::kThreads / 32 * 16 == kTileRows, "one warp per 16 rows of a tile");
static_assert(TileLayout<__half>::kThreads >= kTileCols && TileLayout<float>::kThreads >= kTileCols,
              "a thread per row and per column of a tile");

constexpr int kStagedStride = kChunkMma + 8;  // 16-bit values per staged row (see TileSmem)
constexpr int kMmaSteps = kChunkMma / 16;      // k-steps of mma_m16n8k16 per staging step
using StagedTile = uint16_t[kTileRows][kStagedStride];
// tile_dot stages the queries in slot kQuerySlot and the keys in slot kKeySlot, and the column
// data of those keys (k_first, cols, bias) is TileSmem's entry kKeySlot. The pipelined walks
// (whole_head_on_tensor_cores) load the queries into registers from the slot other than the keys'
// and then stage the keys of consecutive column tiles in alternate slots.
constexpr int kQuerySlot = 0, kKeySlot = 1;

struct TileSmem {
  union {
    struct {  // SIMT staging, transposed
      float q[kChunkD][kTileRows + 4];
      float k[kChunkD][kTileCols + 4];
    } simt;
    struct {  // tensor-core staging: raw 16-bit values, rows of 68 words (the 8 rows an ldmatrix
              // matrix reads start 4 banks apart: conflict-free)
      alignas(16) StagedTile staged[2];
    } mma;
  };
  // Per row set (column_mass_pipelined alternates two; the other walks use set 0):
  int64_t q_base[2][kTileRows];  // element offset of each row's query vector
  bool row_ok[2][kTileRows];     // row exists and its text token is counted
  // Per slot: columns 0 .. cols - 1 are vision tokens of the image, consecutive in k: column c's
  // key starts at element k_first + c * k_stride[2]; bias is log2(size) or 0, -inf from column
  // `cols` on, which masks those logits.
  int64_t k_first[2];
  int cols[2];
  float bias[2][kTileCols];
};

// Starts staging head dims d0 .. d0 + kChunkMma - 1 of the tile's queries (the rows of
// sm.q_base / row_ok of `row_set`; zeros elsewhere) into `to`, 16-bit types only. With vector_stage, thread t
// copies 16-byte vector t % kVectors of rows t / kVectors, + kRowStep, ...: all of its copies are
// in flight together, until wait_async_copies / a copy group wait. Otherwise element by element
// (done on return).
template <typename L>
__device__ __forceinline__ void stage_queries(const Params& p, const TileSmem& sm, int64_t d0, StagedTile& to,
                                              int row_set = 0) {
  const uint16_t* __restrict__ text = static_cast<const uint16_t*>(p.text);
  const int64_t* q_base = sm.q_base[row_set];
  const bool* row_ok = sm.row_ok[row_set];
  if (p.vector_stage) {  // contiguous, aligned head dims that are a multiple of 8
    constexpr int kVectors = kChunkMma / 8, kRowStep = L::kThreads / kVectors;
    const int at = 8 * (threadIdx.x % kVectors), first_row = threadIdx.x / kVectors;
    const bool in_head = d0 + at < p.D;
#pragma unroll
    for (int i = 0; i < kTileRows / kRowStep; ++i) {
      const int row = first_row + i * kRowStep;
      detail::copy_16_bytes_async(&to[row][at], text + q_base[row] + d0 + at, in_head && row_ok[row], text);
    }
  } else {
    const int kk = threadIdx.x % kChunkMma;
    const int64_t d = d0 + kk;
    const bool live = d < p.D;
    for (int row = threadIdx.x / kChunkMma; row < kTileRows; row += L::kThreads / kChunkMma) {
      to[row][kk] = live && row_ok[row] ? text[q_base[row] + d * p.text_stride[3]] : uint16_t{0};
    }
  }
}

// The same for the keys of columns 0 .. cols - 1 starting at element k_first (a pointer walk over
// consecutive tokens).
template <typename L>
__device__ __forceinline__ void stage_keys(const Params& p, int64_t k_first, int cols, int64_t d0, StagedTile& to) {
  const uint16_t* __restrict__ k = static_cast<const uint16_t*>(p.k);
  if (p.vector_stage) {
    constexpr int kVectors = kChunkMma / 8, kRowStep = L::kThreads / kVectors;
    const int at = 8 * (threadIdx.x % kVectors), first_row = threadIdx.x / kVectors;
    const bool in_head = d0 + at < p.D;
    const int64_t step = kRowStep * p.k_stride[2];
    const uint16_t* from = k + k_first + first_row * p.k_stride[2] + d0 + at;
#pragma unroll
    for (int i = 0; i < kTileCols / kRowStep; ++i, from += step) {
      const int row = first_row + i * kRowStep;
      detail::copy_16_bytes_async(&to[row][at], from, in_head && row < cols, k);
    }
  } else {
    const int kk = threadIdx.x % kChunkMma;
    const int64_t d = d0 + kk;
    const bool live = d < p.D;
    for (int row = threadIdx.x / kChunkMma; row < kTileCols; row += L::kThreads / kChunkMma) {
      to[row][kk] = live && row < cols ? k[k_first + row * p.k_stride[2] + d * p.k_stride[3]] : uint16_t{0};
    }
  }
}

// The A fragment of mma_m16n8k16 for head dims k0 .. k0 + 15 of warp w's rows 16 w .. 16 w + 15
// of the staged queries.
__device__ __forceinline__ void load_query_step(const StagedTile& queries, int k0, uint32_t (&a)[4]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Matrices: rows +0 / +8 at k0, then at k0 + 8.
  detail::load_matrix_x4(a, &queries[16 * warp + lane % 8 + 8 * (lane / 8 % 2)][k0 + 8 * (lane / 16)]);
}

// part[nt] += the warp's rows (A fragment a, head dims k0 .. k0 + 15) times the staged keys of
// columns 8 nt .. 8 nt + 7 over the same head dims, nt < 8.
template <typename T>
__device__ __forceinline__ void multiply_step(const uint32_t (&a)[4], const StagedTile& keys, int k0,
                                              float (&part)[8][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int np = 0; np < 4; ++np) {  // matrices: n-tile 2 np at k0, k0 + 8, then n-tile 2 np + 1
    uint32_t b[4];
    detail::load_matrix_x4(b, &keys[16 * np + 8 * (lane / 16) + lane % 8][k0 + 8 * (lane / 8 % 2)]);
    const uint32_t left[2] = {b[0], b[1]}, right[2] = {b[2], b[3]};
    detail::mma_m16n8k16<T>(part[2 * np], a, left);
    detail::mma_m16n8k16<T>(part[2 * np + 1], a, right);
  }
}

// acc[i][j] = <query of row L::row(i), key of column L::col(j)> over the whole head dim, for
// L = TileLayout<T>. Expects q_base/row_ok/k_first/cols to be visible to all threads. With a
// whole head in one staging step, `rows_staged` / `cols_staged` say that the queries / keys are
// those the previous call staged, which are then not staged again.
template <typename T>
__device__ __forceinline__ void tile_dot(const Params& p, TileSmem& sm, bool rows_staged, bool cols_staged,
                                         float (&acc)[TileLayout<T>::kRows][TileLayout<T>::kCols]) {
  using L = TileLayout<T>;
  if constexpr (sizeof(T) == 2) {
    // Warp w computes rows 16 w.., all 64 columns; fragments as in mma_m16n8k16.
    const bool whole_head = p.D <= kChunkMma;
    const bool stage_rows = !(rows_staged && whole_head), stage_cols = !(cols_staged && whole_head);
    float part[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) part[nt][e] = 0.f;
    for (int64_t d0 = 0; d0 < p.D; d0 += kChunkMma) {
      __syncthreads();  // every warp is done with what this step stages over
      // Both operands' copies in flight together: one memory round trip per chunk.
      if (stage_rows) stage_queries<L>(p, sm, d0, sm.mma.staged[kQuerySlot]);
      if (stage_cols) stage_keys<L>(p, sm.k_first[kKeySlot], sm.cols[kKeySlot], d0, sm.mma.staged[kKeySlot]);
      detail::wait_async_copies();
      __syncthreads();
#pragma unroll
      for (int k0 = 0; k0 < kChunkMma; k0 += 16) {
        if (d0 + k0 >= p.D) break;  // the zero-filled tail of a short head
        uint32_t a[4];
        load_query_step(sm.mma.staged[kQuerySlot], k0, a);
        multiply_step<T>(a, sm.mma.staged[kKeySlot], k0, part);
      }
    }
#pragma unroll
    for (int i = 0; i < L::kRows; ++i)
#pragma unroll
      for (int j = 0; j < L::kCols; ++j) acc[i][j] = part[j / 2][2 * i + j % 2];
  } else {
    const T* __restrict__ text = static_cast<const T*>(p.text);
    const T* __restrict__ k = static_cast<const T*>(p.k);
#pragma unroll
    for (int i = 0; i < L::kRows; ++i) {
#pragma unroll
      for (int j = 0; j < L::kCols; ++j) acc[i][j] = 0.f;
    }
    for (int64_t d0 = 0; d0 < p.D; d0 += kChunkD) {
      __syncthreads();  // every thread is done with the previous chunk
      const int cols = sm.cols[kKeySlot];
      const int64_t k_first = sm.k_first[kKeySlot];
      for (int e = threadIdx.x; e < kTileRows * kChunkD; e += L::kThreads) {
        const int row = e / kChunkD, kk = e % kChunkD;
        const int64_t d = d0 + kk;
        const bool live = d < p.D;
        sm.simt.q[kk][row] = (live && sm.row_ok[0][row]) ? to_float(text[sm.q_base[0][row] + d * p.text_stride[3]]) : 0.f;
        sm.simt.k[kk][row] = (live && row < cols) ? to_float(k[k_first + row * p.k_stride[2] + d * p.k_stride[3]]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kChunkD; ++kk) {
        float a[L::kRows], b[L::kCols];
#pragma unroll
        for (int i = 0; i < L::kRows; ++i) a[i] = sm.simt.q[kk][L::row(i)];
#pragma unroll
        for (int j = 0; j < L::kCols; ++j) b[j] = sm.simt.k[kk][L::col(j)];
#pragma unroll
        for (int i = 0; i < L::kRows; ++i) {
#pragma unroll
          for (int j = 0; j < L::kCols; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
      }
    }
  }
}

// Whether the passes take the pipelined walks (row_stats_pipelined, column_mass_kernel's): 16-bit
// types on tensor cores, with the whole head in one staging step.
template <typename T>
__device__ __forceinline__ bool whole_head_on_tensor_cores(const Params& p) {
  return sizeof(T) == 2 && p.D <= kChunkMma;
}

// acc = the warp's rows (query fragments, see load_query_step) times the staged keys over the
// whole head, as tile_dot computes it (same order: the same bits), for p.D <= kChunkMma.
template <typename T>
__device__ __forceinline__ void multiply_keys(const uint32_t (&query)[kMmaSteps][4], const StagedTile& keys,
                                              int64_t dims, float (&acc)[TileLayout<T>::kRows][TileLayout<T>::kCols]) {
  using L = TileLayout<T>;
  float part[8][4];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) part[nt][e] = 0.f;
#pragma unroll
  for (int s = 0; s < kMmaSteps; ++s) {
    if (16 * s >= dims) break;  // the zero-filled tail of a short head
    multiply_step<T>(query[s], keys, 16 * s, part);
  }
#pragma unroll
  for (int i = 0; i < L::kRows; ++i)
#pragma unroll
    for (int j = 0; j < L::kCols; ++j) acc[i][j] = part[j / 2][2 * i + j % 2];
}

// The warp's query fragments (load_query_step) over the whole head, from staged queries.
__device__ __forceinline__ void load_query_fragments(const Params& p, const StagedTile& queries,
                                                     uint32_t (&query)[kMmaSteps][4]) {
#pragma unroll
  for (int s = 0; s < kMmaSteps; ++s) {
    if (16 * s < p.D) load_query_step(queries, 16 * s, query[s]);
  }
}

// Starts a pipelined walk (whole_head_on_tensor_cores) over a row tile whose setup the caller has
// published: stages its queries in slot kQuerySlot and the keys of entry kKeySlot's column data in
// kKeySlot, in one round trip, and loads the queries into `query`. Ends with every warp done
// reading slot kQuerySlot (free for keys).
template <typename T>
__device__ __forceinline__ void stage_queries_to_registers(const Params& p, TileSmem& sm,
                                                           uint32_t (&query)[kMmaSteps][4]) {
  using L = TileLayout<T>;
  stage_queries<L>(p, sm, 0, sm.mma.staged[kQuerySlot]);
  stage_keys<L>(p, sm.k_first[kKeySlot], sm.cols[kKeySlot], 0, sm.mma.staged[kKeySlot]);
  detail::wait_async_copies();
  __syncthreads();
  load_query_fragments(p, sm.mma.staged[kQuerySlot], query);
  __syncthreads();
}

// Tile setup shared by the passes: thread `local` < kTileRows sets up row `local` of row tile
// `row_tile` (with `rows`) and column `local` of column tile `col_tile` (with `cols`). Row r of
// (image, hk) is query head hk * group + r / T_img, text token text_start + r % T_img; columns
// 0 .. cols - 1 are vision tokens col_tile * kTileCols + c of the image. Loading (the row's mask,
// the column's size) and storing to shared memory are separate steps, so that both loads, and
// any a caller issues in between, are in flight together: one round trip. The column data goes to
// entry `slot` of TileSmem's.
struct TileSetup {
  bool rows, cols, row_exists, mask;
  int col_count;
  int32_t size;
  int64_t q_base, k_first;
};

__device__ __forceinline__ TileSetup load_tile_setup(const Params& p, const int64_t* img, int64_t hk,
                                                     int64_t row_tile, bool rows, int64_t col_tile, bool cols) {
  TileSetup t{};
  const int local = threadIdx.x;
  t.rows = rows;
  t.cols = cols;
  const int64_t tl = img[kTextLen];
  const int64_t r = row_tile * kTileRows + local;
  t.row_exists = rows && r < p.group * tl;
  int64_t mask_at = 0;
  if (t.row_exists) {
    const int64_t hq = hk * p.group + r / tl, s = img[kTextStart] + r % tl;
    t.q_base = img[kRow] * p.text_stride[0] + hq * p.text_stride[1] + s * p.text_stride[2];
    mask_at = img[kRow] * p.mask_stride[0] + s * p.mask_stride[1];
  }
  const int64_t first = img[kVisStart] + col_tile * kTileCols;  // token of column 0
  t.col_count = static_cast<int>(min(int64_t{kTileCols}, img[kVisLen] - col_tile * kTileCols));
  t.k_first = img[kRow] * p.k_stride[0] + hk * p.k_stride[1] + first * p.k_stride[2];
  t.mask = t.row_exists && p.text_mask != nullptr ? p.text_mask[mask_at] : true;
  t.size = cols && local < t.col_count && p.sizes != nullptr
               ? p.sizes[img[kRow] * p.sizes_stride[0] + (first + local) * p.sizes_stride[1]]
               : 1;
  return t;
}

__device__ __forceinline__ void store_tile_setup(TileSmem& sm, const TileSetup& t, int slot = kKeySlot,
                                                 int row_set = 0) {
  const int local = threadIdx.x;
  if (t.rows) {
    sm.row_ok[row_set][local] = t.row_exists && t.mask;
    sm.q_base[row_set][local] = t.q_base;
  }
  if (t.cols) {
    if (local == 0) {
      sm.cols[slot] = t.col_count;
      sm.k_first[slot] = t.k_first;
    }
    // log2(size), or 0 without sizes; -inf past the image's columns.
    sm.bias[slot][local] = local < t.col_count ? log2f(static_cast<float>(t.size)) : -INFINITY;
  }
}

__device__ __forceinline__ void setup_tile(const Params& p, TileSmem& sm, const int64_t* img, int64_t hk,
                                           int64_t row_tile, bool rows, int64_t col_tile, bool cols) {
  if (threadIdx.x < kTileRows) store_tile_setup(sm, load_tile_setup(p, img, hk, row_tile, rows, col_tile, cols));
}

// 2^x in one special-function instruction, results below 2^-126 flushed to 0: exp2f without its
// subnormal range fix-up (three instructions more per call). Callers say why the flush is harmless.
__device__ __forceinline__ float exp2_ftz(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = exp2f(x);
  return y < 0x1p-126f ? 0.f : y;  // the flush, on the CPU emulation
#endif
}

// The column masses' exponentials are taken kMassShift above the row maximum, so that exp2_ftz
// flushes only below 2^-150 relative to it (add_tile_to_column_sums, one_pass_kernel); the row's
// factor takes the 2^kMassShift back (kMassUnshift).
constexpr float kMassShift = 24.f;
constexpr float kMassUnshift = 0x1p-24f;

// Max / sum over the lanes that share a row of L (the xor butterfly leaves it in all of them).
template <typename L>
__device__ __forceinline__ float max_over_row_lanes(float v) {
#pragma unroll
  for (int offset = L::kRowLanes / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
template <typename L>
__device__ __forceinline__ float sum_over_row_lanes(float v) {
#pragma unroll
  for (int offset = L::kRowLanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
// One step of column_total's reduce-scatter, then the next ones: the lane keeps the half of its
// 2 kHalf values that `offset` (its lane bit) picks, adds its partner's of that half into
// values[0, kHalf), and `first` follows the columns it keeps. (A template per step, so the loops
// unroll and the values stay in registers.)
template <int kHalf, int kOffset>
__device__ __forceinline__ void keep_column_half(float* values, int& first) {
  const bool upper = (threadIdx.x & kOffset) != 0;  // keeps the upper half, its partner the lower
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    const float lower_value = values[j], upper_value = values[j + kHalf];
    const float sent = upper ? lower_value : upper_value;
    const float kept = upper ? upper_value : lower_value;
    values[j] = kept + __shfl_xor_sync(0xffffffffu, sent, kOffset);
  }
  first += upper ? kHalf : 0;
  if constexpr (kOffset < 16) keep_column_half<kHalf / 2, kOffset * 2>(values, first);
}

// The tile's column sums: each thread's column_sum (over its rows of L) summed over the lanes of
// its warp that share the column, then over the warps in order (through `column_part`); thread
// c < kTileCols gets column c's. Ends with the block's threads done writing `column_part`.
// The lanes' sums are a reduce-scatter: at each xor step a lane keeps half of its values and adds
// its partner's of that half, so the values halve with each step (tensor cores: 8 + 4 + 2
// shuffles where summing all 16 everywhere took 48) and every lane ends with kCols >> steps
// columns. Each kept sum is the one the all-lane butterfly forms (the same pairs in the same
// order): the same bits.
template <typename L>
__device__ __forceinline__ float column_total(float (&column_sum)[L::kCols],
                                              float (&column_part)[L::kThreads / 32][kTileCols]) {
  constexpr int kKept = L::kCols * L::kRowLanes / 32;
  static_assert(kKept >= 1, "every lane keeps a column");
  int first = 0;  // the lane's values are those of columns col(first), col(first + 1), ...
  keep_column_half<L::kCols / 2, L::kRowLanes>(column_sum, first);
#pragma unroll
  for (int j = 0; j < kKept; ++j) column_part[threadIdx.x / 32][L::col(first + j)] = column_sum[j];
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x < kTileCols) {
    for (int w = 0; w < L::kThreads / 32; ++w) total += column_part[w][threadIdx.x];
  }
  return total;
}

// Importance 1 / (the image's vision tokens) for column tile `col_tile` of image `img`, whose text
// counts no token: thread c < kTileCols writes column c.
__device__ __forceinline__ void write_uniform_importance(const Params& p, const int64_t* img, int64_t col_tile) {
  const int64_t c = col_tile * kTileCols + threadIdx.x;
  if (threadIdx.x < kTileCols && c < img[kVisLen]) {
    p.importance[img[kRow] * p.L + img[kVisStart] + c] = 1.f / static_cast<float>(img[kVisLen]);
  }
}

// (max, 1 / sum) of a row's softmax from kCount (max, sum of 2^(l - max)) pairs over parts of its
// columns, (-inf, 0) for a part where no column counts, combined in pair order. The inverse is 0
// for a row whose logits are all -inf (masked, or every size 0): it contributes nothing.
template <int kCount>
__device__ __forceinline__ float2 row_max_and_inverse_sum(const float2 (&pair)[kCount]) {
  float m = -INFINITY, total = 0.f;
#pragma unroll
  for (int i = 0; i < kCount; ++i) m = fmaxf(m, pair[i].x);
#pragma unroll
  for (int i = 0; i < kCount; ++i) {
    if (pair[i].x != -INFINITY) total += pair[i].y * exp2f(pair[i].x - m);
  }
  return make_float2(m, total > 0.f ? 1.f / total : 0.f);
}

// The statistics of a row's column ranges, (-inf, 0) past `count`, loaded together.
__device__ __forceinline__ void load_row_pairs(const float2* __restrict__ at, int count,
                                               float2 (&pair)[kSplitsInFlight]) {
#pragma unroll
  for (int s = 0; s < kSplitsInFlight; ++s) pair[s] = s < count ? at[s] : make_float2(-INFINITY, 0.f);
}

// Folds a tile's logits (acc: dot products, before scale and bias) into its rows' online softmax
// statistics: the running max and sum of 2^(l - max), base 2.
template <typename L>
__device__ __forceinline__ void add_tile_to_row_stats(float scale_log2, const float (&acc)[L::kRows][L::kCols],
                                                      const float* bias, float (&run_max)[L::kRows],
                                                      float (&run_sum)[L::kRows]) {
  float col_bias[L::kCols];
#pragma unroll
  for (int j = 0; j < L::kCols; ++j) col_bias[j] = bias[L::col(j)];
#pragma unroll
  for (int i = 0; i < L::kRows; ++i) {
    float logit[L::kCols];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < L::kCols; ++j) {
      logit[j] = fmaf(scale_log2, acc[i][j], col_bias[j]);  // -inf past the image's columns
      tile_max = fmaxf(tile_max, logit[j]);
    }
    const float new_max = fmaxf(run_max[i], max_over_row_lanes<L>(tile_max));
    float local = 0.f;
    if (new_max != -INFINITY) {  // uniform over the lanes of the row
#pragma unroll
      // A softmax denominator holds 2^0 (its maximum): a term below 2^-126 cannot change it, so
      // the sum is exactly that of exp2f's terms.
      for (int j = 0; j < L::kCols; ++j) local += exp2_ftz(logit[j] - new_max);
    }
    local = sum_over_row_lanes<L>(local);
    if (new_max != -INFINITY) {
      run_sum[i] = run_sum[i] * exp2f(run_max[i] - new_max) + local;
      run_max[i] = new_max;
    }
  }
}

// Row statistics over column tiles col_begin .. col_end - 1 of a row tile whose setup (rows, and
// the first column tile in slot kKeySlot) the caller has published, on tensor cores with the
// whole head in one staging step (whole_head_on_tensor_cores). The rows' queries are staged once
// and kept in registers; while a tile's keys are multiplied, the next tile's are in flight to the
// other slot (and its sizes to registers): one exposed round trip per item instead of two per
// tile. The products and their order are tile_dot's: the same bits.
template <typename T>
__device__ __forceinline__ void row_stats_pipelined(const Params& p, TileSmem& sm, const int64_t* img, int64_t hk,
                                                    int64_t row_tile, int64_t col_begin, int64_t col_end,
                                                    float (&run_max)[TileLayout<T>::kRows],
                                                    float (&run_sum)[TileLayout<T>::kRows]) {
  if constexpr (sizeof(T) == 2) {
    using L = TileLayout<T>;
    if (col_begin >= col_end) return;  // uniform over the block
    uint32_t query[kMmaSteps][4];
    stage_queries_to_registers<T>(p, sm, query);
    int slot = kKeySlot;
    for (int64_t col_tile = col_begin; col_tile < col_end; ++col_tile, slot ^= 1) {
      const bool prefetch = col_tile + 1 < col_end;
      TileSetup next{};
      if (prefetch) {
        next = load_tile_setup(p, img, hk, row_tile, /*rows=*/false, col_tile + 1, /*cols=*/true);
        stage_keys<L>(p, next.k_first, next.col_count, 0, sm.mma.staged[slot ^ 1]);
      }
      detail::close_async_copy_group();
      detail::wait_async_copy_groups_but_newest<1>();  // this tile's keys have landed (this thread's copies)
      __syncthreads();                                  // everybody's
      float acc[L::kRows][L::kCols];
      multiply_keys<T>(query, sm.mma.staged[slot], p.D, acc);
      add_tile_to_row_stats<L>(p.scale_log2, acc, sm.bias[slot], run_max, run_sum);
      if (prefetch && threadIdx.x < kTileRows) store_tile_setup(sm, next, slot ^ 1);
      __syncthreads();  // this slot is read; the next tile's column data is written
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(TileLayout<T>::kThreads, TileLayout<T>::kPassBlocksPerSm)
    row_stats_kernel(const Params p) {
  detail::await_previous_kernel();
  using L = TileLayout<T>;
  __shared__ TileSmem sm;
  __shared__ int64_t fused_images[kFusedImages * kImageFields];
  __shared__ int64_t fused_offsets[2][kFusedImages + 1];  // row tiles, text rows
  const int64_t* images = p.images;
  const int64_t* row_tile_off = offsets_of(p, kRowTiles);
  const int64_t* text_off = offsets_of(p, kTextRows);
  if (p.fused_tables) {  // uniform: image_offsets_kernel's work (it was not launched)
    if (blockIdx.x == 0) {  // the tables column_mass_kernel reads
      write_images<L::kThreads>(p.raw_images, p.num_images, p.B, p.L, p.S, p.text_mask, p.mask_stride[0],
                             p.mask_stride[1], p.images, p.text_counted);
      if (threadIdx.x < kCountArrays) {
        serial_offsets(threadIdx.x, p.raw_images, p.num_images, p.B, p.L, p.S, p.group,
                       p.offsets + threadIdx.x * (p.num_images + 1));
      }
    }
    // The tables this block reads, in shared memory (those in global memory are being written).
    if (threadIdx.x < p.num_images) {
      store_image(checked_image(p.raw_images, threadIdx.x, p.B, p.L, p.S), fused_images + threadIdx.x * kImageFields);
    }
    if (threadIdx.x < 2) {
      serial_offsets(threadIdx.x == 0 ? kRowTiles : kTextRows, p.raw_images, p.num_images, p.B, p.L, p.S, p.group,
                     fused_offsets[threadIdx.x]);
    }
    __syncthreads();
    images = fused_images;
    row_tile_off = fused_offsets[0];
    text_off = fused_offsets[1];
  }
  const int64_t items = row_tile_off[p.num_images] * p.H_kv * p.nsplit;
  // Tokens of no image score 0; column_mass_kernel writes the others. Its tickets start at 0.
  detail::grid_fill(p.importance, p.tokens, 0.f);
  detail::grid_fill(p.tickets, p.ticket_count, 0u);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t tile = item / (p.H_kv * p.nsplit);
    const int64_t hk = (item / p.nsplit) % p.H_kv, split = item % p.nsplit;
    const int64_t image = find_segment(row_tile_off, p.num_images, tile);
    const int64_t* img = images + image * kImageFields;
    const int64_t row_tile = tile - row_tile_off[image];
    const int64_t col_tiles = ceil_div(img[kVisLen], kTileCols);
    const int64_t per_split = (col_tiles + p.nsplit - 1) / p.nsplit;
    const int64_t col_begin = split * per_split;
    const int64_t col_end = min(col_tiles, col_begin + per_split);

    __syncthreads();  // the previous item is done with the shared row data
    setup_tile(p, sm, img, hk, row_tile, /*rows=*/true, col_begin, /*cols=*/col_begin < col_end);
    __syncthreads();  // row_ok is read below even when this split has no column tile
    float run_max[L::kRows], run_sum[L::kRows];
#pragma unroll
    for (int i = 0; i < L::kRows; ++i) {
      run_max[i] = -INFINITY;
      run_sum[i] = 0.f;
    }
    if (whole_head_on_tensor_cores<T>(p)) {
      row_stats_pipelined<T>(p, sm, img, hk, row_tile, col_begin, col_end, run_max, run_sum);
    } else {
      for (int64_t col_tile = col_begin; col_tile < col_end; ++col_tile) {
        if (col_tile > col_begin) {
          setup_tile(p, sm, img, hk, row_tile, /*rows=*/false, col_tile, /*cols=*/true);
          __syncthreads();
        }
        float acc[L::kRows][L::kCols];
        tile_dot<T>(p, sm, /*rows_staged=*/col_tile > col_begin, /*cols_staged=*/false, acc);
        add_tile_to_row_stats<L>(p.scale_log2, acc, sm.bias[kKeySlot], run_max, run_sum);
        __syncthreads();  // columns of this tile are read before the next setup_tile
      }
    }
    if (threadIdx.x % L::kRowLanes == 0) {  // every row's: (-inf, 0) for a masked one
      const int64_t tl = img[kTextLen];
#pragma unroll
      for (int i = 0; i < L::kRows; ++i) {
        const int local_row = L::row(i);
        const int64_t r = row_tile * kTileRows + local_row;
        if (r >= p.group * tl) continue;
        const int64_t hq = hk * p.group + r / tl, text_row = text_off[image] + r % tl;
        if (text_row >= p.text_capacity) continue;
        p.stats[(text_row * p.H_q + hq) * p.nsplit + split] =
            sm.row_ok[0][local_row] ? make_float2(run_max[i], run_sum[i]) : make_float2(-INFINITY, 0.f);
      }
    }
  }
}

// Between the passes, where column_mass_kernel's items walk several row tiles (the 16k-token
// image: 7 per item, each combining its 64 rows' statistics of 16 column ranges, while the other
// warps wait at the barrier): every (text row, query head)'s statistics combined once, by
// row_max_and_inverse_sum in split order as column_mass_kernel would (the same bits), so that its
// items load one pair per row.
__global__ void __launch_bounds__(kFinalThreads) row_finals_kernel(const Params p) {
  detail::await_previous_kernel();
  const int64_t rows = min(offsets_of(p, kTextRows)[p.num_images], p.text_capacity) * p.H_q;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kFinalThreads;
  for (int64_t row = blockIdx.x * int64_t{kFinalThreads} + threadIdx.x; row < rows; row += stride) {
    float2 pair[kSplitsInFlight];
    load_row_pairs(p.stats + row * p.nsplit, static_cast<int>(p.nsplit), pair);
    p.finals[row] = row_max_and_inverse_sum(pair);
  }
}

// column_mass_kernel's image tables (global memory, or copies in shared memory).
struct ColumnTables {
  const int64_t* images;
  const int64_t* text_counted;
  const int64_t* col_tile_off;
  const int64_t* text_off;
};

// A column_mass_kernel item: column tile `col_tile` of image `image` (tile `tile` of all images),
// against row tiles row_begin .. row_end - 1 of KV head hk's rows (row range `range`).
struct ColumnItem {
  int64_t tile, image, counted;
  const int64_t* img;
  // Tile counts of one image's row (< 2^31: a row of k or text holds 64 times as many values)
  int hk, range, col_tile, row_begin, row_end;
};

// Whose rows (image, KV head, row tile) a block holds staged: their row statistics, and their
// queries in shared memory or registers.
struct RowsHeld {
  int64_t image = -1;
  int hk = -1, row_tile = -1;
  __device__ bool are(const ColumnItem& it, int tile) const {
    return it.image == image && it.hk == hk && tile == row_tile;
  }
  __device__ void set(const ColumnItem& it, int tile) {
    image = it.image;
    hk = it.hk;
    row_tile = tile;
  }
};

// Item `item` of `tiles` column tiles. Consecutive items are mostly of one image: `image_hint`
// (an image, or -1) is tried before a search.
__device__ __forceinline__ ColumnItem column_item(const Params& p, const ColumnTables& tables, int64_t tiles,
                                                  int64_t item, int64_t image_hint) {
  ColumnItem it;
  // (Divisions by 1 are skipped: they are the common case, and a 64-bit division is ~20 instructions.)
  const int64_t part = item / tiles;  // hk * rsplit + range
  it.tile = item - part * tiles;
  const int64_t hk = p.rsplit == 1 ? part : part / p.rsplit;
  it.hk = static_cast<int>(hk);
  it.range = static_cast<int>(part - hk * p.rsplit);
  const bool in_hint =
      image_hint >= 0 && it.tile >= tables.col_tile_off[image_hint] && it.tile < tables.col_tile_off[image_hint + 1];
  it.image = in_hint ? image_hint : find_segment(tables.col_tile_off, p.num_images, it.tile);
  it.img = tables.images + it.image * kImageFields;
  it.col_tile = static_cast<int>(it.tile - tables.col_tile_off[it.image]);
  it.counted = tables.text_counted[it.image];
  const int64_t row_tiles = ceil_div(p.group * it.img[kTextLen], kTileRows);
  const int64_t per_range = p.rsplit == 1 ? row_tiles : ceil_div(row_tiles, p.rsplit);
  it.row_begin = static_cast<int>(it.range * per_range);
  it.row_end = static_cast<int>(min(row_tiles, it.row_begin + per_range));
  return it;
}

// The item a column_mass_kernel block takes after `item`: runs of p.column_run consecutive items,
// gridDim.x runs apart.
__device__ __forceinline__ int64_t next_column_item(const Params& p, int64_t item) {
  const int64_t run = p.column_run;
  return run == 1 || (item + 1) % run == 0 ? item + (static_cast<int64_t>(gridDim.x) - 1) * run + 1 : item + 1;
}

// Setup of row tile `row_tile` of an item (its rows with `rows`, its column tile into entry `slot`
// with `cols`), and with `rows` each row's (max, 1 / sum) in row_max / row_inv_sum: thread `local`
// < kTileRows combines the statistics of row `local` (a masked row's are (-inf, 0)), its nsplit <=
// kSplitsInFlight column ranges' loaded together with the tile setup's mask and size (one round
// trip) and combined in split order, or loads the pair row_finals_kernel combined.
__device__ __forceinline__ void setup_mass_tile(const Params& p, TileSmem& sm, const ColumnTables& tables,
                                                const ColumnItem& it, int64_t row_tile, bool rows, bool cols,
                                                int slot, float* row_max, float* row_inv_sum, int row_set = 0) {
  const int local = threadIdx.x;
  if (local >= kTileRows) return;
  const int64_t tl = it.img[kTextLen];
  const int64_t r = row_tile * kTileRows + local;
  bool combines = rows && r < p.group * tl;
  const bool from_finals = p.finals != nullptr;
  const int64_t per_row = from_finals ? 1 : p.nsplit;
  const float2* st = from_finals ? p.finals : p.stats;
  if (combines) {
    const int64_t text_row = tables.text_off[it.image] + r % tl;
    combines = text_row < p.text_capacity;  // else the statistics of no split: (-inf, 0)
    st += combines ? (text_row * p.H_q + it.hk * p.group + r / tl) * per_row : 0;
  }
  const TileSetup setup = load_tile_setup(p, it.img, it.hk, row_tile, rows, it.col_tile, cols);
  float2 pair[kSplitsInFlight];
  load_row_pairs(st, combines ? static_cast<int>(per_row) : 0, pair);  // at most kSplitsInFlight
  store_tile_setup(sm, setup, slot, row_set);
  if (rows) {
    const float2 row = from_finals ? pair[0] : row_max_and_inverse_sum(pair);  // (-inf, 0) past the rows
    row_max[local] = row.x;
    row_inv_sum[local] = row.y;
  }
}

// column_sum += a tile's probabilities (acc: dot products, before scale and bias), summed over the
// thread's rows: 2^(l - max) / sum, computed as 2^(l - max + 24) * (2^-24 / sum). exp2_ftz keeps
// its results from 2^-126 on, so shifted by 24 the terms keep exp2f's range down to 2^-150 (the
// float subnormals: a column whose every term is tiny keeps its mass), and the 2^-24 folds into
// the row's factor: four instructions per term where seven took exp2f, a product and a sum. The
// shifted exponent of a large term rounds to 2^-20, so terms are within about 1e-6 (relative) of
// exp2f's, where the float32 logits themselves are within 2^-24 of their own magnitude.
template <typename L>
__device__ __forceinline__ void add_tile_to_column_sums(float scale_log2, const float (&acc)[L::kRows][L::kCols],
                                                        const float* bias, const float* row_max,
                                                        const float* row_inv_sum, float (&column_sum)[L::kCols]) {
#pragma unroll
  for (int i = 0; i < L::kRows; ++i) {
    // A row that counts nothing (inverse sum 0) adds 2^(l - inf) * 0 = +0, as does a column past
    // the image (l = -inf): every column's sum stays exactly that of the counted terms.
    const float inv_sum = row_inv_sum[L::row(i)];
    const float shift = inv_sum == 0.f ? INFINITY : row_max[L::row(i)] - kMassShift;
    const float factor = inv_sum * kMassUnshift;  // normal: a sum of at most 2^31 terms of at most 1
#pragma unroll
    for (int j = 0; j < L::kCols; ++j) {
      column_sum[j] = fmaf(exp2_ftz(fmaf(scale_log2, acc[i][j], bias[L::col(j)]) - shift), factor, column_sum[j]);
    }
  }
}

// The item's partial column sums, thread c < kTileCols writing column c's; the last of the column
// tile's H_kv * rsplit items to finish (a ticket) writes its columns' importance, the partials
// summed in (hk, range) order.
template <typename L>
__device__ __forceinline__ void finish_column_item(const Params& p, const ColumnItem& it,
                                                   float (&column_sum)[L::kCols],
                                                   float (&column_part)[L::kThreads / 32][kTileCols]) {
  const float part_sum = column_total<L>(column_sum, column_part);
  const int local = threadIdx.x;
  const bool live = local < min(int64_t{kTileCols}, it.img[kVisLen] - it.col_tile * kTileCols);
  const int64_t token = it.img[kRow] * p.L + it.img[kVisStart] + it.col_tile * kTileCols + local;
  if (live) p.partial[(it.hk * p.rsplit + it.range) * p.tokens + token] = part_sum;
  const int64_t parts = p.H_kv * p.rsplit;
  if (!detail::last_to_arrive(&p.tickets[it.tile], static_cast<unsigned int>(parts))) return;
  if (live) {
    const float total = detail::ordered_sum<kPartsInFlight>(p.partial + token, p.tokens, parts);  // in part order
    p.importance[token] = total / static_cast<float>(p.H_q * it.counted);
  }
}

// Importance 1 / (the image's vision tokens) for an item whose image counts no text token, written
// by one item per column tile.
__device__ __forceinline__ void write_uniform_item(const Params& p, const ColumnItem& it) {
  if (it.hk == 0 && it.range == 0) write_uniform_importance(p, it.img, it.col_tile);
}

// column_mass_kernel's walk through tile_dot, for every type and head size.
template <typename T>
__device__ __forceinline__ void column_mass_tiled(const Params& p, const ColumnTables& tables, int64_t tiles,
                                                  int64_t items, TileSmem& sm, float* row_max, float* row_inv_sum,
                                                  float (&column_part)[TileLayout<T>::kThreads / 32][kTileCols]) {
  using L = TileLayout<T>;
  RowsHeld staged;
  for (int64_t item = blockIdx.x * p.column_run; item < items; item = next_column_item(p, item)) {
    const ColumnItem it = column_item(p, tables, tiles, item, staged.image);
    if (it.counted == 0) {  // no text to attend (uniform per block)
      write_uniform_item(p, it);
      continue;
    }
    __syncthreads();  // the previous item is done with the shared column data
    float column_sum[L::kCols] = {};
    for (int row_tile = it.row_begin; row_tile < it.row_end; ++row_tile) {
      const bool rows_staged = staged.are(it, row_tile);
      staged.set(it, row_tile);
      setup_mass_tile(p, sm, tables, it, row_tile, /*rows=*/!rows_staged, /*cols=*/row_tile == it.row_begin, kKeySlot,
                      row_max, row_inv_sum);
      // tile_dot's first barrier publishes the setup and row_max / row_inv_sum.
      float acc[L::kRows][L::kCols];
      tile_dot<T>(p, sm, rows_staged, /*cols_staged=*/row_tile > it.row_begin, acc);
      add_tile_to_column_sums<L>(p.scale_log2, acc, sm.bias[kKeySlot], row_max, row_inv_sum, column_sum);
      __syncthreads();  // rows of this tile are read before the next setup
    }
    finish_column_item<L>(p, it, column_sum, column_part);
  }
}

// Row statistics column_mass_kernel keeps: of the row tile multiplied and the two set up ahead.
constexpr int kMassRowSets = 3;

// column_mass_kernel's walk on tensor cores with the whole head in one staging step
// (whole_head_on_tensor_cores): the queries are kept in registers, and the loads run ahead of the
// products. Step s of an item sets up row tile s + 2 (its mask and row statistics), stages row
// tile s + 1's queries in the slot other than the keys', and multiplies row tile s: the setup's
// loads and the queries' copies are in flight together, the copies also while row tile s is
// multiplied. (The queries' row data is kept for one row tile, the row statistics for
// kMassRowSets.) During an item's last row tile the next item's keys (and sizes) are in flight to
// the other slot instead. Where an item is the single row tile of the item before (LLaVA-1.5: all
// items of a run within an image), its walk is that product alone. Same products, order and sums
// as column_mass_tiled: the same bits.
template <typename T>
__device__ __forceinline__ void column_mass_pipelined(const Params& p, const ColumnTables& tables, int64_t tiles,
                                                      int64_t items, TileSmem& sm,
                                                      float (&row_max)[kMassRowSets][kTileRows],
                                                      float (&row_inv_sum)[kMassRowSets][kTileRows],
                                                      float (&column_part)[TileLayout<T>::kThreads / 32][kTileCols]) {
  if constexpr (sizeof(T) == 2) {
    using L = TileLayout<T>;
    uint32_t query[kMmaSteps][4];
    RowsHeld in_query;  // whose rows `query` holds (their statistics: set in_query.row_tile % kMassRowSets)
    int slot = kKeySlot;    // the slot of this item's keys
    int64_t keys_item = -1;  // the item whose keys and column data are in (or in flight to) that slot
    for (int64_t item = blockIdx.x * p.column_run; item < items; item = next_column_item(p, item)) {
      const ColumnItem it = column_item(p, tables, tiles, item, in_query.image);
      if (it.counted == 0) {  // no text to attend (uniform per block)
        write_uniform_item(p, it);
        continue;
      }
      __syncthreads();  // the previous item is done with the shared column data
      float column_sum[L::kCols] = {};
      const bool keys_staged = keys_item == item;
      const bool rows_held = keys_staged && it.row_end == it.row_begin + 1 && in_query.are(it, it.row_begin);
      bool prefetched = false;
      for (int step = rows_held ? it.row_begin : it.row_begin - 2; step < it.row_end; ++step) {  // uniform
        const int setup_tile = step + 2, query_tile = step + 1;
        const bool sets_up = setup_tile >= it.row_begin && setup_tile < it.row_end;
        const bool stages_queries = query_tile >= it.row_begin && query_tile < it.row_end;
        const bool multiplies = step >= it.row_begin;
        TileSetup next{};
        int64_t next_item = -1;
        if (stages_queries) {
          stage_queries<L>(p, sm, 0, sm.mma.staged[slot ^ 1], query_tile % 2);
          if (query_tile == it.row_begin && !keys_staged) {
            stage_keys<L>(p, sm.k_first[slot], sm.cols[slot], 0, sm.mma.staged[slot]);
          }
        } else if (query_tile == it.row_end) {  // the next item's keys and sizes (an item with rows to multiply)
          const int64_t candidate = next_column_item(p, item);
          if (candidate < items) {
            const ColumnItem n = column_item(p, tables, tiles, candidate, it.image);
            if (n.counted > 0 && n.row_begin < n.row_end) {
              next_item = candidate;
              next = load_tile_setup(p, n.img, n.hk, 0, /*rows=*/false, n.col_tile, /*cols=*/true);
              stage_keys<L>(p, next.k_first, next.col_count, 0, sm.mma.staged[slot ^ 1]);
            }
          }
        }
        detail::close_async_copy_group();
        if (sets_up) {  // its loads in flight with the copies; the queries' row data of set setup_tile % 2
          setup_mass_tile(p, sm, tables, it, setup_tile, /*rows=*/true, /*cols=*/setup_tile == it.row_begin && !keys_staged,
                          slot, row_max[setup_tile % kMassRowSets], row_inv_sum[setup_tile % kMassRowSets],
                          setup_tile % 2);
        }
        if (rows_held) {
          detail::wait_async_copy_groups_but_newest<1>();  // this item's keys, prefetched by the item before
          __syncthreads();                                  // everybody's
        }
        if (multiplies) {
          float acc[L::kRows][L::kCols];
          multiply_keys<T>(query, sm.mma.staged[slot], p.D, acc);
          add_tile_to_column_sums<L>(p.scale_log2, acc, sm.bias[slot], row_max[step % kMassRowSets],
                                     row_inv_sum[step % kMassRowSets], column_sum);
        }
        if (next_item >= 0) {
          if (threadIdx.x < kTileRows) store_tile_setup(sm, next, slot ^ 1);
          keys_item = next_item;
          prefetched = true;
        }
        if (query_tile < it.row_end) {
          detail::wait_async_copies();
          __syncthreads();  // row tile s + 1's queries (and keys) and s + 2's setup are visible
          if (stages_queries) {
            load_query_fragments(p, sm.mma.staged[slot ^ 1], query);
            in_query.set(it, query_tile);
            __syncthreads();  // every warp is done reading slot ^ 1
          }
        }
      }
      finish_column_item<L>(p, it, column_sum, column_part);
      if (prefetched) slot ^= 1;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(TileLayout<T>::kThreads, TileLayout<T>::kPassBlocksPerSm)
    column_mass_kernel(const Params p) {
  detail::await_previous_kernel();
  using L = TileLayout<T>;
  __shared__ TileSmem sm;
  __shared__ float row_max[kMassRowSets][kTileRows];
  __shared__ float row_inv_sum[kMassRowSets][kTileRows];
  __shared__ float column_part[L::kThreads / 32][kTileCols];  // per warp
  __shared__ int64_t fused_images[kFusedImages * kImageFields];
  __shared__ int64_t fused_counted[kFusedImages];
  __shared__ int64_t fused_offsets[2][kFusedImages + 1];  // column tiles, text rows
  ColumnTables tables{p.images, p.text_counted, offsets_of(p, kColTiles), offsets_of(p, kTextRows)};
  if (p.fused_tables) {  // uniform: few images, whose tables are copied to shared memory in one round trip
    for (int64_t i = threadIdx.x; i < p.num_images * kImageFields; i += L::kThreads) fused_images[i] = tables.images[i];
    if (threadIdx.x < p.num_images) fused_counted[threadIdx.x] = tables.text_counted[threadIdx.x];
    if (threadIdx.x <= p.num_images) {
      fused_offsets[0][threadIdx.x] = tables.col_tile_off[threadIdx.x];
      fused_offsets[1][threadIdx.x] = tables.text_off[threadIdx.x];
    }
    __syncthreads();
    tables = ColumnTables{fused_images, fused_counted, fused_offsets[0], fused_offsets[1]};
  }
  // Disjoint images have at most ticket_count column tiles; overlapping ones (the contract forbids
  // them, but only the CPU op can check a device table without a sync) must not index past it.
  const int64_t tiles = min(tables.col_tile_off[p.num_images], p.ticket_count);
  const int64_t items = tiles * p.H_kv * p.rsplit;
  // Each block takes runs of column_run consecutive items (column tiles innermost), so that an
  // item whose range is the single row tile of the item before (LLaVA-1.5: every item of a run
  // within an image) finds that tile's queries and row stats still staged.
  if (whole_head_on_tensor_cores<T>(p)) {
    column_mass_pipelined<T>(p, tables, tiles, items, sm, row_max, row_inv_sum, column_part);
  } else {
    column_mass_tiled<T>(p, tables, tiles, items, sm, row_max[0], row_inv_sum[0], column_part);
  }
}

// Both passes in one, in thread block clusters: a cluster per group (image, KV head, row tile),
// its blocks the image's column tiles (block `rank` of C takes tiles rank, rank + C, at most
// kTiles of them). A block computes the logits of its tiles once and keeps them in
// registers as 2^(l - m) (times 2^kMassShift), m the tile's row maximum; it combines its tiles'
// (m, sum) per row and leaves them in its shared memory. After a cluster barrier every block combines the cluster's
// pairs of each row, in rank order (so all blocks get the same bits), from the other blocks'
// shared memory; its column masses are then its values times 2^(m - max) / sum, summed over its
// rows as in column_mass_kernel, and the last of a column tile's H_kv * row tiles items sums
// their partials into the importance. The blocks a block waits for run beside it (a cluster is
// resident at once) and do the same work at the same time, and the hand-off is one barrier and a
// read of the peers' shared memory: no round trip through global memory, no second launch.
// image_offsets_kernel runs first (it also zeroes the importance and the tickets).
template <typename T, int kTiles>
__global__ void __launch_bounds__(TileLayout<T>::kThreads, TileLayout<T>::kOnePassBlocksPerSm[kTiles - 1])
    one_pass_kernel(const Params p) {
  detail::await_previous_kernel();
  using L = TileLayout<T>;
  __shared__ TileSmem sm;
  __shared__ float2 block_rows[kTileRows];  // (max, sum of 2^(l - max)) over this block's tiles, per row
  __shared__ float2 final_rows[kTileRows];  // (max, 1 / sum) over the cluster's tiles, per row
  __shared__ float column_part[L::kThreads / 32][kTileCols];  // per warp
  const int64_t* group_off = offsets_of(p, kGroups);
  const int64_t* col_tile_off = offsets_of(p, kColTiles);
  // More column tiles than disjoint images can have: overlapping images, which the contract
  // forbids (only the CPU op can check a device table without a sync). Nothing is scored then.
  if (col_tile_off[p.num_images] > p.ticket_count) return;
  const int64_t cluster = p.cluster_blocks, rank = blockIdx.x % cluster;
  const int64_t groups = p.H_kv * group_off[p.num_images];
  // Uniform over a cluster: its blocks walk the same groups, so every barrier has all of them.
  for (int64_t g = blockIdx.x / cluster; g < groups; g += gridDim.x / cluster) {
    const int64_t image = find_segment(group_off, p.num_images, g / p.H_kv);
    const int64_t* img = p.images + image * kImageFields;
    const int64_t hk = g % p.H_kv, row_tile = g / p.H_kv - group_off[image];
    // At most cluster * kTiles, as make_plan sizes the cluster from the row length.
    const int64_t col_tiles = ceil_div(img[kVisLen], kTileCols);
    const int64_t counted = p.text_counted[image];
    if (counted == 0) {  // no text to attend (uniform over the cluster): uniform importance
      if (hk == 0 && row_tile == 0) {
        for (int64_t col_tile = rank; col_tile < col_tiles; col_tile += cluster) {
          write_uniform_importance(p, img, col_tile);
        }
      }
      continue;
    }
    __syncthreads();  // the previous group is done with the shared row and column data
    setup_tile(p, sm, img, hk, row_tile, /*rows=*/true, rank, /*cols=*/rank < col_tiles);
    __syncthreads();  // row_ok is read below even by a block without a column tile
    float value[kTiles][L::kRows][L::kCols];  // the logits, then 2^(l - tile_max)
    float tile_max[kTiles][L::kRows];
    float run_max[L::kRows], run_sum[L::kRows];
#pragma unroll
    for (int i = 0; i < L::kRows; ++i) {
      run_max[i] = -INFINITY;
      run_sum[i] = 0.f;
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const int64_t col_tile = rank + t * cluster;
      if (col_tile >= col_tiles) break;  // uniform over the block
      if (t > 0) {
        __syncthreads();  // the previous tile's columns are read
        setup_tile(p, sm, img, hk, row_tile, /*rows=*/false, col_tile, /*cols=*/true);
      }
      tile_dot<T>(p, sm, /*rows_staged=*/t > 0, /*cols_staged=*/false, value[t]);  // publishes the setup first
#pragma unroll
      for (int i = 0; i < L::kRows; ++i) {
        float row_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < L::kCols; ++j) {
          value[t][i][j] = fmaf(p.scale_log2, value[t][i][j], sm.bias[kKeySlot][L::col(j)]);  // -inf past the image's columns
          row_max = fmaxf(row_max, value[t][i][j]);
        }
        tile_max[t][i] = max_over_row_lanes<L>(row_max);
        // Values and sums 2^kMassShift times 2^(l - m), as in add_tile_to_column_sums: exp2_ftz
        // keeps them down to 2^-150 relative to m; the scale cancels in the column masses (the
        // row's 1 / sum carries 2^-kMassShift). A row of no finite logit: 2^-inf = 0.
        const float shift = tile_max[t][i] == -INFINITY ? INFINITY : tile_max[t][i] - kMassShift;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < L::kCols; ++j) {
          value[t][i][j] = exp2_ftz(value[t][i][j] - shift);
          sum += value[t][i][j];
        }
        sum = sum_over_row_lanes<L>(sum);
        const float new_max = fmaxf(run_max[i], tile_max[t][i]);
        if (new_max != -INFINITY) {
          run_sum[i] = run_sum[i] * exp2f(run_max[i] - new_max) + sum * exp2f(tile_max[t][i] - new_max);
          run_max[i] = new_max;
        }
      }
    }
    if (threadIdx.x % L::kRowLanes == 0) {
#pragma unroll
      for (int i = 0; i < L::kRows; ++i) {
        const int row = L::row(i);
        block_rows[row] = sm.row_ok[0][row] ? make_float2(run_max[i], run_sum[i]) : make_float2(-INFINITY, 0.f);
      }
    }
    detail::cluster_sync();  // every block's rows are written
    if (threadIdx.x < kTileRows) {  // thread r combines row r over the cluster's blocks, in rank order
      float2 pair[kMaxClusterBlocks];
#pragma unroll
      for (int b = 0; b < kMaxClusterBlocks; ++b) {
        pair[b] = b < cluster ? detail::cluster_peer(block_rows, b)[threadIdx.x] : make_float2(-INFINITY, 0.f);
      }
      final_rows[threadIdx.x] = row_max_and_inverse_sum(pair);
    }
    detail::cluster_arrive();  // done reading the other blocks' rows (they may go on to the next group)
    __syncthreads();           // final_rows is written

#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const int64_t col_tile = rank + t * cluster;
      if (col_tile >= col_tiles) break;  // uniform over the block
      float column_sum[L::kCols] = {};
#pragma unroll
      for (int i = 0; i < L::kRows; ++i) {
        const float2 row = final_rows[L::row(i)];
        // 0 for a row that counts nothing (masked, past the text, or all logits -inf).
        const float factor = row.y > 0.f ? exp2f(tile_max[t][i] - row.x) * row.y : 0.f;
#pragma unroll
        for (int j = 0; j < L::kCols; ++j) column_sum[j] = fmaf(value[t][i][j], factor, column_sum[j]);
      }
      const float part_sum = column_total<L>(column_sum, column_part);
      const int col = threadIdx.x;
      const int64_t tile_cols = min(int64_t{kTileCols}, img[kVisLen] - col_tile * kTileCols);
      const bool live = col < tile_cols;
      const int64_t token = img[kRow] * p.L + img[kVisStart] + col_tile * kTileCols + col;
      // Part hk * row tiles + row_tile of the image's H_kv * row tiles, summed in that order.
      const int64_t row_tiles = ceil_div(p.group * img[kTextLen], kTileRows);
      const int64_t parts = p.H_kv * row_tiles;
      if (live) p.partial[(hk * row_tiles + row_tile) * p.tokens + token] = part_sum;
      if (!detail::last_to_arrive(&p.tickets[col_tile_off[image] + col_tile], static_cast<unsigned int>(parts))) {
        continue;
      }
      if (live) {
        const float total = detail::ordered_sum<kPartsInFlight>(p.partial + token, p.tokens, parts);
        p.importance[token] = total / static_cast<float>(p.H_q * counted);
      }
    }
    detail::cluster_wait();  // no block reads this block's rows any more
  }
}

struct Plan {
  int64_t B, H_kv, L, S, D, H_q, group, num_images, nsplit, rsplit, tokens;
  int64_t column_run;  // column_mass_kernel's consecutive items per block
  // one_pass_kernel, when it applies: column tiles per block, blocks per cluster and the grid (0:
  // the two passes run instead), and a bound on the row tiles of an image
  int64_t tiles_per_block, cluster_blocks, one_pass_grid, row_tile_capacity;
  bool finals;  // row_finals_kernel runs between the passes
};

// 16-byte staging loads (16-bit types only) need contiguous head dims, a multiple of 8 of them,
// with every row of k and text starting 16-byte aligned.
bool vector_staging(const ScoreArgs& a) {
  return sixteen_bit(a.k.dtype) && a.k.size[3] % 8 == 0 && detail::rows_16_byte_aligned(a.k.data, a.k.stride, 8) &&
         detail::rows_16_byte_aligned(a.text.data, a.text.stride, 8);
}

// Upper bound on the column tiles of all images: each image adds at most one partial tile, and
// has at most the tiles of a whole row (dense batches: exact).
int64_t column_tile_bound(const Plan& plan) {
  return std::min(ceil_div(plan.tokens, kTileCols) + plan.num_images, plan.num_images * ceil_div(plan.L, kTileCols));
}

// Upper bound on column_mass_kernel's items.
int64_t column_items(const Plan& plan) { return column_tile_bound(plan) * plan.H_kv * plan.rsplit; }

// Consecutive items per column_mass_kernel block: one while that makes at most kColumnBlocks
// blocks, else of the runs up to twice the shortest such, the shortest whose blocks take the fewest
// run lengths of whole waves (detail::kWaveSms SMs, `blocks_per_sm`): an item is a chain of round
// trips, so a wave's last blocks take as long as a full wave's (LLaVA-1.5 batch 32: 9216 items,
// runs of 5 in 1844 blocks are 3.5 waves of 528 and take 4 x 5 item times, runs of 6 take 3 x 6).
// Which block takes an item never changes a sum.
int64_t column_run(int64_t items, int64_t blocks_per_sm) {
  const int64_t wave = detail::kWaveSms * blocks_per_sm;
  const int64_t shortest = std::max<int64_t>(1, ceil_div(items, kColumnBlocks));
  if (shortest == 1) return 1;
  const auto cost = [&](int64_t run) { return ceil_div(ceil_div(items, run), wave) * run; };
  int64_t best = shortest;
  // The cheapest run of each wave count is the shortest that fits in it: fewer waves, longer runs.
  for (int64_t waves = ceil_div(ceil_div(items, shortest), wave) - 1; waves >= 1; --waves) {
    const int64_t run = ceil_div(items, waves * wave);
    if (run > 2 * shortest) break;
    if (cost(run) < cost(best)) best = run;
  }
  return best;
}

// Upper bound on the row tiles of all images, from shapes alone (the image table is on the
// device): each image has at most the tiles of all S text tokens, and together at most one
// partial tile each beyond those of the text_capacity bound.
int64_t row_tile_bound(const Plan& plan, const ScoreArgs& a) {
  if (plan.num_images == 0) return 0;
  return std::min(plan.num_images * ceil_div(plan.group * plan.S, kTileRows),
                  ceil_div(plan.group * a.text_capacity, kTileRows) + plan.num_images - 1);
}

// Whether the current device runs one_pass_kernel<T, tiles> in clusters of `cluster_blocks`,
// asked once per device, tiles and size.
template <typename T>
bool one_pass_fits(int64_t tiles, int64_t cluster_blocks) {
  // 0: not asked, 1: no, 2: yes
  static std::atomic<int> known[detail::kCachedDevices][kOnePassTiles + 1][kMaxClusterBlocks + 1];
  int device = -1;
  if (!detail::answer_quietly([&] { return cudaGetDevice(&device) == cudaSuccess; }) || device < 0 ||
      device >= detail::kCachedDevices || tiles < 1 || tiles > kOnePassTiles || cluster_blocks < 1 ||
      cluster_blocks > kMaxClusterBlocks) {
    return false;
  }
  std::atomic<int>& answer = known[device][tiles][cluster_blocks];
  if (answer.load(std::memory_order_relaxed) == 0) {
    const auto size = static_cast<unsigned int>(cluster_blocks);
    const bool fits = tiles == 1 ? detail::clusters_fit(one_pass_kernel<T, 1>, TileLayout<T>::kThreads, size)
                                 : detail::clusters_fit(one_pass_kernel<T, 2>, TileLayout<T>::kThreads, size);
    answer.store(fits ? 2 : 1, std::memory_order_relaxed);
  }
  return answer.load(std::memory_order_relaxed) == 2;
}

bool one_pass_fits(DType dtype, int64_t tiles, int64_t cluster_blocks) {  // the same for the element type `dtype`
  switch (dtype) {
    case DType::Float32:
      return one_pass_fits<float>(tiles, cluster_blocks);
    case DType::Float16:
      return one_pass_fits<__half>(tiles, cluster_blocks);
    case DType::BFloat16:
      return one_pass_fits<__nv_bfloat16>(tiles, cluster_blocks);
    default:
      return false;
  }
}

// Which scoring runs where one_pass_kernel applies: LIGHTKV_SCORE_PASSES=1 forces the one pass,
// =2 the two passes; by default the one pass runs where its clusters are blocks of one column tile
// of a 16-bit type that all fit one wave (kOnePassWaveBlocks). Timed on an H200 from a CUDA graph
// (README): LLaVA-1.5 batch 1 (576 blocks) 50.4 -> 41.8 us; slower for blocks of 2 tiles
// (Qwen2.5-VL batch 1: 64.1 -> 70.1 us) and for grids of several waves (the 16-frame video pack,
// 2048 blocks: 85 -> 114 us), no faster at LLaVA-1.5 batch 32.
enum class ScorePasses { kByShape, kOne, kTwo };
// One wave of one_pass_kernel's 16-bit blocks of one column tile on a GPU of detail::kWaveSms SMs:
// the largest grid that takes the one pass by default.
constexpr int64_t kOnePassWaveBlocks = detail::kWaveSms * TileLayout<__nv_bfloat16>::kOnePassBlocksPerSm[0];
ScorePasses score_passes_knob() {
  if (knob_is("LIGHTKV_SCORE_PASSES", "1")) return ScorePasses::kOne;
  if (knob_is("LIGHTKV_SCORE_PASSES", "2")) return ScorePasses::kTwo;
  return ScorePasses::kByShape;
}

Plan make_plan(const ScoreArgs& a) {
  Plan plan{};
  plan.B = a.k.size[0];
  plan.H_kv = a.k.size[1];
  plan.L = a.k.size[2];
  plan.D = a.k.size[3];
  plan.H_q = a.text.size[1];
  plan.S = a.text.size[2];
  plan.group = plan.H_kv > 0 ? plan.H_q / plan.H_kv : 1;
  plan.num_images = a.num_images;
  plan.tokens = plan.B * plan.L;
  // Split the vision tokens (pass 1) or the text rows (pass 2) when there are too few tiles to
  // fill the GPU. Pass 1: items toward kTargetBlocks, in at most kSplitsInFlight column ranges.
  // Pass 2: as many row ranges as one wave of blocks holds, down to a row tile each (at batch 1
  // every item is one block's whole chain of round trips, and a range of one row tile is the
  // shortest).
  const int64_t row_tiles = std::max<int64_t>(1, row_tile_bound(plan, a));
  const int64_t column_tile_items = column_tile_bound(plan) * std::max<int64_t>(plan.H_kv, 1);
  // column_mass_kernel's blocks in one wave (for every dtype; see kPlannedColumnBlocksPerSm).
  const int64_t column_wave = detail::kWaveSms * kPlannedColumnBlocksPerSm;
  plan.nsplit = std::max<int64_t>(1, std::min({ceil_div(kTargetBlocks, row_tiles * std::max<int64_t>(plan.H_kv, 1)),
                                               ceil_div(std::max<int64_t>(plan.L, 1), kTileCols),
                                               int64_t{kSplitsInFlight}}));
  plan.rsplit = std::max<int64_t>(1, std::min({column_wave / column_tile_items,
                                               ceil_div(std::max<int64_t>(plan.group * plan.S, 1), kTileRows),
                                               kMaxRowRanges}));
  plan.column_run = column_run(column_items(plan), sixteen_bit(a.k.dtype) ? TileLayout<__half>::kPassBlocksPerSm
                                                                          : TileLayout<float>::kPassBlocksPerSm);
  // One pass: a cluster covers the column tiles of a whole row (an image's are at most those),
  // kOnePassTiles per block at most; partial keeps an image's row tiles apart.
  plan.row_tile_capacity = std::max<int64_t>(1, ceil_div(plan.group * plan.S, kTileRows));
  const int64_t row_col_tiles = std::max<int64_t>(1, ceil_div(plan.L, kTileCols));
  const int64_t tiles_per_block = ceil_div(row_col_tiles, kMaxClusterBlocks);
  const ScorePasses passes = score_passes_knob();
  if (passes != ScorePasses::kTwo && plan.row_tile_capacity <= kOnePassRowTiles && tiles_per_block <= kOnePassTiles) {
    const int64_t cluster = ceil_div(row_col_tiles, tiles_per_block);
    // Groups: KV heads times at most one row tile more per image than the row tiles.
    const int64_t groups = plan.H_kv * (row_tile_bound(plan, a) + plan.num_images);
    const int64_t grid = cluster * std::max<int64_t>(1, std::min(groups, kMaxGrid / cluster));
    const bool by_shape = sixteen_bit(a.k.dtype) && tiles_per_block == 1 && grid <= kOnePassWaveBlocks;
    if ((passes == ScorePasses::kOne || by_shape) && one_pass_fits(a.k.dtype, tiles_per_block, cluster)) {
      plan.tiles_per_block = tiles_per_block;
      plan.cluster_blocks = cluster;
      plan.one_pass_grid = grid;
    }
  }
  // Two passes whose column ranges make many pairs per row, and whose row ranges can hold several
  // row tiles: column_mass_kernel would combine a row's pairs once per column tile.
  plan.finals = plan.one_pass_grid == 0 && plan.nsplit >= kFinalMinSplits &&
                ceil_div(plan.row_tile_capacity, plan.rsplit) > 1;
  return plan;
}

struct Workspace {
  unsigned int* tickets;
  int64_t* images;
  int64_t* offsets;
  int64_t* text_counted;
  float2* stats;
  float2* finals;
  float* partial;
  size_t bytes;
};

Workspace carve(const ScoreArgs& a, const Plan& plan, void* base) {
  detail::WorkspaceCarver carver(base);
  Workspace ws{};
  const bool one_pass = plan.one_pass_grid > 0;
  ws.images = carver.take<int64_t>(plan.num_images * kImageFields);
  ws.offsets = carver.take<int64_t>((plan.num_images + 1) * kCountArrays);
  ws.text_counted = carver.take<int64_t>(plan.num_images);
  ws.stats = carver.take<float2>(one_pass ? 0 : a.text_capacity * plan.H_q * plan.nsplit);
  ws.finals = carver.take<float2>(plan.finals ? a.text_capacity * plan.H_q : 0);
  ws.partial = carver.take<float>(plan.H_kv * (one_pass ? plan.row_tile_capacity : plan.rsplit) * plan.tokens);
  ws.tickets = carver.take<unsigned int>(column_tile_bound(plan));
  ws.bytes = carver.bytes();
  return ws;
}

template <typename T>
cudaError_t launch_passes(const Params& p, const Plan& plan, const ScoreArgs& a, const detail::KernelLauncher& launch) {
  if (plan.one_pass_grid > 0) {
    const auto grid = static_cast<unsigned int>(plan.one_pass_grid);
    const auto cluster = static_cast<unsigned int>(plan.cluster_blocks);
    return plan.tiles_per_block == 1
               ? launch.cluster(one_pass_kernel<T, 1>, grid, TileLayout<T>::kThreads, cluster, p)
               : launch.cluster(one_pass_kernel<T, 2>, grid, TileLayout<T>::kThreads, cluster, p);
  }
  const int64_t row_items = row_tile_bound(plan, a) * plan.H_kv * plan.nsplit;
  LIGHTKV_RETURN_IF_ERROR(
      launch(row_stats_kernel<T>, detail::grid_for(row_items, kMaxGrid), TileLayout<T>::kThreads, p));
  if (plan.finals) {
    const int64_t blocks = ceil_div(a.text_capacity * plan.H_q, int64_t{kFinalThreads});
    LIGHTKV_RETURN_IF_ERROR(launch(row_finals_kernel, detail::grid_for(blocks, kMaxGrid), kFinalThreads, p));
  }
  return launch(column_mass_kernel<T>, detail::grid_for(ceil_div(column_items(plan), plan.column_run), kMaxGrid),
                TileLayout<T>::kThreads, p);
}

}  // namespace

size_t score_workspace_size(const ScoreArgs& args) {
  const Plan plan = make_plan(args);
  return carve(args, plan, nullptr).bytes;
}

cudaError_t launch_score(const ScoreArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const Plan plan = make_plan(a);
  if (a.k.dtype != a.text.dtype || a.k.dtype == DType::Float64 ||
      plan.H_kv <= 0 || plan.H_q % plan.H_kv != 0 || a.text.size[0] != plan.B || a.text.size[3] != plan.D ||
      a.text_capacity < 0 || a.num_images < 0) {
    return cudaErrorInvalidValue;
  }
  if (plan.tokens == 0) return cudaSuccess;
  if (plan.num_images == 0) return cudaMemsetAsync(a.importance, 0, sizeof(float) * plan.tokens, stream);
  // Round the base up to 256 bytes; the size query includes that slack.
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(workspace) + 255) & ~static_cast<uintptr_t>(255);
  const Workspace ws = carve(a, plan, reinterpret_cast<void*>(aligned));
  if (workspace == nullptr || workspace_bytes < ws.bytes) return cudaErrorInvalidValue;

  detail::KernelLauncher launch;
  LIGHTKV_RETURN_IF_ERROR(detail::KernelLauncher::create(stream, image_offsets_kernel, &launch));
  const bool one_pass = plan.one_pass_grid > 0;
  // Up to kFusedImages images the two passes build the image tables themselves (row_stats_kernel
  // also zeroes the importance and the tickets).
  const bool fused_tables = !one_pass && plan.num_images <= kFusedImages;
  if (!fused_tables) {
    LIGHTKV_RETURN_IF_ERROR(launch(image_offsets_kernel, kCountArrays, kOffsetThreads, a.images, plan.num_images,
                                   plan.B, plan.L, plan.S, plan.group, a.text_mask, a.text_mask_stride[0],
                                   a.text_mask_stride[1], ws.images, ws.offsets, ws.text_counted, a.importance,
                                   one_pass ? plan.tokens : 0, ws.tickets, one_pass ? column_tile_bound(plan) : 0));
  }

  Params p{};
  p.k = a.k.data;
  p.text = a.text.data;
  for (int i = 0; i < 4; ++i) {
    p.k_stride[i] = a.k.stride[i];
    p.text_stride[i] = a.text.stride[i];
  }
  p.text_mask = a.text_mask;
  p.mask_stride[0] = a.text_mask_stride[0];
  p.mask_stride[1] = a.text_mask_stride[1];
  p.sizes = a.sizes;
  p.sizes_stride[0] = a.sizes_stride[0];
  p.sizes_stride[1] = a.sizes_stride[1];
  p.L = plan.L;
  p.S = plan.S;
  p.D = plan.D;
  p.H_kv = plan.H_kv;
  p.H_q = plan.H_q;
  p.group = plan.group;
  p.num_images = plan.num_images;
  p.scale_log2 = a.scale * 1.4426950408889634f;  // log2(e)
  p.raw_images = a.images;
  p.B = plan.B;
  p.fused_tables = fused_tables;
  p.images = ws.images;
  p.offsets = ws.offsets;
  p.text_counted = ws.text_counted;
  p.stats = ws.stats;
  p.text_capacity = a.text_capacity;
  p.nsplit = plan.nsplit;
  p.finals = plan.finals ? ws.finals : nullptr;
  p.partial = ws.partial;
  p.rsplit = plan.rsplit;
  p.column_run = plan.column_run;
  p.tickets = ws.tickets;
  p.ticket_count = column_tile_bound(plan);
  p.cluster_blocks = plan.cluster_blocks;
  p.tokens = plan.tokens;
  p.importance = a.importance;
  p.vector_stage = vector_staging(a);
  switch (a.k.dtype) {
    case DType::Float32:
      return launch_passes<float>(p, plan, a, launch);
    case DType::Float16:
      return launch_passes<__half>(p, plan, a, launch);
    case DType::BFloat16:
      return launch_passes<__nv_bfloat16>(p, plan, a, launch);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace lightkv_cuda
