// CPU emulation of the CUDA subset the lightkv kernels use, to check their logic on machines
// without a GPU (see run.sh). Every CUDA thread is an OS thread, __syncthreads is a barrier over
// the block (SleepingBarrier), warp shuffles go through per-warp slot arrays (a barrier over the
// warp each), and `__shared__` variables are per block (to_cpp.py turns each declaration into a
// block_shared lookup). Kernels run one after another (so kernel chaining is moot), with grid x
// capped (kernels walk their work in grid-stride loops, so a small grid must give the same
// answer); the blocks of a grid row run at once, as do the blocks of a cluster launch (at most
// kClusterCap clusters, each sharing a barrier and its blocks' shared memory), so that blocks race
// as on a GPU. The CUB algorithms are plain host versions with the same results.
// Tensor-core mma and ldmatrix run in their fallback form (common.cuh), each lane computing its
// fragment from the warp's registers gathered in one exchange (warp_gather), which checks the
// kernels' fragment layouts; a cp.async copy lands only when its thread waits for it
// (copy_16_bytes_later), which checks the kernels' waits, and a cp.async or ldmatrix address off
// 16 bytes aborts, as it faults on a GPU (expect_aligned). Built with -fsanitize=thread it also
// finds shared-memory races (a missing __syncthreads) and global-memory races between blocks (a
// hand-off not ordered by a ticket); with -fsanitize=address,undefined out-of-bounds accesses
// (shared variables are allocations of their exact size) and misaligned vector loads.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <array>
#include <deque>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <unordered_map>
#include <numeric>
#include <thread>
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
using std::min;
using std::max;
using std::isfinite;

namespace emu {
inline thread_local dim3 tidx, bidx;
inline dim3 bdim, gdim;
// Grids of up to kGridCap blocks run whole: kernels whose blocks have fixed roles use no more
// (image_offsets_kernel: one block per count array; prepare_kernel: two offsets blocks).
inline constexpr unsigned kGridCap = 4;
inline constexpr unsigned kClusterCap = 2;

// What a lane publishes to its warp in one exchange (a shuffle's value, a WarpRegisters' array).
struct LaneSlot {
  alignas(8) unsigned char bytes[64];
};
using WarpSlots = std::array<LaneSlot, 32>;

// A barrier whose waiting threads yield a few turns and then sleep (std::barrier's keep yielding):
// with several blocks at once there are hundreds of threads on a few cores, and a waiter that
// keeps yielding takes turns from those that would arrive (under ThreadSanitizer, whose every
// atomic load is slow, many times over).
class SleepingBarrier {
 public:
  explicit SleepingBarrier(unsigned threads) : threads_(threads) {}
  void arrive_and_wait() { wait(arrive()); }
  // Counts the calling thread in and returns the phase to wait on; the last to arrive opens it.
  unsigned arrive() {
    const unsigned phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == threads_) {
      arrived_.store(0, std::memory_order_relaxed);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        phase_.store(phase + 1, std::memory_order_release);
      }
      all_arrived_.notify_all();
    }
    return phase;
  }
  // Returns once every thread has arrived in `phase`.
  void wait(unsigned phase) {
    for (int turn = 0; turn < kYields; ++turn) {
      if (phase_.load(std::memory_order_acquire) != phase) return;
      std::this_thread::yield();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    all_arrived_.wait(lock, [&] { return phase_.load(std::memory_order_acquire) != phase; });
  }

 private:
  static constexpr int kYields = 4;
  const unsigned threads_;
  std::atomic<unsigned> arrived_{0};
  std::atomic<unsigned> phase_{0};
  std::mutex mutex_;
  std::condition_variable all_arrived_;
};

// What the threads of one block share: barriers, warp exchange slots, shared memory.
struct Block {
  explicit Block(unsigned threads) : barrier(threads), exchanges(threads / 32) {
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.emplace_back(new SleepingBarrier(32));
  }
  ~Block() {
    for (auto& entry : shared) ::operator delete(entry.second, std::align_val_t{64});
  }
  SleepingBarrier barrier;
  std::vector<std::unique_ptr<SleepingBarrier>> warp_barriers;
  std::vector<std::array<WarpSlots, 2>> exchanges;  // by warp: two, used in turn
  std::mutex shared_mutex;
  std::unordered_map<const void*, void*> shared;  // by declaration
};
inline thread_local Block* block = nullptr;
inline thread_local unsigned exchange_parity = 0;  // which of its warp's two slot arrays is next

// Publishes the calling lane's `size` bytes at `value` to its warp and returns, once every lane
// has, all of them. One barrier per exchange: the two slot arrays alternate, and a lane refills
// an array only after the whole warp has reached the next exchange, so after every lane read
// this one (callers read the slots before they exchange again).
inline const WarpSlots& exchange_in_warp(const void* value, size_t size) {
  const unsigned warp = tidx.x / 32;
  WarpSlots& slots = block->exchanges[warp][exchange_parity];
  exchange_parity ^= 1;
  std::memcpy(slots[tidx.x % 32].bytes, value, size);
  block->warp_barriers[warp]->arrive_and_wait();
  return slots;
}

// Every lane's `values` (lane l's at [l]) in one exchange: what N shuffles per lane gather.
template <typename T, size_t N>
std::array<std::array<T, N>, 32> warp_gather(const T (&values)[N]) {
  static_assert(sizeof(values) <= sizeof(LaneSlot::bytes));
  const WarpSlots& slots = exchange_in_warp(values, sizeof(values));
  std::array<std::array<T, N>, 32> lanes;
  for (unsigned lane = 0; lane < 32; ++lane) std::memcpy(lanes[lane].data(), slots[lane].bytes, sizeof(values));
  return lanes;
}

// What the blocks of one cluster share: a barrier over all their threads, and their blocks.
struct Cluster {
  explicit Cluster(unsigned threads) : barrier(threads) {}
  SleepingBarrier barrier;
  std::vector<Block*> blocks;  // by rank
};
inline thread_local Cluster* cluster = nullptr;  // cluster launches only
inline thread_local unsigned cluster_phase = 0;  // the phase of the thread's last cluster_arrive

inline void cluster_arrive() { cluster_phase = cluster->barrier.arrive(); }
inline void cluster_wait() { cluster->barrier.wait(cluster_phase); }

// cp.async as a GPU may run it: a copy lands at any time between its issue and the copying
// thread's wait for it. So that kernels see both ends, the emulator fills the destination with
// all-ones bytes (NaN in every float format) at the issue and writes the copied bytes at the wait
// (wait_all: every copy; wait_group N: all but the thread's newest N closed groups). A read
// before the copying thread's wait sees the poison, and a read of another thread's copy that no
// barrier orders after that wait races (ThreadSanitizer) with one of the two writes.
struct PendingCopy {
  void* to;
  std::array<unsigned char, 16> bytes;
};
inline thread_local std::vector<PendingCopy> open_copy_group;
inline thread_local std::deque<std::vector<PendingCopy>> closed_copy_groups;  // oldest first

// A GPU faults on an access its address does not align to (cudaErrorMisalignedAddress), where
// x86 would just read: the emulator aborts instead.
inline void expect_aligned(const void* address, size_t alignment, const char* what) {
  if (reinterpret_cast<uintptr_t>(address) % alignment != 0) {
    std::fprintf(stderr, "cuda_on_cpu: %s at %p is not %zu-byte aligned\n", what, address, alignment);
    std::abort();
  }
}

inline void copy_16_bytes_later(void* to, const void* from) {
  expect_aligned(to, 16, "cp.async destination");
  if (from != nullptr) expect_aligned(from, 16, "cp.async source");
  PendingCopy copy{to, {}};
  if (from != nullptr) std::memcpy(copy.bytes.data(), from, 16);  // else zeros, as source size 0
  std::memset(to, 0xff, 16);
  open_copy_group.push_back(copy);
}
inline void close_copy_group() {
  closed_copy_groups.push_back(std::move(open_copy_group));
  open_copy_group.clear();
}
inline void land_copy_groups_but_newest(size_t newest) {
  while (closed_copy_groups.size() > newest) {
    for (const PendingCopy& copy : closed_copy_groups.front()) std::memcpy(copy.to, copy.bytes.data(), 16);
    closed_copy_groups.pop_front();
  }
}
inline void land_all_copies() {
  close_copy_group();
  land_copy_groups_but_newest(0);
}

// This block's instance of the `__shared__` variable declared at `key`, uninitialised (0xCD),
// as on a GPU.
template <typename T>
T& block_shared(const void* key) {
  std::lock_guard<std::mutex> lock(block->shared_mutex);
  void*& at = block->shared[key];
  if (at == nullptr) {
    at = ::operator new(sizeof(T), std::align_val_t{64});
    std::memset(at, 0xCD, sizeof(T));
  }
  return *static_cast<T*>(at);
}

// The `__shared__` variable at `variable` (the calling block's instance, as block_shared made
// it) in block `rank` of the calling thread's cluster.
template <typename T>
T* peer_shared(T* variable, unsigned rank) {
  const void* key = nullptr;
  {
    std::lock_guard<std::mutex> lock(block->shared_mutex);
    for (const auto& entry : block->shared) {
      if (entry.second == static_cast<const void*>(variable)) key = entry.first;
    }
  }
  if (key == nullptr) {
    std::fprintf(stderr, "cuda_on_cpu: cluster_peer of an address that starts no __shared__ variable\n");
    std::abort();
  }
  Block* peer = cluster->blocks.at(rank);
  std::lock_guard<std::mutex> lock(peer->shared_mutex);
  return static_cast<T*>(peer->shared.at(key));  // declared there before the barrier that let us read
}

// Runs `body` as every thread of the blocks in `blocks`, all at once; with a `cluster_size`, each
// `cluster_size` consecutive blocks form a cluster.
inline void run_blocks(const std::vector<dim3>& blocks, unsigned threads, const std::function<void()>& body,
                       unsigned cluster_size = 0) {
  std::vector<std::unique_ptr<Block>> contexts;
  std::vector<std::unique_ptr<Cluster>> clusters;
  for (size_t b = 0; b < blocks.size(); ++b) {
    contexts.emplace_back(new Block(threads));
    if (cluster_size == 0) continue;
    if (b % cluster_size == 0) clusters.emplace_back(new Cluster(cluster_size * threads));
    clusters.back()->blocks.push_back(contexts.back().get());
  }
  std::vector<std::thread> workers;
  for (size_t b = 0; b < blocks.size(); ++b) {
    Cluster* in_cluster = cluster_size == 0 ? nullptr : clusters[b / cluster_size].get();
    for (unsigned t = 0; t < threads; ++t) {
      workers.emplace_back([&, b, t, in_cluster] {
        tidx = dim3(t, 0, 0);
        bidx = blocks[b];
        block = contexts[b].get();
        cluster = in_cluster;
        body();
      });
    }
  }
  for (auto& worker : workers) worker.join();
}

inline unsigned checked_block_size(dim3 block) {
  const unsigned n = block.x * block.y * block.z;
  if (n % 32 != 0) {
    std::fprintf(stderr, "cuda_on_cpu: block size %u is not a multiple of 32\n", n);
    std::abort();
  }
  return n;
}

// The blocks of `grid`, x fastest.
inline std::vector<dim3> blocks_of(dim3 grid) {
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  return blocks;
}

// A plain launch: the blocks of each row of the (capped) grid at once, row after row, so that
// blocks race as on a GPU: ThreadSanitizer sees their hand-offs (tickets), and a result that
// depended on which block finishes last would differ from run to run.
inline void launch(dim3 grid, dim3 block_size, const std::function<void()>& body) {
  if (grid.x > kGridCap) grid.x = kGridCap;
  gdim = grid;
  bdim = block_size;
  const unsigned n = checked_block_size(block_size);
  const std::vector<dim3> blocks = blocks_of(grid);
  for (size_t first = 0; first < blocks.size(); first += grid.x) {
    run_blocks({blocks.begin() + first, blocks.begin() + first + grid.x}, n, body);
  }
}

// A launch in clusters of `size` consecutive blocks along x, at most kClusterCap of them, all at
// once (a cluster's blocks share a barrier and each other's shared memory).
inline void launch_cluster(dim3 grid, dim3 block_size, unsigned size, const std::function<void()>& body) {
  if (grid.y != 1 || grid.z != 1 || grid.x % size != 0) {
    std::fprintf(stderr, "cuda_on_cpu: a cluster launch needs a grid of whole clusters along x\n");
    std::abort();
  }
  if (grid.x > kClusterCap * size) grid.x = kClusterCap * size;
  gdim = grid;
  bdim = block_size;
  run_blocks(blocks_of(grid), checked_block_size(block_size), body, size);
}
}  // namespace emu

// common.cuh's launcher and cluster check, run in order on the emulator.
#define LIGHTKV_CUDA_EMULATION 1
namespace lightkv_cuda::detail {
class KernelLauncher {
 public:
  template <typename... Params>
  static cudaError_t create(cudaStream_t, void (*)(Params...), KernelLauncher*) { return cudaSuccess; }
  template <typename... Params, typename... Args>
  cudaError_t operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    emu::launch(grid, block, [&] { kernel(args...); });
    return cudaSuccess;
  }
  template <typename... Params, typename... Args>
  cudaError_t cluster(void (*kernel)(Params...), dim3 grid, dim3 block, unsigned int cluster_blocks,
                      Args&&... args) const {
    emu::launch_cluster(grid, block, cluster_blocks, [&] { kernel(args...); });
    return cudaSuccess;
  }
};
// Clusters of up to 16 blocks, as on an H100.
template <typename... Params>
bool clusters_fit(void (*)(Params...), int, unsigned int cluster_blocks) {
  return cluster_blocks <= 16;
}
}  // namespace lightkv_cuda::detail

#define threadIdx emu::tidx
#define blockIdx emu::bidx
#define blockDim emu::bdim
#define gridDim emu::gdim

inline void __syncthreads() { emu::block->barrier.arrive_and_wait(); }

template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane) {
  static_assert(sizeof(T) <= 8);
  const emu::WarpSlots& slots = emu::exchange_in_warp(&v, sizeof(T));
  T out;
  std::memcpy(&out, slots[static_cast<unsigned>(src_lane) % 32].bytes, sizeof(T));
  return out;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int offset) {
  return __shfl_sync(mask, v, static_cast<int>(emu::tidx.x % 32) ^ offset);
}
// Bit l: lane l's predicate, for every lane of the warp.
inline unsigned __ballot_sync(unsigned, int predicate) {
  const unsigned char vote = predicate != 0 ? 1 : 0;
  const emu::WarpSlots& slots = emu::exchange_in_warp(&vote, 1);
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) bits |= static_cast<unsigned>(slots[l].bytes[0]) << l;
  return bits;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
// Real atomics and fences: the blocks of a cluster run at once.
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return std::atomic_ref<unsigned int>(*address).fetch_add(value);
}
inline unsigned int atomicOr(unsigned int* address, unsigned int value) {
  return std::atomic_ref<unsigned int>(*address).fetch_or(value);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
inline T __ldcg(const T* address) { return *address; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

namespace cub {
template <typename T, int N>
struct BlockScan {
  struct TempStorage { T vals[N]; };
  TempStorage& s;
  explicit BlockScan(TempStorage& st) : s(st) {}
  void ExclusiveSum(T in, T& out, T& aggregate) {
    s.vals[emu::tidx.x] = in;
    __syncthreads();
    T acc{};
    for (unsigned i = 0; i < emu::tidx.x; ++i) acc += s.vals[i];
    out = acc;
    T all{};
    for (int i = 0; i < N; ++i) all += s.vals[i];
    aggregate = all;
    __syncthreads();
  }
  void ExclusiveSum(T in, T& out) {
    T aggregate;
    ExclusiveSum(in, out, aggregate);
  }
};
// Stable sort of N * I (key, value) items in CUB's blocked arrangement (thread t holds items
// I t .. I t + I - 1) by bits [begin_bit, end_bit) of the key.
template <typename K, int N, int I, typename V>
struct BlockRadixSort {
  struct TempStorage { K keys[N * I]; V values[N * I]; };
  TempStorage& s;
  explicit BlockRadixSort(TempStorage& st) : s(st) {}
  void Sort(K (&keys)[I], V (&values)[I], int begin_bit, int end_bit) {
    const unsigned t = emu::tidx.x;
    for (int i = 0; i < I; ++i) { s.keys[t * I + i] = keys[i]; s.values[t * I + i] = values[i]; }
    __syncthreads();
    if (t == 0) {
      const K mask = end_bit >= static_cast<int>(8 * sizeof(K)) ? ~K(0) : ((K(1) << end_bit) - 1);
      std::vector<int> order(N * I);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        return ((s.keys[a] & mask) >> begin_bit) < ((s.keys[b] & mask) >> begin_bit);
      });
      std::vector<K> k(N * I);
      std::vector<V> v(N * I);
      for (int j = 0; j < N * I; ++j) { k[j] = s.keys[order[j]]; v[j] = s.values[order[j]]; }
      std::copy(k.begin(), k.end(), s.keys);
      std::copy(v.begin(), v.end(), s.values);
    }
    __syncthreads();
    for (int i = 0; i < I; ++i) { keys[i] = s.keys[t * I + i]; values[i] = s.values[t * I + i]; }
    __syncthreads();
  }
};
template <typename T, int N>
struct BlockReduce {
  struct TempStorage { T vals[N]; };
  TempStorage& s;
  explicit BlockReduce(TempStorage& st) : s(st) {}
  T Sum(T in) {
    s.vals[emu::tidx.x] = in;
    __syncthreads();
    T all{};
    if (emu::tidx.x == 0) for (int i = 0; i < N; ++i) all += s.vals[i];
    __syncthreads();
    return emu::tidx.x == 0 ? all : T{};  // only thread 0's result is defined (poison the rest)
  }
};
struct DeviceScan {
  template <typename I, typename O>
  static cudaError_t ExclusiveSum(void* temp, size_t& bytes, I in, O out, int64_t n, cudaStream_t = 0) {
    if (!temp) { bytes = 16; return cudaSuccess; }
    int64_t acc = 0;
    for (int64_t i = 0; i < n; ++i) { auto v = in[i]; out[i] = acc; acc += v; }
    return cudaSuccess;
  }
};
struct DeviceRadixSort {
  template <typename K, typename V>
  static cudaError_t SortPairs(void* temp, size_t& bytes, const K* kin, K* kout, const V* vin, V* vout, int64_t n,
                               int begin_bit, int end_bit, cudaStream_t = 0) {
    if (!temp) { bytes = 16; return cudaSuccess; }
    auto bits = [&](K k) { K m = end_bit >= 64 ? ~K(0) : ((K(1) << end_bit) - 1); return (k & m) >> begin_bit; };
    std::vector<int64_t> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return bits(kin[a]) < bits(kin[b]); });
    for (int64_t j = 0; j < n; ++j) { kout[j] = kin[idx[j]]; vout[j] = vin[idx[j]]; }
    return cudaSuccess;
  }
};
}  // namespace cub
