// Self-test of the torch-free lightkv CUDA kernels against a plain host implementation of the
// op contract (csrc/lightkv.cpp). Needs a GPU, not PyTorch. Exits 0 when every case matches,
// 1 on a mismatch, 2 on a CUDA error or a bad argument. Lives outside csrc/cuda/*.cu so setup.py
// does not link its main() into the extension. `--small` skips the large cases (for
// compute-sanitizer); `--only TEXT` runs just the cases whose name contains TEXT.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

using lightkv_cuda::DType;

#define SELFTEST_CUDA(expr)                                                                     \
  do {                                                                                          \
    const cudaError_t err_ = (expr);                                                            \
    if (err_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_), __FILE__, \
                   __LINE__, #expr);                                                            \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

int g_failures = 0;
std::string g_only;  // --only: run the cases whose name contains this
int g_cases_run = 0;

bool selected(const std::string& case_name) {
  const bool run = case_name.find(g_only) != std::string::npos;
  g_cases_run += run;
  return run;
}

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++g_failures;
  }
}

float to_f(float x) { return x; }
float to_f(__half x) { return __half2float(x); }
float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
T from_f(float x);
template <>
float from_f<float>(float x) { return x; }
template <>
__half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
DType dtype_of();
template <>
DType dtype_of<float>() { return DType::Float32; }
template <>
DType dtype_of<__half>() { return DType::Float16; }
template <>
DType dtype_of<__nv_bfloat16>() { return DType::BFloat16; }

template <typename T>
float tolerance() {
  if (std::is_same<T, float>::value) return 2e-5f;
  if (std::is_same<T, __half>::value) return 2e-3f;
  return 1.6e-2f;
}

template <typename T>
struct Device {
  T* ptr = nullptr;
  size_t count = 0;
  explicit Device(size_t n) : count(n) { SELFTEST_CUDA(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T))); }
  explicit Device(const std::vector<T>& host) : Device(host.size()) {
    SELFTEST_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~Device() { cudaFree(ptr); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  std::vector<T> download() const {
    std::vector<T> host(count);
    SELFTEST_CUDA(cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
};

// A 4-D host tensor stored with its dims in `order` (outermost first), so strides are not
// always the contiguous ones.
template <typename T>
struct HostTensor {
  std::vector<T> data;
  std::array<int64_t, 4> size{}, stride{};
  HostTensor(std::array<int64_t, 4> sizes, std::array<int, 4> order) : size(sizes) {
    int64_t step = 1;
    for (int i = 3; i >= 0; --i) {
      stride[order[i]] = step;
      step *= sizes[order[i]];
    }
    data.resize(static_cast<size_t>(step));
  }
  int64_t offset(int64_t a, int64_t b, int64_t c, int64_t d) const {
    return a * stride[0] + b * stride[1] + c * stride[2] + d * stride[3];
  }
  float at(int64_t a, int64_t b, int64_t c, int64_t d) const { return to_f(data[offset(a, b, c, d)]); }
};

template <typename T>
void fill_normal(HostTensor<T>& t, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  for (auto& x : t.data) x = from_f<T>(normal(rng));
}

template <typename T>
lightkv_cuda::Tensor4 describe(const HostTensor<T>& host, const void* device_ptr) {
  lightkv_cuda::Tensor4 t;
  t.data = device_ptr;
  t.dtype = dtype_of<T>();
  for (int i = 0; i < 4; ++i) {
    t.size[i] = host.size[i];
    t.stride[i] = host.stride[i];
  }
  return t;
}

// ---------------------------------------------------------------- score

struct ScoreCase {
  std::string name;
  int64_t B, H_kv, H_q, L, S, D;
  std::vector<std::array<int64_t, 5>> images;
  bool with_mask, with_sizes;
  std::array<int, 4> k_order;
};

template <typename T>
std::vector<float> host_score(const ScoreCase& c, const HostTensor<T>& k, const HostTensor<T>& text,
                              const std::vector<uint8_t>& mask, const std::vector<int32_t>& sizes, float scale) {
  std::vector<float> importance(static_cast<size_t>(c.B * c.L), 0.f);
  const int64_t group = c.H_q / c.H_kv;
  for (const auto& img : c.images) {
    const int64_t b = img[0], vs = img[1], vl = img[2], ts = img[3], tl = img[4];
    int64_t counted = 0;
    for (int64_t t = 0; t < tl; ++t) counted += c.with_mask ? mask[b * c.S + ts + t] : 1;
    if (counted == 0) {
      for (int64_t i = 0; i < vl; ++i) importance[b * c.L + vs + i] = 1.f / static_cast<float>(vl);
      continue;
    }
    std::vector<double> mass(static_cast<size_t>(vl), 0.0), logits(static_cast<size_t>(vl));
    for (int64_t h = 0; h < c.H_q; ++h) {
      for (int64_t t = 0; t < tl; ++t) {
        if (c.with_mask && !mask[b * c.S + ts + t]) continue;
        double peak = -INFINITY;
        for (int64_t i = 0; i < vl; ++i) {
          double dot = 0.0;
          for (int64_t d = 0; d < c.D; ++d) dot += double(text.at(b, h, ts + t, d)) * k.at(b, h / group, vs + i, d);
          logits[i] = scale * dot + (c.with_sizes ? std::log(double(sizes[b * c.L + vs + i])) : 0.0);
          peak = std::max(peak, logits[i]);
        }
        double total = 0.0;
        for (int64_t i = 0; i < vl; ++i) total += std::exp(logits[i] - peak);
        for (int64_t i = 0; i < vl; ++i) mass[i] += std::exp(logits[i] - peak) / total;
      }
    }
    for (int64_t i = 0; i < vl; ++i) {
      importance[b * c.L + vs + i] = static_cast<float>(mass[i] / double(c.H_q * counted));
    }
  }
  return importance;
}

// text_rows: the caller's bound on the images' text rows (ScoreArgs::text_capacity), or -1 for the
// I * S bound. Where the images overlap (`overlapping`) or text_rows is below their text rows, which
// the contract forbids, the result is undefined, so only the launch is checked (and, under
// compute-sanitizer or the emulator's AddressSanitizer, that no access leaves its buffers).
template <typename T>
void run_score_case(const ScoreCase& c, uint64_t seed, bool overlapping = false, int64_t text_rows = -1) {
  if (!selected(c.name)) return;
  int64_t needed_rows = 0;
  for (const auto& img : c.images) needed_rows += img[4];
  const bool undefined = overlapping || (text_rows >= 0 && text_rows < needed_rows);
  std::mt19937_64 rng(seed);
  HostTensor<T> k({c.B, c.H_kv, c.L, c.D}, c.k_order);
  HostTensor<T> text({c.B, c.H_q, c.S, c.D}, {0, 1, 2, 3});
  fill_normal(k, rng);
  fill_normal(text, rng);
  std::vector<uint8_t> mask(static_cast<size_t>(c.B * c.S), 1);
  std::bernoulli_distribution keep(0.7);
  if (c.with_mask) {
    for (auto& m : mask) m = keep(rng) ? 1 : 0;
  }
  std::vector<int32_t> sizes(static_cast<size_t>(c.B * c.L), 1);
  std::uniform_int_distribution<int32_t> size_of(1, 9);
  if (c.with_sizes) {
    for (auto& s : sizes) s = size_of(rng);
  }
  std::vector<int64_t> table;
  for (const auto& img : c.images) table.insert(table.end(), img.begin(), img.end());
  const float scale = 1.f / std::sqrt(static_cast<float>(c.D));

  Device<T> k_dev(k.data), text_dev(text.data);
  Device<uint8_t> mask_dev(mask);
  Device<int32_t> sizes_dev(sizes);
  Device<int64_t> images_dev(table);
  Device<float> out(static_cast<size_t>(c.B * c.L));

  lightkv_cuda::ScoreArgs args;
  args.k = describe(k, k_dev.ptr);
  args.text = describe(text, text_dev.ptr);
  args.images = images_dev.ptr;
  args.num_images = static_cast<int64_t>(c.images.size());
  if (c.with_mask) {
    args.text_mask = reinterpret_cast<const bool*>(mask_dev.ptr);
    args.text_mask_stride[0] = c.S;
    args.text_mask_stride[1] = 1;
  }
  if (c.with_sizes) {
    args.sizes = sizes_dev.ptr;
    args.sizes_stride[0] = c.L;
    args.sizes_stride[1] = 1;
  }
  args.scale = scale;
  args.text_capacity = text_rows >= 0 ? text_rows : args.num_images * c.S;
  args.importance = out.ptr;
  const std::vector<float> want = undefined ? std::vector<float>() : host_score(c, k, text, mask, sizes, scale);
  // The two passes (LIGHTKV_SCORE_PASSES=2), then one_pass_kernel where it applies
  // (LIGHTKV_SCORE_PASSES=1; rows of at most 2048 tokens, elsewhere both runs take the two passes).
  for (const bool one_pass : {false, true}) {
    setenv("LIGHTKV_SCORE_PASSES", one_pass ? "1" : "2", 1);
    const size_t bytes = lightkv_cuda::score_workspace_size(args);
    Device<char> workspace(bytes);
    SELFTEST_CUDA(lightkv_cuda::launch_score(args, workspace.ptr, bytes, nullptr));
    SELFTEST_CUDA(cudaDeviceSynchronize());
    const std::vector<float> got = out.download();
    const std::string name = c.name + (one_pass ? " (1 pass)" : "");
    if (undefined) {
      std::printf("score %-40s launched\n", name.c_str());
    } else {
      SELFTEST_CUDA(lightkv_cuda::launch_score(args, workspace.ptr, bytes, nullptr));
      const std::vector<float> again = out.download();
      expect(std::memcmp(got.data(), again.data(), got.size() * sizeof(float)) == 0, name + ": not deterministic");
      double worst = 0.0;
      for (size_t i = 0; i < want.size(); ++i) {
        worst = std::max(worst, std::abs(double(got[i]) - want[i]) / (1e-6 + std::abs(want[i])));
      }
      expect(worst < 2e-3, name + ": importance differs from the host oracle, worst relative error " +
                               std::to_string(worst));
      std::printf("score %-40s worst rel err %.3g\n", name.c_str(), worst);
    }
  }
  unsetenv("LIGHTKV_SCORE_PASSES");
}

// ---------------------------------------------------------------- merge

struct MergeCase {
  std::string name;
  int64_t B, H, L, D;
  std::vector<int64_t> window_sizes;  // one row's windows, same for every row (sum == L)
  double ratio;
  bool token_major_out;
  std::array<int, 4> k_order;
  int duplicates;  // tokens whose keys copy another token's (exact similarity ties)
};

struct MergeResult {
  std::vector<int32_t> sizes;
  std::vector<int64_t> index, assignment;
};

int64_t merge_count(double ratio, int64_t n) {
  return std::min(static_cast<int64_t>(std::floor(ratio * static_cast<double>(n) + 1e-6)), n / 2);
}

// merged_into[g] = flat id of the dst token g merges into, or -1.
template <typename T>
std::vector<int64_t> host_match(const MergeCase& c, const HostTensor<T>& k, const std::vector<int64_t>& tokens,
                                const std::vector<int64_t>& offsets) {
  auto feature = [&](int64_t g, int64_t f) { return double(k.at(g / c.L, f / c.D, g % c.L, f % c.D)); };
  const int64_t features = c.H * c.D;
  std::vector<int64_t> merged_into(static_cast<size_t>(c.B * c.L), -1);
  for (size_t w = 0; w + 1 < offsets.size(); ++w) {
    const int64_t start = offsets[w], n = offsets[w + 1] - start;
    const int64_t r = merge_count(c.ratio, n);
    if (r == 0) continue;
    const int64_t n_src = (n + 1) / 2, n_dst = n / 2;
    auto norm = [&](int64_t g) {
      double s = 0.0;
      for (int64_t f = 0; f < features; ++f) s += feature(g, f) * feature(g, f);
      return std::sqrt(s);
    };
    std::vector<double> score(static_cast<size_t>(n_src));
    std::vector<int64_t> best(static_cast<size_t>(n_src));
    for (int64_t i = 0; i < n_src; ++i) {
      const int64_t s = tokens[start + 2 * i];
      score[i] = -INFINITY;
      for (int64_t j = 0; j < n_dst; ++j) {
        const int64_t d = tokens[start + 2 * j + 1];
        double dot = 0.0;
        for (int64_t f = 0; f < features; ++f) dot = std::fma(feature(s, f), feature(d, f), dot);
        const double sim = dot / (norm(s) * norm(d) + 1e-8);
        if (sim > score[i]) {
          score[i] = sim;
          best[i] = j;
        }
      }
    }
    std::vector<int64_t> order(static_cast<size_t>(n_src));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
    for (int64_t q = 0; q < r; ++q) {
      const int64_t i = order[q];
      merged_into[tokens[start + 2 * i]] = tokens[start + 2 * best[i] + 1];
    }
  }
  return merged_into;
}

// Runs the case with `max_window` as the caller's bound on the window sizes (exact mode when at
// most 64, or at most 512 for little work; screened mode when unbounded: see merge.cu).
template <typename T>
void run_merge_case(const MergeCase& c, uint64_t seed, int64_t max_window) {
  if (!selected(c.name)) return;
  std::mt19937_64 rng(seed);
  HostTensor<T> k({c.B, c.H, c.L, c.D}, c.k_order), v({c.B, c.H, c.L, c.D}, {0, 1, 2, 3});
  fill_normal(k, rng);
  fill_normal(v, rng);
  std::uniform_int_distribution<int64_t> token_of(0, c.L - 1);
  for (int i = 0; i < c.duplicates; ++i) {
    const int64_t b = i % c.B, from = token_of(rng), to = token_of(rng);
    for (int64_t h = 0; h < c.H; ++h) {
      for (int64_t d = 0; d < c.D; ++d) k.data[k.offset(b, h, to, d)] = k.data[k.offset(b, h, from, d)];
    }
  }
  std::vector<float> importance(static_cast<size_t>(c.B * c.L));
  std::uniform_real_distribution<float> uniform(0.f, 1.f);
  for (auto& w : importance) w = uniform(rng) < 0.3f ? 0.f : uniform(rng);
  std::vector<int32_t> sizes(static_cast<size_t>(c.B * c.L));
  std::uniform_int_distribution<int32_t> size_of(1, 5);
  for (auto& s : sizes) s = size_of(rng);

  // Every row: the same window sizes, random members, each window in increasing l.
  std::vector<int64_t> tokens, offsets{0};
  int64_t kept = 0;
  for (int64_t n : c.window_sizes) kept += n - merge_count(c.ratio, n);
  for (int64_t b = 0; b < c.B; ++b) {
    std::vector<int64_t> perm(static_cast<size_t>(c.L));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    int64_t at = 0;
    for (int64_t n : c.window_sizes) {
      std::vector<int64_t> members(perm.begin() + at, perm.begin() + at + n);
      std::sort(members.begin(), members.end());
      for (int64_t l : members) tokens.push_back(b * c.L + l);
      at += n;
      offsets.push_back(static_cast<int64_t>(tokens.size()));
    }
  }

  Device<T> k_dev(k.data), v_dev(v.data);
  Device<float> importance_dev(importance);
  Device<int32_t> sizes_dev(sizes);
  Device<int64_t> tokens_dev(tokens), offsets_dev(offsets);
  const size_t out_count = static_cast<size_t>(c.B * c.H * kept * c.D);
  Device<T> k_out(out_count), v_out(out_count);
  Device<int32_t> sizes_out(static_cast<size_t>(c.B * kept));
  Device<int64_t> index(static_cast<size_t>(c.B * kept)), assignment(static_cast<size_t>(c.B * c.L));

  lightkv_cuda::MergeArgs args;
  args.k = describe(k, k_dev.ptr);
  args.v = describe(v, v_dev.ptr);
  args.metric = args.k;  // the default metric: k.permute(0, 2, 1, 3)
  args.metric.size[1] = c.L;
  args.metric.size[2] = c.H;
  args.metric.stride[1] = k.stride[2];
  args.metric.stride[2] = k.stride[1];
  args.importance = importance_dev.ptr;
  args.sizes = sizes_dev.ptr;
  args.window_tokens = tokens_dev.ptr;
  args.total_tokens = static_cast<int64_t>(tokens.size());
  args.window_offsets = offsets_dev.ptr;
  args.num_windows = static_cast<int64_t>(offsets.size()) - 1;
  args.ratio = c.ratio;
  args.kept = kept;
  args.max_window = max_window;
  for (lightkv_cuda::OutTensor4* out : {&args.k_out, &args.v_out}) {
    out->data = out == &args.k_out ? static_cast<void*>(k_out.ptr) : static_cast<void*>(v_out.ptr);
    const int64_t sizes4[4] = {c.B, c.H, kept, c.D};
    std::copy(sizes4, sizes4 + 4, out->size);
    const int64_t contiguous[4] = {c.H * kept * c.D, kept * c.D, c.D, 1};
    const int64_t token_major[4] = {kept * c.H * c.D, c.D, c.H * c.D, 1};
    std::copy(c.token_major_out ? token_major : contiguous, (c.token_major_out ? token_major : contiguous) + 4,
              out->stride);
  }
  args.sizes_out = sizes_out.ptr;
  args.index = index.ptr;
  args.assignment = assignment.ptr;
  const size_t bytes = lightkv_cuda::merge_workspace_size(args);
  Device<char> workspace(bytes);
  SELFTEST_CUDA(lightkv_cuda::launch_merge(args, workspace.ptr, bytes, nullptr));
  SELFTEST_CUDA(cudaDeviceSynchronize());
  const MergeResult got{sizes_out.download(), index.download(), assignment.download()};
  const std::vector<T> got_k = k_out.download(), got_v = v_out.download();
  // Again over a cleared workspace and outputs, in two parts: the decisions on one stream, the
  // values on another that waits for them by an event (as compress overlaps the decisions with
  // the scoring).
  cudaStream_t decide_stream = nullptr, value_stream = nullptr;
  cudaEvent_t decided = nullptr;
  SELFTEST_CUDA(cudaStreamCreateWithFlags(&decide_stream, cudaStreamNonBlocking));
  SELFTEST_CUDA(cudaStreamCreateWithFlags(&value_stream, cudaStreamNonBlocking));
  SELFTEST_CUDA(cudaEventCreateWithFlags(&decided, cudaEventDisableTiming));
  SELFTEST_CUDA(cudaMemset(workspace.ptr, 0xFF, bytes));
  SELFTEST_CUDA(cudaMemset(k_out.ptr, 0xFF, out_count * sizeof(T)));
  SELFTEST_CUDA(cudaMemset(v_out.ptr, 0xFF, out_count * sizeof(T)));
  SELFTEST_CUDA(cudaMemset(assignment.ptr, 0xFF, static_cast<size_t>(c.B * c.L) * sizeof(int64_t)));
  SELFTEST_CUDA(cudaMemset(index.ptr, 0xFF, static_cast<size_t>(c.B * kept) * sizeof(int64_t)));
  SELFTEST_CUDA(cudaMemset(sizes_out.ptr, 0xFF, static_cast<size_t>(c.B * kept) * sizeof(int32_t)));
  SELFTEST_CUDA(cudaDeviceSynchronize());
  SELFTEST_CUDA(lightkv_cuda::launch_merge_decisions(args, workspace.ptr, bytes, decide_stream));
  SELFTEST_CUDA(cudaEventRecord(decided, decide_stream));
  SELFTEST_CUDA(cudaStreamWaitEvent(value_stream, decided, 0));
  SELFTEST_CUDA(lightkv_cuda::launch_merge_values(args, workspace.ptr, bytes, value_stream));
  SELFTEST_CUDA(cudaDeviceSynchronize());
  SELFTEST_CUDA(cudaEventDestroy(decided));
  SELFTEST_CUDA(cudaStreamDestroy(value_stream));
  SELFTEST_CUDA(cudaStreamDestroy(decide_stream));
  const std::vector<T> again_k = k_out.download(), again_v = v_out.download();
  expect(std::memcmp(got_k.data(), again_k.data(), got_k.size() * sizeof(T)) == 0 &&
             std::memcmp(got_v.data(), again_v.data(), got_v.size() * sizeof(T)) == 0 &&
             got.assignment == assignment.download() && got.index == index.download() &&
             got.sizes == sizes_out.download(),
         c.name + ": not deterministic, or the decisions and values differ on two streams");

  // Host oracle: decisions, slots, then the weighted groups.
  const std::vector<int64_t> merged_into = host_match(c, k, tokens, offsets);
  MergeResult want{std::vector<int32_t>(static_cast<size_t>(c.B * kept), 0),
                   std::vector<int64_t>(static_cast<size_t>(c.B * kept), -1),
                   std::vector<int64_t>(static_cast<size_t>(c.B * c.L), -1)};
  std::vector<std::vector<int64_t>> members(static_cast<size_t>(c.B * kept));
  bool kept_matches = true;
  for (int64_t b = 0; b < c.B; ++b) {
    std::vector<int64_t> slot(static_cast<size_t>(c.L), -1);
    int64_t m = 0;
    for (int64_t l = 0; l < c.L; ++l) {
      if (merged_into[b * c.L + l] < 0) slot[l] = m++;
    }
    kept_matches = kept_matches && m == kept;
    if (m != kept) continue;
    for (int64_t l = 0; l < c.L; ++l) {
      const int64_t g = b * c.L + l;
      const int64_t anchor = merged_into[g] < 0 ? l : merged_into[g] - b * c.L;
      want.assignment[g] = slot[anchor];
      if (anchor == l) want.index[b * kept + slot[l]] = l;
      want.sizes[b * kept + slot[anchor]] += sizes[g];
      members[b * kept + slot[anchor]].push_back(g);
    }
  }
  expect(kept_matches, c.name + ": the oracle keeps a different number of tokens than expected");
  expect(got.index == want.index, c.name + ": index differs");
  expect(got.assignment == want.assignment, c.name + ": assignment differs");
  expect(got.sizes == want.sizes, c.name + ": sizes differ");

  double worst = 0.0;
  bool copies_exact = true;
  for (int tensor = 0; tensor < 2 && kept_matches; ++tensor) {
    const HostTensor<T>& x = tensor == 0 ? k : v;
    const std::vector<T>& out = tensor == 0 ? got_k : got_v;
    const int64_t* stride = (tensor == 0 ? args.k_out : args.v_out).stride;
    for (int64_t s = 0; s < c.B * kept; ++s) {
      const int64_t b = s / kept, m = s % kept;
      const auto& group = members[s];
      float weight = 0.f;
      for (int64_t g : group) weight += importance[g];
      for (int64_t h = 0; h < c.H; ++h) {
        for (int64_t d = 0; d < c.D; ++d) {
          const T value = out[b * stride[0] + h * stride[1] + m * stride[2] + d * stride[3]];
          if (group.size() == 1) {
            const T source = x.data[x.offset(b, h, group[0] % c.L, d)];
            copies_exact = copies_exact && std::memcmp(&value, &source, sizeof(T)) == 0;
            continue;
          }
          float weighted = 0.f, plain = 0.f;
          for (int64_t g : group) {
            const float xv = x.at(b, h, g % c.L, d);
            weighted = std::fma(importance[g], xv, weighted);
            plain += xv;
          }
          const float expected = weight == 0.f ? plain / float(group.size()) : weighted / weight;
          worst = std::max(worst, std::abs(double(to_f(value)) - expected) / (1.0 + std::abs(expected)));
        }
      }
    }
  }
  expect(copies_exact, c.name + ": tokens without merged srcs are not copied bitwise");
  expect(worst <= tolerance<T>(), c.name + ": merged values differ, worst error " + std::to_string(worst));
  const std::string bound = max_window == INT64_MAX ? "no bound" : "bound " + std::to_string(max_window);
  std::printf("merge %-28s %-9s kept %lld/%lld, worst err %.3g\n", c.name.c_str(), bound.c_str(),
              static_cast<long long>(kept), static_cast<long long>(c.L), worst);
}

// With the true bound (exact mode for the windows it allows) and with none (screened mode).
template <typename T>
void run_merge_case(const MergeCase& c, uint64_t seed) {
  const int64_t largest = *std::max_element(c.window_sizes.begin(), c.window_sizes.end());
  if (largest <= 512) run_merge_case<T>(c, seed, largest);
  run_merge_case<T>(c, seed, INT64_MAX);
}

}  // namespace

int main(int argc, char** argv) {
  // A line per case as it passes, also into a pipe or file: a run cut short shows how far it got.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  bool small = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--small") == 0) {
      small = true;
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
      g_only = argv[++i];
    } else {
      std::fprintf(stderr, "usage: lightkv_cuda_selftest [--small] [--only TEXT]\n");
      return 2;
    }
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "lightkv_cuda_selftest: no CUDA device\n");
    return 2;
  }
  // Score: uneven images, masked and empty text, GQA, sizes, strided k, head dims off 16.
  const ScoreCase score_small{"fp32 gqa masked sizes", 2, 2, 4, 150, 37, 72,
                              {{0, 10, 100, 3, 30}, {1, 0, 150, 0, 37}, {0, 120, 30, 0, 0}},
                              true, true, {0, 2, 1, 3}};
  run_score_case<float>(score_small, 1);
  ScoreCase score_small_bf16 = score_small;  // the tensor-core path, with a head-dim tail
  score_small_bf16.name = "bf16 gqa masked sizes";
  run_score_case<__nv_bfloat16>(score_small_bf16, 5);
  run_score_case<__half>({"fp16 one image per row", 3, 1, 3, 49, 5, 64,
                          {{0, 0, 49, 0, 5}, {1, 0, 49, 0, 5}, {2, 0, 49, 0, 5}}, false, false, {0, 1, 2, 3}},
                         2);
  // More images than row_stats_kernel tables itself (8): image_offsets_kernel builds the tables.
  // Then the statistics sized by the caller's text_rows (the API's exact count, 53 rows, where
  // I * S is 120), and by a bound below it, which must keep every access in bounds.
  ScoreCase ten_images{"bf16 ten images", 2, 2, 4, 100, 12, 32,
                       {{0, 0, 20, 0, 12}, {0, 20, 20, 3, 5}, {0, 40, 20, 0, 0}, {0, 60, 20, 11, 1},
                        {0, 80, 20, 2, 7}, {1, 0, 17, 0, 12}, {1, 17, 23, 4, 4}, {1, 40, 1, 6, 6},
                        {1, 41, 50, 0, 3}, {1, 91, 9, 9, 3}},
                       true, false, {0, 1, 2, 3}};
  run_score_case<__nv_bfloat16>(ten_images, 6);
  ten_images.name = "bf16 ten images, exact text rows";
  run_score_case<__nv_bfloat16>(ten_images, 6, false, 53);
  ten_images.name = "bf16 ten images, text rows past the bound";
  run_score_case<__nv_bfloat16>(ten_images, 6, false, 20);
  // Four images over the same 256 tokens: 16 column tiles, more than disjoint images could have.
  run_score_case<__nv_bfloat16>({"bf16 overlapping images", 1, 2, 4, 256, 5, 32,
                                 {{0, 0, 256, 0, 5}, {0, 0, 256, 0, 5}, {0, 0, 256, 0, 5}, {0, 0, 256, 0, 5}},
                                 false, false, {0, 1, 2, 3}},
                                7, /*overlapping=*/true);
  // Tensor-core staging: a head of two staging steps; then one split per pass over a short image
  // (long k and text rows bound the tiles high), so the operand a pass keeps fixed stays staged:
  // the queries over 4 column tiles in row_stats_kernel, the keys over 2 row tiles in column_mass_kernel.
  run_score_case<__nv_bfloat16>({"bf16 D=160", 1, 2, 4, 130, 40, 160, {{0, 0, 130, 0, 40}}, true, true, {0, 1, 2, 3}},
                                8);
  run_score_case<__half>({"fp16 operands kept staged", 1, 1, 2, 33000, 20000, 24, {{0, 100, 200, 50, 64}}, true,
                          true, {0, 1, 2, 3}},
                         9);
  if (!small) {
    run_score_case<__nv_bfloat16>({"bf16 D=256 long", 1, 2, 8, 3000, 50, 256,
                                   {{0, 0, 2880, 0, 50}, {0, 2880, 120, 10, 20}}, true, false, {0, 1, 2, 3}},
                                  3);
  }
  run_score_case<float>({"fp32 single token image", 1, 1, 1, 1, 1, 8, {{0, 0, 1, 0, 1}}, false, true, {0, 1, 2, 3}},
                        4);
  // Long rows bound column_mass_kernel's items above 2048: each block takes a run of 3, across the
  // images' 6 column tiles and the 2 KV heads, reusing the staged queries within an image.
  run_score_case<__nv_bfloat16>({"bf16 runs of column items", 1, 2, 2, 140000, 14, 16,
                                 {{0, 0, 130, 0, 9}, {0, 130, 170, 9, 5}}, true, true, {0, 1, 2, 3}},
                                26);
  // A row of 131200 tokens bounds them at 4104: runs of 4 (the shortest would be 3), fitted to whole
  // waves (column_run).
  run_score_case<__nv_bfloat16>({"bf16 runs of column items fitted to waves", 1, 2, 2, 131200, 14, 16,
                                 {{0, 0, 130, 0, 9}, {0, 130, 170, 9, 5}}, true, true, {0, 1, 2, 3}},
                                31);
  // 17 row tiles in at most 16 row ranges (some of 2 row tiles) over 9 column ranges: the rows'
  // statistics are combined once, between the passes (row_finals_kernel).
  ScoreCase rows_combined{"bf16 rows combined between passes", 1, 1, 17, 520, 64, 32, {{0, 0, 520, 0, 64}},
                          true, true, {0, 1, 2, 3}};
  run_score_case<__nv_bfloat16>(rows_combined, 27);
  rows_combined.name = "bf16 rows combined, text rows past the bound";
  run_score_case<__nv_bfloat16>(rows_combined, 27, false, 30);
  // column_mass_kernel items of up to 4 row tiles on the pipelined walk (16-bit, D <= 128), which
  // sets up row tile s + 2 and stages s + 1's queries while it multiplies s: 51 row tiles in 16
  // ranges (the last 3 empty), the rows' column-range pairs combined inline, a head-dim tail, an
  // image with no text; then the same depth with the rows combined between the passes.
  run_score_case<__nv_bfloat16>({"bf16 deep column items, D=72", 2, 1, 17, 400, 192, 72,
                                 {{0, 0, 400, 0, 192}, {1, 0, 64, 0, 0}, {1, 64, 300, 0, 100}}, true, true,
                                 {0, 1, 2, 3}},
                                28);
  run_score_case<__half>({"fp16 deep column items, rows combined", 1, 1, 17, 1000, 192, 32, {{0, 0, 1000, 0, 192}},
                          true, true, {0, 1, 2, 3}},
                         29);
  // One pass over 18 column tiles: clusters of 9 blocks of 2 tiles each (the other cases with
  // at most 16 column tiles per row take clusters of blocks of 1 tile).
  run_score_case<__nv_bfloat16>({"bf16 one pass, 18 column tiles", 1, 1, 2, 1100, 9, 16, {{0, 0, 1100, 0, 9}},
                                 true, true, {0, 1, 2, 3}},
                                10);

  // Merge: empty, single and uneven windows, ties, token-major output, large windows.
  const std::vector<int64_t> uneven{0, 1, 2, 3, 17, 64, 130, 83};  // sums to 300
  run_merge_case<float>({"fp32 uneven windows", 3, 2, 300, 40, uneven, 0.5, false, {0, 1, 2, 3}, 40}, 11);
  run_merge_case<__half>({"fp16 token-major io", 2, 4, 300, 64, uneven, 0.37, true, {0, 2, 1, 3}, 10}, 12);
  if (!small) {
    run_merge_case<__nv_bfloat16>({"bf16 one window 2500", 2, 2, 2500, 128, {2500}, 0.5, false, {0, 1, 2, 3}, 50},
                                  13);
  }
  run_merge_case<__nv_bfloat16>({"bf16 one window 300", 1, 2, 300, 64, {300}, 0.5, false, {0, 1, 2, 3}, 8}, 16);
  // Windows as large as exact mode takes: 256 srcs, 16 exact_select_kernel blocks per window, 8
  // dsts per lane.
  run_merge_case<__half>({"fp16 windows of 512", 1, 1, 1023, 32, {512, 511}, 0.5, false, {0, 1, 2, 3}, 6}, 25);
  run_merge_case<__half>({"fp16 uneven small windows", 2, 2, 200, 24, {0, 1, 2, 3, 17, 64, 61, 52}, 0.5, true,
                          {0, 2, 1, 3}, 12},
                         24);
  run_merge_case<float>({"fp32 ratio 0", 2, 2, 64, 16, {16, 16, 16, 16}, 0.0, false, {0, 1, 2, 3}, 0}, 14);
  run_merge_case<float>({"fp32 odd D scalar path", 1, 3, 99, 13, {33, 33, 33}, 0.9, false, {0, 1, 2, 3}, 5}, 15);
  // Exact mode with more features than 16 splits of one step (20 steps: 10 splits of 2), so each
  // exact_dots_kernel item streams 4 batches through its lane's ring of 3.
  run_merge_case<float>({"fp32 exact items of 2 steps", 1, 8, 72, 160, {36, 36}, 0.5, false, {0, 1, 2, 3}, 0}, 30);
  // Screening paths: one feature chunk with dst ranges (direct), LLaVA-like small windows with
  // many features (partial sums over feature splits), exact ties everywhere (every src falls
  // back to the exact scan of all its dsts), and 16-byte staging of a float32 metric.
  run_merge_case<__nv_bfloat16>({"bf16 dst ranges", 1, 1, 300, 32, {300}, 0.5, false, {0, 1, 2, 3}, 8}, 17);
  // Four 36-token windows per row over 16 x 64 features, in feature splits (and the knobs below).
  const auto feature_split_case = [](const char* name) {
    run_merge_case<__nv_bfloat16>({name, 2, 16, 144, 64, {36, 36, 36, 36}, 0.5, false, {0, 1, 2, 3}, 6}, 18);
  };
  feature_split_case("bf16 feature splits");
  // The same windows as 3 x 3 block groups (forced: too few windows to pick them), on the float64
  // tensor cores with src blocks stacked in mma.m16n8k4 and one by one (LIGHTKV_EXACT_MMA=8), then
  // on the 16-bit ones (the groups' default: screened sums), rechecked where they leave a decision
  // open and everywhere (LIGHTKV_EXACT_DOTS=recheck), and as block pairs; tied keys rechecked.
  setenv("LIGHTKV_EXACT_GROUP", "3", 1);
  setenv("LIGHTKV_EXACT_DOTS", "float64", 1);
  feature_split_case("bf16 stacked src blocks");
  setenv("LIGHTKV_EXACT_MMA", "8", 1);
  feature_split_case("bf16 src blocks one by one");
  unsetenv("LIGHTKV_EXACT_MMA");
  unsetenv("LIGHTKV_EXACT_DOTS");
  feature_split_case("bf16 screened sums, groups");
  setenv("LIGHTKV_EXACT_DOTS", "recheck", 1);
  feature_split_case("bf16 screened sums, all rechecked");
  unsetenv("LIGHTKV_EXACT_GROUP");
  setenv("LIGHTKV_EXACT_DOTS", "screened", 1);
  run_merge_case<__half>({"fp16 screened sums, pairs, tied keys", 1, 2, 128, 16, {64, 64}, 0.5, false, {0, 1, 2, 3},
                          4000},
                         19);
  unsetenv("LIGHTKV_EXACT_DOTS");
  run_merge_case<__half>({"fp16 tied keys", 1, 2, 128, 16, {64, 64}, 0.5, false, {0, 1, 2, 3}, 4000}, 19);
  run_merge_case<float>({"fp32 vector staging", 2, 2, 100, 32, {50, 50}, 0.5, false, {0, 1, 2, 3}, 4}, 20);
  // Slots and groups: more rows than blocks (row_groups_kernel loops), rows of group_row's three
  // sizes (up to 1024, 2048 and 4096 tokens), and rows longer than it takes (the general path:
  // device scan, radix sort).
  run_merge_case<__half>({"fp16 five rows", 5, 2, 64, 16, {16, 16, 16, 16}, 0.5, false, {0, 1, 2, 3}, 2}, 21);
  run_merge_case<__half>({"fp16 rows of 2000", 2, 1, 2000, 16, std::vector<int64_t>(20, 100), 0.5, false,
                          {0, 1, 2, 3}, 10},
                         23);
  run_merge_case<float>({"fp32 rows of 3000", 1, 1, 3000, 8, std::vector<int64_t>(30, 100), 0.5, false,
                         {0, 1, 2, 3}, 20},
                        29);
  run_merge_case<float>({"fp32 rows of 4200", 2, 1, 4200, 8, std::vector<int64_t>(42, 100), 0.5, false,
                         {0, 1, 2, 3}, 30},
                        22);

  if (g_cases_run == 0) {
    std::fprintf(stderr, "lightkv_cuda_selftest: no case is named like '%s'\n", g_only.c_str());
    return 2;
  }
  if (g_failures != 0) {
    std::fprintf(stderr, "lightkv_cuda_selftest: %d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("lightkv_cuda_selftest: all checks passed\n");
  return 0;
}
