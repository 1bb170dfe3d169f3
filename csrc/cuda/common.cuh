// Internal helpers shared by score.cu and merge.cu (not part of the public kernels.h).
#pragma once

#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels.h"

#ifndef LIGHTKV_CUDA_EMULATION
#include <cooperative_groups.h>
#endif

// Returns from the enclosing host function on the first CUDA error.
#define LIGHTKV_RETURN_IF_ERROR(expr)       \
  do {                                      \
    const cudaError_t lightkv_err_ = (expr); \
    if (lightkv_err_ != cudaSuccess) return lightkv_err_; \
  } while (0)

namespace lightkv_cuda {
namespace detail {

// SMs of the GPU whose waves work splits are fitted to (H100 SXM, H200): a constant, so that the
// splits, and with them the sums' order and rounding, do not depend on the device.
constexpr int64_t kWaveSms = 132;

// Element loads/stores through explicit intrinsics: PyTorch compiles .cu files with
// __CUDA_NO_HALF_CONVERSIONS__, so no implicit half <-> float conversions are used anywhere.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(float x) { return static_cast<double>(x); }
__device__ __forceinline__ double to_double(__half x) { return static_cast<double>(__half2float(x)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 x) {
  return static_cast<double>(__bfloat162float(x));
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Stores the 16 bytes `raw` as 16 / sizeof(S) elements at `to` (element-aligned only).
template <typename S>
__device__ __forceinline__ void store_16_bytes(const uint4& raw, S* to) {
  S values[16 / sizeof(S)];
  memcpy(values, &raw, sizeof(raw));
#pragma unroll
  for (int i = 0; i < static_cast<int>(16 / sizeof(S)); ++i) to[i] = values[i];
}

// The 16 bytes at `from` (global memory, 16-byte aligned), or zeros when not `live`.
__device__ __forceinline__ uint4 load_16_bytes(bool live, const void* from) {
  return live ? *reinterpret_cast<const uint4*>(from) : make_uint4(0, 0, 0, 0);
}

// Starts copying the 16 bytes at `from` (global memory) to `to` (shared memory), both 16-byte
// aligned, or writes zeros at `to` when not `live`. From sm_80 on the copy bypasses registers
// (cp.async) and the zeros come from the same instruction (source size 0), without a branch:
// `readable`, any 16-byte aligned address of the same buffer, stands in for `from` then, so no
// out-of-bounds address is ever formed into a load (nothing is read from it). Elsewhere it is a
// plain load and store (the CPU emulation delays it: see cuda_on_cpu.h). Visible to the calling
// thread after wait_async_copies().
template <typename E>
__device__ __forceinline__ void copy_16_bytes_async(void* to, const E* from, bool live, const E* readable) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned shared_address = static_cast<unsigned>(__cvta_generic_to_shared(to));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address), "l"(live ? from : readable),
               "r"(live ? 16 : 0)
               : "memory");
#elif defined(LIGHTKV_CUDA_EMULATION)
  emu::expect_aligned(readable, 16, "cp.async stand-in source");
  emu::copy_16_bytes_later(to, live ? static_cast<const void*>(from) : nullptr);
#else
  (void)readable;
  *reinterpret_cast<uint4*>(to) = load_16_bytes(live, from);
#endif
}

// Waits for this thread's copy_16_bytes_async copies (a barrier then shows them to the block).
__device__ __forceinline__ void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif defined(LIGHTKV_CUDA_EMULATION)
  emu::land_all_copies();
#endif
}

// Closes this thread's group of the copy_16_bytes_async copies started since the last group
// (an empty group where none were: a ring of stages counts one group per stage filled).
__device__ __forceinline__ void close_async_copy_group() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(LIGHTKV_CUDA_EMULATION)
  emu::close_copy_group();
#endif
}

// Waits for this thread's closed copy groups, all but the newest kNewest.
template <int kNewest>
__device__ __forceinline__ void wait_async_copy_groups_but_newest() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kNewest) : "memory");
#elif defined(LIGHTKV_CUDA_EMULATION)
  emu::land_copy_groups_but_newest(kNewest);
#endif
}

// Two consecutive 16-bit values (the lower index in the low half), 4-byte aligned.
__device__ __forceinline__ uint32_t load_pair(const uint16_t* at) { return *reinterpret_cast<const uint32_t*>(at); }

// Every lane's registers `values` in the calling warp: at(i, l) is lane l's values[i]. For the
// fallbacks of tensor-core instructions below: on a GPU each at() is a warp shuffle (all lanes
// reach it alike); the CPU emulation exchanges all the values at once, where each shuffle would
// cost it a barrier over the warp.
template <typename T, int N>
class WarpRegisters {
 public:
#if defined(LIGHTKV_CUDA_EMULATION)
  explicit WarpRegisters(const T (&values)[N]) : lanes_(emu::warp_gather(values)) {}
  T at(int i, int lane) const { return lanes_[lane][i]; }

 private:
  std::array<std::array<T, N>, 32> lanes_;
#else
  __device__ explicit WarpRegisters(const T (&values)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) values_[i] = values[i];
  }
  __device__ T at(int i, int lane) const { return __shfl_sync(0xffffffffu, values_[i], lane); }

 private:
  T values_[N];
#endif
};

// ldmatrix .x4: four 8 x 8 matrices of 16-bit values from shared memory, one warp-wide load. Lane
// 8 m + r gives the address of row r of matrix m (8 values, 16-byte aligned); lane l receives
// in r[m] the values 2 (l % 4), +1 of row l / 4 of matrix m (as load_pair). From sm_75 on one
// instruction; elsewhere (the CPU emulation) the same values gathered from the lanes' addresses.
__device__ __forceinline__ void load_matrix_x4(uint32_t (&r)[4], const uint16_t* row_address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const unsigned shared_address = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address));
#else
#if defined(LIGHTKV_CUDA_EMULATION)
  emu::expect_aligned(row_address, 16, "ldmatrix row");
#endif
  const int lane = threadIdx.x % 32;
  const unsigned long long address[1] = {reinterpret_cast<unsigned long long>(row_address)};
  const WarpRegisters<unsigned long long, 1> addresses(address);
  for (int m = 0; m < 4; ++m) {
    const unsigned long long row = addresses.at(0, 8 * m + lane / 4);
    r[m] = load_pair(reinterpret_cast<const uint16_t*>(row) + 2 * (lane % 4));
  }
#endif
}

__device__ __forceinline__ float bits_to_float(uint16_t bits, __nv_bfloat16) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  memcpy(&out, &wide, sizeof(out));
  return out;
}
__device__ __forceinline__ float bits_to_float(uint16_t bits, __half) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

// d += A B on one 16 x 8 x 16 tile: A 16 x 16 (row major), B 16 x 8 (column major) of M (bfloat16
// or float16) as raw bits, float32 accumulators; fragments as in the PTX ISA's "Matrix Fragments
// for mma.m16n8k16 with floating point type" (group = lane / 4, quad = lane % 4):
//   a[0]: A[group][2 quad, +1]  a[1]: A[group + 8][2 quad, +1]  a[2], a[3]: the same at k + 8
//   b[0]: B[2 quad, +1][group]  b[1]: the same at k + 8
//   d[0], d[1]: D[group][2 quad, +1]  d[2], d[3]: D[group + 8][2 quad, +1]
// Tensor cores from sm_80 on; elsewhere (older GPUs, the CPU emulation) the same products from
// the lanes' fragments (WarpRegisters).
template <typename M>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(M) == 2 && std::is_same<M, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
  const WarpRegisters<uint32_t, 4> a_of(a);
  const WarpRegisters<uint32_t, 2> b_of(b);
  for (int q = 0; q < 4; ++q) {  // the lanes holding k = 2 q, 2 q + 1, 2 q + 8, 2 q + 9
    uint32_t row[4], col0[2], col1[2];
    for (int i = 0; i < 4; ++i) row[i] = a_of.at(i, 4 * group + q);
    for (int i = 0; i < 2; ++i) {
      col0[i] = b_of.at(i, 4 * (2 * quad) + q);
      col1[i] = b_of.at(i, 4 * (2 * quad + 1) + q);
    }
    for (int half = 0; half < 2; ++half) {  // k < 8, k >= 8
      for (int e = 0; e < 2; ++e) {         // low, high element of each pair
        const int shift = 16 * e;
        const float top = bits_to_float(static_cast<uint16_t>(row[2 * half] >> shift), M());
        const float bottom = bits_to_float(static_cast<uint16_t>(row[2 * half + 1] >> shift), M());
        const float left = bits_to_float(static_cast<uint16_t>(col0[half] >> shift), M());
        const float right = bits_to_float(static_cast<uint16_t>(col1[half] >> shift), M());
        d[0] = fmaf(top, left, d[0]);
        d[1] = fmaf(top, right, d[1]);
        d[2] = fmaf(bottom, left, d[2]);
        d[3] = fmaf(bottom, right, d[3]);
      }
    }
  }
#endif
}

// d += A B on one 8 x 8 x 4 tile of float64 (float64 tensor cores, sm_80 on): A 8 x 4 (row
// major), B 4 x 8 (column major); fragments as in the PTX ISA's "Matrix Fragments for
// mma.m8n8k4 with .f64 floating point type" (group = lane / 4, quad = lane % 4):
//   a: A[group][quad]   b: B[quad][group]   d[0], d[1]: D[group][2 quad, +1]
// Elsewhere (older GPUs, the CPU emulation) the same products from the lanes' fragments.
__device__ __forceinline__ void mma_m8n8k4(double (&d)[2], double a, double b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
               : "+d"(d[0]), "+d"(d[1])
               : "d"(a), "d"(b));
#else
  const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
  const double fragments[2] = {a, b};
  const WarpRegisters<double, 2> lanes(fragments);
  for (int k = 0; k < 4; ++k) {
    const double row = lanes.at(0, 4 * group + k);
    const double left = lanes.at(1, 4 * (2 * quad) + k);
    const double right = lanes.at(1, 4 * (2 * quad + 1) + k);
    d[0] = fma(row, left, d[0]);
    d[1] = fma(row, right, d[1]);
  }
#endif
}

// Two such tiles that share B, stacked along the rows of A (16 x 4: rows 0-7 `top`'s, 8-15
// `bottom`'s), in one float64 mma.m16n8k4 (compute capability 9.0 on; the PTX ISA's "Matrix
// Fragments for mma.m16n8k4 with .f64"): a_top = A[group][quad], a_bottom = A[group + 8][quad],
// b as above, and each half's d as above. Elsewhere the two mma_m8n8k4. The same products and
// sums; the order in which a tensor core adds an instruction's 4 products may differ between the
// two shapes, and so may the last bits.
__device__ __forceinline__ void mma_m16n8k4(double (&top)[2], double (&bottom)[2], double a_top, double a_bottom,
                                            double b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mma.sync.aligned.m16n8k4.row.col.f64.f64.f64.f64 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
               : "+d"(top[0]), "+d"(top[1]), "+d"(bottom[0]), "+d"(bottom[1])
               : "d"(a_top), "d"(a_bottom), "d"(b));
#else
  mma_m8n8k4(top, a_top, b);
  mma_m8n8k4(bottom, a_bottom, b);
#endif
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// float16 or bfloat16: the types the 16-bit tensor cores take.
inline bool sixteen_bit(DType dtype) { return dtype == DType::Float16 || dtype == DType::BFloat16; }

// Rows of a strided 4-D tensor can be read 16 bytes (`per_vector` elements) at a time: aligned
// base, contiguous last dim, every other stride a multiple of `per_vector`.
inline bool rows_16_byte_aligned(const void* data, const int64_t* stride, int64_t per_vector) {
  return reinterpret_cast<uintptr_t>(data) % 16 == 0 && stride[3] == 1 && stride[0] % per_vector == 0 &&
         stride[1] % per_vector == 0 && stride[2] % per_vector == 0;
}

// Carves one caller-provided buffer into 256-byte aligned arrays. With a null base it only
// counts bytes, so the size query and the launch share one layout description. An empty array
// gets the address where the next one starts, not null: nothing may be written through it.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(int64_t count) {
    offset_ = (offset_ + 255) & ~static_cast<size_t>(255);
    T* out = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += static_cast<size_t>(count > 0 ? count : 0) * sizeof(T);
    return out;
  }
  size_t bytes() const { return offset_ + 255; }  // slack so a caller may round the base up

 private:
  char* base_;
  size_t offset_ = 0;
};

// out[i] = count(0) + ... + count(i - 1) for i = 0..n (out[n]: the total), by all kThreads
// threads of one block, chunk after chunk with a running prefix. For per-image / per-window work
// counts (thousands of entries at most in practice), so one block is enough.
template <int kThreads, typename Count>
__device__ void block_exclusive_offsets(const Count& count, int64_t n, int64_t* __restrict__ out) {
  using BlockScan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int64_t running;
  if (threadIdx.x == 0) running = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    int64_t prefix = 0, chunk_total = 0;
    BlockScan(scan_storage).ExclusiveSum(i < n ? count(i) : 0, prefix, chunk_total);
    const int64_t start = running;
    if (i < n) out[i] = start + prefix;
    __syncthreads();  // everyone has read `running` and scan_storage before they change
    if (threadIdx.x == 0) running = start + chunk_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) out[n] = running;
}

// Index of the segment that holds `item`: the largest s with offsets[s] <= item, searching
// offsets[0..n] (n + 1 entries, non-decreasing). Skips empty segments.
__device__ __forceinline__ int64_t find_segment(const int64_t* offsets, int64_t n, int64_t item) {
  int64_t lo = 0, hi = n;  // invariant: offsets[lo] <= item < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= item) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Kernel chaining (programmatic dependent launch, compute capability 9.0 and later). A compress
// is two chains of small dependent kernels (5 kernels for a LLaVA-1.5 image), so the gap between
// one kernel's end and the next one's start weighs as much as the work. KernelLauncher (with
// LIGHTKV_PDL=1) lets each kernel launch while the previous one in the stream still runs; the new
// kernel's blocks wait here, already resident (holding registers and shared memory that the
// running kernels and the other stream's cannot use), until that kernel has finished and its
// writes are visible. Every
// kernel of this library calls this first, unconditionally, before it touches global memory:
// it then sees what plain stream order would show it, and since no kernel can finish before its
// predecessor, the order holds along the whole chain (and for kernels launched without chaining,
// which never start early). After the wait the kernel lets its own successor launch.
__device__ __forceinline__ void await_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// at[0] + at[stride] + ... + at[(count - 1) stride], added in that order, read with __ldcg.
// The loads of kInFlight terms are in flight together, predicated rather than in a remainder
// loop, so that a partial batch costs one round trip too (an unrolled loop's remainder issues
// one load per trip).
template <int kInFlight, typename V>
__device__ __forceinline__ V ordered_sum(const V* at, int64_t stride, int64_t count) {
  V total = V(0);
  for (int64_t left = count; left > 0; left -= kInFlight) {
    const int in_batch = static_cast<int>(min(left, int64_t{kInFlight}));
    V term[kInFlight];
#pragma unroll
    for (int i = 0; i < kInFlight; ++i, at += stride) term[i] = i < in_batch ? __ldcg(at) : V(0);
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      if (i < in_batch) total += term[i];
    }
  }
  return total;
}

// Hand-off to the last of the blocks that each wrote a partial result of one group and then call
// this (uniformly over the block) with the group's counter, which must start at 0, each adding
// its `share` (1 by default) of the group's `total`: true in the block whose share completes the
// total only, which may then read every contributor's partial, with __ldcg (from L2, never a
// stale L1 line). The order in which blocks arrive decides only which one goes on, never the
// order of a sum.
// The ordering is CUTLASS's and cooperative groups' pattern between blocks: the barrier orders the
// block's writes before thread 0's ticket, a release at GPU scope (cumulative: it publishes what
// the barrier ordered before it), and in the last block thread 0's acquire fence comes before the
// second barrier and so before every thread's reads. (One thread's release, not every thread's
// __threadfence: a sequentially consistent fence per warp that also dropped the SM's L1.)
__device__ __forceinline__ bool last_to_arrive(unsigned int* counter, unsigned int total, unsigned int share = 1) {
  __shared__ bool last;
  __syncthreads();  // every thread's partial writes come before thread 0's release
  if (threadIdx.x == 0) {
#if defined(__CUDA_ARCH__)
    unsigned int before;
    asm volatile("atom.release.gpu.global.add.u32 %0, [%1], %2;\n"
                 : "=r"(before)
                 : "l"(counter), "r"(share)
                 : "memory");
    last = before + share == total;
    if (last) asm volatile("fence.acq_rel.gpu;\n" ::: "memory");  // the partials are read after the ticket
#elif defined(LIGHTKV_CUDA_EMULATION)  // acquire in the ticket itself: ThreadSanitizer ignores standalone fences
    last = std::atomic_ref<unsigned int>(*counter).fetch_add(share, std::memory_order_acq_rel) + share == total;
#endif
  }
  __syncthreads();
  return last;
}

// Thread block clusters (compute capability 9.0 on; KernelLauncher::cluster launches them, the
// CPU emulation runs a cluster's blocks at once). cluster_arrive and cluster_wait are the two
// halves of a barrier over every thread of the calling block's cluster: what a thread wrote to
// its block's shared memory before it arrived is visible to the cluster's threads once they have
// waited, and between the two a thread may go on with other work. Every thread of the cluster
// takes part (uniformly: .aligned), and a block must not exit while another block may still read
// its shared memory: a block that reads another's arrives after its reads, and every block waits
// before it exits. Device code built for an older GPU traps (launch_score launches clusters only
// where the code was built for 9.0 on).
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(LIGHTKV_CUDA_EMULATION)
  emu::cluster_arrive();
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(LIGHTKV_CUDA_EMULATION)
  emu::cluster_wait();
#endif
}
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

// The shared-memory variable at `variable` (the calling block's instance) in block `rank` of the
// cluster (distributed shared memory: plain loads and stores reach it).
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* variable, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(variable, rank);
#elif defined(LIGHTKV_CUDA_EMULATION)
  return emu::peer_shared(variable, rank);
#else
  (void)rank;
  return variable;  // older GPUs: never launched in clusters (cluster_arrive traps)
#endif
}

// Starts bringing the `bytes` at `base` (global memory) into L2, each thread of the grid a 128-byte
// line in turn: nothing waits for it and nothing changes but where a later read finds the data
// (for what a later kernel reads, fetched while this one waits on its own round trips).
__device__ __forceinline__ void prefetch_to_l2(const void* base, int64_t bytes) {
#if defined(__CUDA_ARCH__)
  const char* at = static_cast<const char*>(base);
  const int64_t stride = int64_t{gridDim.x} * blockDim.x * 128;
  for (int64_t offset = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) * 128; offset < bytes; offset += stride) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(at + offset));
  }
#else
  (void)base;
  (void)bytes;
#endif
}

// Starts bringing the line at `at` (global memory) into this SM's L1, for a load that follows
// other work: nothing waits for it.
__device__ __forceinline__ void prefetch_to_l1(const void* at) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(at));
#else
  (void)at;
#endif
}

// Every thread of the grid sets its share of a[0, n) to `value`: a memset without a launch.
template <typename T>
__device__ __forceinline__ void grid_fill(T* a, int64_t n, T value) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) a[i] = value;
}

// Grid size for a grid-stride loop over at most `items` work items.
inline unsigned int grid_for(int64_t items, int64_t cap) {
  const int64_t g = items < 1 ? 1 : (items < cap ? items : cap);
  return static_cast<unsigned int>(g);
}

// Devices for which run-time queries (PTX version, cluster fit) keep their answers.
constexpr int kCachedDevices = 64;

// Runs `queries` (CUDA runtime calls whose refusal is an answer, not a failure) and returns their
// answer, leaving no error of theirs for the caller's next cudaGetLastError; an error the caller
// had left unread before them stays the caller's to read.
template <typename Queries>
bool answer_quietly(Queries&& queries) {
  const bool caller_error_pending = cudaPeekAtLastError() != cudaSuccess;
  const bool answer = queries();
  if (!caller_error_pending) (void)cudaGetLastError();
  return answer;
}

#ifndef LIGHTKV_CUDA_EMULATION  // the CPU emulation brings its own launcher and cluster check
inline cudaLaunchAttribute cluster_attribute(unsigned int cluster_blocks) {
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = cluster_blocks;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  return cluster;
}

constexpr unsigned int kPortableClusterBlocks = 8;  // the cluster size every GPU that runs clusters allows

// Whether the current device runs `kernel` (`threads` per block) in clusters of `cluster_blocks`
// blocks: code built for compute capability 9.0 on, and at least one such cluster fits on the
// GPU at once. Sizes past the portable 8 (up to 16 on an H100) are allowed first.
template <typename... Params>
bool clusters_fit(void (*kernel)(Params...), int threads, unsigned int cluster_blocks) {
  cudaFuncAttributes attributes{};
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(cluster_blocks);
  config.blockDim = dim3(threads);
  cudaLaunchAttribute cluster = cluster_attribute(cluster_blocks);
  config.attrs = &cluster;
  config.numAttrs = 1;
  int clusters = 0;
  return answer_quietly([&] {
    // Relaxed capture mode: the queries may run while this thread captures a CUDA graph (the first
    // call of a shape inside torch.cuda.graph), where a stricter mode could refuse them and end the
    // capture.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    const bool relaxed = cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess;
    const bool fits =
        cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess && attributes.ptxVersion >= 90 &&
        (cluster_blocks <= kPortableClusterBlocks ||
         cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) &&
        cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0;
    if (relaxed) (void)cudaThreadExchangeStreamCaptureMode(&mode);  // the caller's mode again
    return fits;
  });
}

// Launches kernels on one stream, in plain stream order by default. With LIGHTKV_PDL=1 in the
// environment they are chained (see await_previous_kernel) where the code that runs was compiled
// for compute capability 9.0 or later (PTX of an older target, compiled just in time for a newer
// GPU, lacks the wait). Chaining is opt-in because on H100 and H200 it measured slower or no
// faster in every case timed (csrc/cuda/README.md). `probe`: any kernel of the calling file (all
// share its build targets).
class KernelLauncher {
 public:
  template <typename... Params>
  static cudaError_t create(cudaStream_t stream, void (*probe)(Params...), KernelLauncher* out) {
    out->stream_ = stream;
    out->chained_ = false;
    if (!knob_is("LIGHTKV_PDL", "1")) return cudaSuccess;
    int ptx_version = 0;
    LIGHTKV_RETURN_IF_ERROR(ptx_version_on_current_device(probe, &ptx_version));
    out->chained_ = ptx_version >= 90;
    return cudaSuccess;
  }

  // kernel<<<grid, block, 0, stream>>>(args...), returning the launch's error.
  template <typename... Params, typename... Args>
  cudaError_t operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    cudaLaunchAttribute chained = chained_attribute();
    return launch(kernel, grid, block, &chained, chained_ ? 1 : 0, std::forward<Args>(args)...);
  }

  // The same in clusters of `cluster_blocks` consecutive blocks along x (grid.x a multiple of
  // it; see clusters_fit).
  template <typename... Params, typename... Args>
  cudaError_t cluster(void (*kernel)(Params...), dim3 grid, dim3 block, unsigned int cluster_blocks,
                      Args&&... args) const {
    cudaLaunchAttribute attributes[2] = {cluster_attribute(cluster_blocks), chained_attribute()};
    return launch(kernel, grid, block, attributes, chained_ ? 2 : 1, std::forward<Args>(args)...);
  }

 private:
  // The PTX version of the code the current device runs for `probe`, asked once per device: a
  // cudaFuncGetAttributes per launcher cost host time at every call. Every kernel of the library is
  // built for the same targets, so one answer per device serves them all.
  template <typename... Params>
  static cudaError_t ptx_version_on_current_device(void (*probe)(Params...), int* out) {
    static std::atomic<int> known[kCachedDevices];  // 0: not asked yet
    int device = 0;
    LIGHTKV_RETURN_IF_ERROR(cudaGetDevice(&device));
    const bool cached = device >= 0 && device < kCachedDevices;
    if (cached && (*out = known[device].load(std::memory_order_relaxed)) != 0) return cudaSuccess;
    cudaFuncAttributes attributes{};
    LIGHTKV_RETURN_IF_ERROR(cudaFuncGetAttributes(&attributes, probe));
    *out = attributes.ptxVersion;
    if (cached) known[device].store(attributes.ptxVersion, std::memory_order_relaxed);
    return cudaSuccess;
  }

  static cudaLaunchAttribute chained_attribute() {
    cudaLaunchAttribute chained{};
    chained.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    chained.val.programmaticStreamSerializationAllowed = 1;
    return chained;
  }

  template <typename... Params, typename... Args>
  cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaLaunchAttribute* attributes,
                     unsigned int attribute_count, Args&&... args) const {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = 0;
    config.stream = stream_;
    config.attrs = attributes;
    config.numAttrs = attribute_count;
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  }

  cudaStream_t stream_ = nullptr;
  bool chained_ = false;
};
#endif

}  // namespace detail
}  // namespace lightkv_cuda
