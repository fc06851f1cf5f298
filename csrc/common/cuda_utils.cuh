// Small device helpers shared by the CUDA kernels: dtype conversion, vector loads and block
// reductions (one block works on one row).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace reuse_core {
namespace cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename X>
__device__ __forceinline__ X from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Loads VEC consecutive elements as floats. VEC = 4 needs p aligned to 4 elements.
template <int VEC, typename X>
__device__ __forceinline__ void load_vec(const X* p, float (&out)[VEC]) {
  if constexpr (VEC == 4 && sizeof(X) == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  } else if constexpr (VEC == 4 && sizeof(X) == 2) {
    union { uint2 u; X h[4]; } v;
    v.u = *reinterpret_cast<const uint2*>(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = to_float(v.h[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_float(p[j]);
  }
}

template <int VEC, typename X>
__device__ __forceinline__ void store_vec(X* p, const float (&in)[VEC]) {
  if constexpr (VEC == 4 && sizeof(X) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  } else if constexpr (VEC == 4 && sizeof(X) == 2) {
    union { uint2 u; X h[4]; } v;
#pragma unroll
    for (int j = 0; j < 4; ++j) v.h[j] = from_float<X>(in[j]);
    *reinterpret_cast<uint2*>(p) = v.u;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = from_float<X>(in[j]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block, returned to every thread. `smem` holds 32 floats; blockDim.x is a
// multiple of 32. Ends with a barrier, so smem can be reused right after.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

__device__ __forceinline__ float block_max(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : -INFINITY;
  v = warp_max(v);
  __syncthreads();
  return v;
}

// Threads per row-block: enough for VEC-wide chunks of the row, 128..1024, a multiple of 32.
inline int row_block_threads(int64_t cols, int vec) {
  int64_t t = (cols / vec + 31) / 32 * 32;
  return int(t < 128 ? 128 : t > 1024 ? 1024 : t);
}

}  // namespace cuda
}  // namespace reuse_core
