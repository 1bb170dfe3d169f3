// Small shared kernels of the lightkv CUDA backend.
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace lightkv_cuda {
namespace detail {
namespace {

constexpr int kScanThreads = 512;

// One block per array: chunks of kScanThreads counts scanned in order with a running prefix.
// Used on per-image / per-window work counts (thousands of entries at most in practice).
__global__ void __launch_bounds__(kScanThreads)
    exclusive_offsets_kernel(const int64_t* __restrict__ counts, int64_t n,
                             int64_t* __restrict__ offsets) {
  using BlockScan = cub::BlockScan<int64_t, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int64_t running;
  const int64_t* in = counts + static_cast<int64_t>(blockIdx.x) * n;
  int64_t* out = offsets + static_cast<int64_t>(blockIdx.x) * (n + 1);
  if (threadIdx.x == 0) running = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t value = i < n ? in[i] : 0;
    int64_t prefix = 0, chunk_total = 0;
    BlockScan(scan_storage).ExclusiveSum(value, prefix, chunk_total);
    const int64_t start = running;
    if (i < n) out[i] = start + prefix;
    __syncthreads();  // everyone has read `running` and scan_storage before they change
    if (threadIdx.x == 0) running = start + chunk_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) out[n] = running;
}

}  // namespace

cudaError_t launch_exclusive_offsets(const int64_t* counts, int64_t n, int num_arrays,
                                     int64_t* offsets, cudaStream_t stream) {
  exclusive_offsets_kernel<<<num_arrays, kScanThreads, 0, stream>>>(counts, n, offsets);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace lightkv_cuda
