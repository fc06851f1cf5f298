// dtype dispatch for the CUDA kernels: float32, float16, bfloat16 (math in float32).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace reuse_core {
namespace cuda {

// Calls f(X{}) with X the CUDA storage type of st; a clear error for anything else.
template <class F>
void visit_cuda_dtype(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, what, " on CUDA must be float32, float16 or bfloat16, got ", st);
  }
}

template <typename X>
inline bool aligned_to(const void* p, int elems) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(X) * elems) == 0;
}

}  // namespace cuda
}  // namespace reuse_core
