// Device code shared by the CUDA attention kernels (attention_fwd.cu, attention_bwd.cu).
//
// A block of 128 threads works on tiles held in shared memory: a block-wide matrix product
// (block_gemm) on tensor cores (WMMA 16x16x16, HMMA in the SASS) for float16/bfloat16 and on
// plain FMAs for float32, always accumulating in float32, and element-wise softmax steps where a
// group of 128/BQ consecutive threads owns one query row. Global offsets are int64; tiles at the
// ends of the sequences and of the head dim are zero-filled, so odd lengths and head dims that
// are not a multiple of 16 run through the same code (head dims are padded to 32, 64, 128, 256).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../common/cuda_utils.cuh"

namespace reuse_core {
namespace cuda {
namespace attn {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// Tile sizes per storage type and padded head dim: shared memory stays under the 163 KiB an
// sm_80 block may opt into (sm_90 allows 227 KiB).
template <typename X, int D>
struct FwdTiles {
  static constexpr bool k16 = !std::is_same<X, float>::value;
  static constexpr int BQ = k16 ? (D <= 128 ? 64 : 32) : (D <= 128 ? 32 : 16);
  static constexpr int BK = k16 ? (D <= 128 ? 64 : 32) : 32;
};

template <typename X, int D>
struct BwdTiles {
  static constexpr bool k16 = !std::is_same<X, float>::value;
  static constexpr int BQ = k16 ? (D <= 128 ? 32 : 16) : (D <= 64 ? 32 : 16);
  static constexpr int BK = k16 ? (D <= 128 ? 64 : 32) : (D <= 128 ? 32 : 16);
};

constexpr size_t kAlign = 128;  // WMMA wants 32-byte aligned tiles; 128 keeps them on their own lines

__host__ __device__ constexpr size_t aligned_bytes(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Carves typed arrays out of dynamic shared memory, each kAlign-aligned.
struct SmemCarve {
  char* p;
  template <typename T>
  __device__ T* take(size_t n) {
    T* r = reinterpret_cast<T*>(p);
    p += aligned_bytes(n * sizeof(T));
    return r;
  }
};

// Copies rows [r0, r0 + rows) of a (L, d_real) row-major matrix into a (rows, D) tile, zero
// where the row is past L or the column past d_real (and, with kFinite, where a value is NaN or
// inf).
template <typename X, int D, bool kFinite = false>
__device__ __forceinline__ void load_tile(X* dst, const X* src, int64_t r0, int rows, int64_t L, int d_real) {
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int r = i / D, c = i % D;
    const int64_t row = r0 + r;
    const X x = (row < L && c < d_real) ? src[row * d_real + c] : from_float<X>(0.f);
    dst[i] = kFinite && !isfinite(to_float(x)) ? from_float<X>(0.f) : x;
  }
}

template <typename T>
__device__ __forceinline__ void fill(T* p, int n, T v) {
  for (int i = threadIdx.x; i < n; i += kThreads) p[i] = v;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr bool kArchHasMma = true;  // WMMA for both float16 and bfloat16
#else
constexpr bool kArchHasMma = false;
#endif

// C (M x N, float, row-major, ldc) = or += op(A) op(B), op(A) M x K, op(B) K x N, A and B in
// shared memory. kTA: A is stored K x M row-major (op(A) = its transpose), else M x K; kTB: B
// is stored N x K row-major, else K x N. Ends without a barrier: callers sync before reading C.
template <bool kTA, bool kTB, int M, int N, int K, typename X>
__device__ __forceinline__ void block_gemm(const X* A, int lda, const X* B, int ldb, float* C, int ldc, bool accumulate) {
  if constexpr (kArchHasMma && !std::is_same<X, float>::value) {
    namespace wmma = nvcuda::wmma;
    using LA = typename std::conditional<kTA, wmma::col_major, wmma::row_major>::type;
    using LB = typename std::conditional<kTB, wmma::col_major, wmma::row_major>::type;
    static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "WMMA tiles are 16x16x16");
    const int warp = threadIdx.x >> 5;
    for (int f = warp; f < (M / 16) * (N / 16); f += kWarps) {
      const int i = f / (N / 16), j = f % (N / 16);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* c = C + i * 16 * ldc + j * 16;
      if (accumulate)
        wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
      else
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int k = 0; k < K / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, X, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, X, LB> b;
        wmma::load_matrix_sync(a, kTA ? A + k * 16 * lda + i * 16 : A + i * 16 * lda + k * 16, lda);
        wmma::load_matrix_sync(b, kTB ? B + j * 16 * ldb + k * 16 : B + k * 16 * ldb + j * 16, ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
    }
  } else {
    for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
      const int m = idx / N, n = idx % N;
      float s = accumulate ? C[m * ldc + n] : 0.f;
#pragma unroll 8
      for (int k = 0; k < K; ++k) {
        const float a = to_float(kTA ? A[k * lda + m] : A[m * lda + k]);
        const float b = to_float(kTB ? B[n * ldb + k] : B[k * ldb + n]);
        s = fmaf(a, b, s);
      }
      C[m * ldc + n] = s;
    }
  }
}

// Whether key j is masked for query i (key past Lk, causal, or ignored by the padding mask).
__device__ __forceinline__ bool masked(int64_t i, int64_t j, int64_t Lk, bool causal, const bool* kpm) {
  return j >= Lk || (causal && j > i) || (kpm != nullptr && kpm[j]);
}

// Calls f(std::integral_constant<int, D>{}) with D the head dim d padded to 32, 64, 128 or 256.
template <class F>
void visit_head_dim(int d, F&& f) {
  if (d <= 32) return f(std::integral_constant<int, 32>{});
  if (d <= 64) return f(std::integral_constant<int, 64>{});
  if (d <= 128) return f(std::integral_constant<int, 128>{});
  f(std::integral_constant<int, 256>{});
}

struct Params {
  const void *q, *k, *v;
  const bool* kpm;  // (B, Lk) or null
  void* out;        // forward: (B, H, Lq, d) in the input dtype
  float* stats;     // (2, B, H, Lq): row max, log of the row sum (m = +inf: every key masked)
  // backward
  const void *dout;
  const float* di;  // (B, H, Lq): rowsum(dO * O)
  float *dq, *dk, *dv;  // float32 accumulators: dq (B, H, Lq, d), dk/dv per query head (B, H, Lk, d)
  int64_t B, H, Hkv, Lq, Lk;
  int d;
  bool causal;
  float scale;
};

// Launches kernel(p) on the current stream with `smem` bytes of dynamic shared memory (above
// the default 48 KiB it must be opted into), one block per tile, and checks the launch.
template <class Kernel>
void launch(Kernel kernel, size_t smem, int64_t blocks, const Params& p, const char* what) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  TORCH_CHECK(blocks < (int64_t(1) << 31), what, ": too many tiles for one launch");
  kernel<<<unsigned(blocks), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attn
}  // namespace cuda
}  // namespace reuse_core
