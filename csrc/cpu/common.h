// Argument checks shared by the CPU kernels of lightkv.
#pragma once

#include <ATen/ATen.h>


namespace lightkv_cpu {

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lightkv::", op, ": ", name, " must be a CPU tensor, got ",
              t.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op,
                        const char* name) {
  TORCH_CHECK(t.scalar_type() == expected, "lightkv::", op, ": ", name, " must be ", expected,
              ", got ", t.scalar_type());
}

inline void check_token_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "lightkv::", op,
              ": ", name, " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op,
                        const char* name) {
  TORCH_CHECK(t.sizes() == expected, "lightkv::", op, ": ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

}  // namespace lightkv_cpu
