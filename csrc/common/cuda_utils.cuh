// Small device helpers shared by the CUDA kernels: dtype conversion, vector loads and block
// reductions (one block works on one row).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

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

// Loads VEC consecutive elements as floats, in 16-byte (or 8-byte) accesses when VEC elements
// fill them; p must then be aligned to VEC elements.
template <int VEC, typename X>
__device__ __forceinline__ void load_vec(const X* p, float (&out)[VEC]) {
  constexpr int bytes = VEC * int(sizeof(X));
  if constexpr (bytes % 16 == 0 || bytes == 8) {
    using W = typename std::conditional<bytes % 16 == 0, uint4, uint2>::type;
    constexpr int per = int(sizeof(W) / sizeof(X));
#pragma unroll
    for (int c = 0; c < VEC / per; ++c) {
      union { W w; X x[per]; } u;
      u.w = reinterpret_cast<const W*>(p)[c];
#pragma unroll
      for (int j = 0; j < per; ++j) out[c * per + j] = to_float(u.x[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_float(p[j]);
  }
}

template <int VEC, typename X>
__device__ __forceinline__ void store_vec(X* p, const float (&in)[VEC]) {
  constexpr int bytes = VEC * int(sizeof(X));
  if constexpr (bytes % 16 == 0 || bytes == 8) {
    using W = typename std::conditional<bytes % 16 == 0, uint4, uint2>::type;
    constexpr int per = int(sizeof(W) / sizeof(X));
#pragma unroll
    for (int c = 0; c < VEC / per; ++c) {
      union { W w; X x[per]; } u;
#pragma unroll
      for (int j = 0; j < per; ++j) u.x[j] = from_float<X>(in[c * per + j]);
      reinterpret_cast<W*>(p)[c] = u.w;
    }
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

// A row is worked on by one warp (kWarp, rows up to kWarpRowMax elements: no block barriers,
// several rows per block) or by a whole block (long rows).
constexpr int64_t kWarpRowMax = 4096;
constexpr int kWarpsPerBlock = 8;

template <bool kWarp>
struct RowGroup {
  __device__ __forceinline__ int rank() const { return kWarp ? int(threadIdx.x & 31) : int(threadIdx.x); }
  __device__ __forceinline__ int size() const { return kWarp ? 32 : int(blockDim.x); }
  __device__ __forceinline__ int slot() const { return kWarp ? int(threadIdx.x >> 5) : 0; }
  __device__ __forceinline__ int64_t first_row() const {
    return kWarp ? int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5) : int64_t(blockIdx.x);
  }
  __device__ __forceinline__ int64_t row_stride() const {
    return kWarp ? int64_t(gridDim.x) * (blockDim.x >> 5) : int64_t(gridDim.x);
  }
  __device__ __forceinline__ float sum(float v, float* smem) const { return kWarp ? warp_sum(v) : block_sum(v, smem); }
  __device__ __forceinline__ float max(float v, float* smem) const { return kWarp ? warp_max(v) : block_max(v, smem); }
  __device__ __forceinline__ void sync() const {
    if (kWarp) __syncwarp(); else __syncthreads();
  }
};

// Threads per row-block: enough for VEC-wide chunks of the row, 128..1024, a multiple of 32.
inline int row_block_threads(int64_t cols, int vec) {
  int64_t t = (cols / vec + 31) / 32 * 32;
  return int(t < 128 ? 128 : t > 1024 ? 1024 : t);
}

}  // namespace cuda
}  // namespace reuse_core
