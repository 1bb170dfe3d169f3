// C entry points over the CPU-emulated kernels for emulated_ops.py (ctypes); the workspace is
// host memory filled with 0xCD.
#include "kernels.h"
#include <cstdlib>
#include <cstring>
using namespace lightkv_cuda;
static Tensor4 t4(const void* data, int dtype, const int64_t* size, const int64_t* stride) {
  Tensor4 t; t.data = data; t.dtype = static_cast<DType>(dtype);
  for (int i = 0; i < 4; ++i) { t.size[i] = size[i]; t.stride[i] = stride[i]; }
  return t;
}
extern "C" int emu_score(const void* k, int dtype, const int64_t* ks, const int64_t* kst, const void* text,
                         const int64_t* ts, const int64_t* tst, const int64_t* images, int64_t num_images,
                         const bool* mask, const int64_t* mst, const int32_t* sizes, const int64_t* sst, float scale,
                         int64_t text_capacity, float* out) {
  ScoreArgs a;
  a.k = t4(k, dtype, ks, kst); a.text = t4(text, dtype, ts, tst);
  a.images = images; a.num_images = num_images;
  a.text_mask = mask; if (mask) { a.text_mask_stride[0] = mst[0]; a.text_mask_stride[1] = mst[1]; }
  a.sizes = sizes; if (sizes) { a.sizes_stride[0] = sst[0]; a.sizes_stride[1] = sst[1]; }
  a.scale = scale; a.text_capacity = text_capacity; a.importance = out;
  size_t bytes = score_workspace_size(a);
  void* ws = std::malloc(bytes); std::memset(ws, 0xCD, bytes);
  int rc = launch_score(a, ws, bytes, nullptr);
  std::free(ws);
  return rc;
}
extern "C" int emu_merge(const void* k, const void* v, int dtype, const int64_t* ks, const int64_t* kst,
                         const int64_t* vst, const void* metric, int metric_dtype, const int64_t* ms,
                         const int64_t* mst, const float* importance, const int32_t* sizes,
                         const int64_t* tokens, int64_t total, const int64_t* offsets, int64_t windows, double ratio,
                         int64_t kept, int64_t max_window, void* k_out, void* v_out, const int64_t* os,
                         const int64_t* kost, const int64_t* vost, int32_t* sizes_out, int64_t* index,
                         int64_t* assignment, const int64_t* local_bases) {
  MergeArgs a;
  a.k = t4(k, dtype, ks, kst); a.v = t4(v, dtype, ks, vst); a.metric = t4(metric, metric_dtype, ms, mst);
  a.importance = importance; a.sizes = sizes; a.window_tokens = tokens; a.total_tokens = total;
  a.window_offsets = offsets; a.num_windows = windows; a.ratio = ratio; a.kept = kept;
  a.max_window = max_window;
  a.k_out.data = k_out; a.v_out.data = v_out;
  for (int i = 0; i < 4; ++i) { a.k_out.size[i] = a.v_out.size[i] = os[i]; a.k_out.stride[i] = kost[i]; a.v_out.stride[i] = vost[i]; }
  a.sizes_out = sizes_out; a.index = index; a.assignment = assignment; a.local_bases = local_bases;
  size_t bytes = merge_workspace_size(a);
  void* ws = std::malloc(bytes); std::memset(ws, 0xCD, bytes);
  int rc = launch_merge(a, ws, bytes, nullptr);
  std::free(ws);
  return rc;
}
