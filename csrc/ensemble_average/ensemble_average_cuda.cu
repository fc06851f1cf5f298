// CUDA ensemble_average: one block per row. Forward: each member's logsumexp by a block
// reduction, then one sweep over the classes that combines the K members. Backward: per member
// a reduction (<g, p_k> and friends) and a sweep that writes the member's gradient; the
// weights' gradient is written per row and summed over rows by the host-side glue.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/cuda_dispatch.h"
#include "../common/cuda_utils.cuh"
#include "../ops.h"
#include "ensemble_average_checks.h"

namespace reuse_core {
namespace cuda {
namespace {

constexpr int kMaxListMembers = 64;  // more members in a list are stacked first (a copy)

struct EnsArgs {
  const void* members[kMaxListMembers];
  void* grads[kMaxListMembers];
  const void* stacked;  // non-null: member k starts at stacked + k * rows * C
  void* grad_stacked;
  const float* weights;  // (K,), raw (not normalised)
  int64_t K, C, rows;
  int mode;
  void* out;          // forward: (rows, C) in Y
  float* lse;         // (K, rows)
  const void* grad;   // backward: (rows, C) in X
  const float* y;     // backward: the output in float32
  float* dw_rows;     // backward: (rows, K)
};

template <typename X>
__device__ __forceinline__ const X* member_row(const EnsArgs& a, int64_t k, int64_t r) {
  const X* base = a.stacked ? static_cast<const X*>(a.stacked) + k * a.rows * a.C : static_cast<const X*>(a.members[k]);
  return base + r * a.C;
}
template <typename X>
__device__ __forceinline__ X* grad_row(const EnsArgs& a, int64_t k, int64_t r) {
  X* base = a.grad_stacked ? static_cast<X*>(a.grad_stacked) + k * a.rows * a.C : static_cast<X*>(a.grads[k]);
  return base + r * a.C;
}

// sum of the weights, with the device-side checks that would need a host sync elsewhere.
__device__ __forceinline__ float weight_sum(const EnsArgs& a) {
  float sum = 0.f;
  for (int64_t k = 0; k < a.K; ++k) {
    CUDA_KERNEL_ASSERT(a.weights[k] >= 0.f && "ensemble_average: weights must be non-negative");
    sum += a.weights[k];
  }
  CUDA_KERNEL_ASSERT(sum > 0.f && "ensemble_average: weights must have a positive sum");
  return sum;
}

// logsumexp of one member row over the block.
template <typename X, int VEC>
__device__ float row_lse(const X* z, int64_t n, float* smem) {
  float m = -INFINITY, s = 0.f;
  for (int64_t i = int64_t(threadIdx.x) * VEC; i < n; i += int64_t(blockDim.x) * VEC) {
    float x[VEC];
    load_vec<VEC>(z + i, x);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (x[j] > m) { s *= __expf(m - x[j]); m = x[j]; }
      if (x[j] > -INFINITY) s += __expf(x[j] - m);
    }
  }
  const float M = block_max(m, smem);
  const float S = block_sum(m > -INFINITY ? s * __expf(m - M) : 0.f, smem);
  return M > -INFINITY ? M + __logf(S) : -INFINITY;
}

template <typename X, typename Y, int VEC>
__global__ void ensemble_forward_kernel(EnsArgs a) {
  extern __shared__ float lse_s[];  // K
  __shared__ float smem[32];
  const float inv_wsum = 1.f / weight_sum(a);
  const int64_t n = a.C;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    for (int64_t k = 0; k < a.K; ++k) {
      const float l = a.mode == kLogits ? 0.f : row_lse<X, VEC>(member_row<X>(a, k, r), n, smem);
      if (threadIdx.x == 0) { lse_s[k] = l; a.lse[k * a.rows + r] = l; }
    }
    __syncthreads();
    Y* out = static_cast<Y*>(a.out) + r * n;
    for (int64_t i = int64_t(threadIdx.x) * VEC; i < n; i += int64_t(blockDim.x) * VEC) {
      float acc[VEC], mx[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) { acc[j] = 0.f; mx[j] = -INFINITY; }
      for (int64_t k = 0; k < a.K; ++k) {
        const float w = a.weights[k] * inv_wsum, l = lse_s[k];
        if (w == 0.f || l == -INFINITY) continue;  // no contribution, no 0 * (-inf)
        float z[VEC];
        load_vec<VEC>(member_row<X>(a, k, r) + i, z);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (a.mode == kLogits) {
            acc[j] += w * z[j];
          } else if (a.mode == kProbs) {
            acc[j] += w * __expf(z[j] - l);
          } else {  // online logsumexp over members of log w + z - lse
            const float x = __logf(w) + z[j] - l;
            if (x > mx[j]) { acc[j] *= __expf(mx[j] - x); mx[j] = x; }
            if (x > -INFINITY) acc[j] += __expf(x - mx[j]);
          }
        }
      }
      if (a.mode == kLogProbs) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] = mx[j] > -INFINITY ? mx[j] + __logf(acc[j]) : -INFINITY;
      }
      store_vec<VEC>(out + i, acc);
    }
    __syncthreads();
  }
}

template <typename X, int VEC>
__global__ void ensemble_backward_kernel(EnsArgs a) {
  __shared__ float smem[32];
  const float inv_wsum = 1.f / weight_sum(a);
  const int64_t n = a.C;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const X* g = static_cast<const X*>(a.grad) + r * n;
    const float* y = a.y + r * n;
    for (int64_t k = 0; k < a.K; ++k) {
      const X* z = member_row<X>(a, k, r);
      X* dz = grad_row<X>(a, k, r);
      const float w = a.weights[k] * inv_wsum, l = a.lse[k * a.rows + r];
      // Pass A: the member's reductions. logits: <g, z - y>; probs: <g, p>, <g, p - y>;
      // log_probs: <g, e>, <g, e - 1> with e = p / exp(y) (0 where y = -inf).
      float r1 = 0.f, r2 = 0.f;
      for (int64_t i = int64_t(threadIdx.x) * VEC; i < n; i += int64_t(blockDim.x) * VEC) {
        float zv[VEC], gv[VEC], yv[VEC];
        load_vec<VEC>(z + i, zv);
        load_vec<VEC>(g + i, gv);
        load_vec<VEC>(y + i, yv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (a.mode == kLogits) {
            const float d = zv[j] - yv[j];
            if (d == d) r2 += gv[j] * d;  // skip inf - inf
          } else if (a.mode == kProbs) {
            const float p = l == -INFINITY ? 0.f : __expf(zv[j] - l);
            r1 += gv[j] * p;
            r2 += gv[j] * (p - yv[j]);
          } else {
            const float e = (l == -INFINITY || yv[j] == -INFINITY) ? 0.f : __expf(zv[j] - l - yv[j]);
            r1 += gv[j] * e;
            r2 += gv[j] * (e - 1.f);
          }
        }
      }
      const float R1 = a.mode == kLogits ? 0.f : block_sum(r1, smem);
      const float R2 = block_sum(r2, smem);
      if (threadIdx.x == 0) a.dw_rows[r * a.K + k] = R2 * inv_wsum;
      // Pass B: the member's gradient (0 for a zero weight).
      for (int64_t i = int64_t(threadIdx.x) * VEC; i < n; i += int64_t(blockDim.x) * VEC) {
        float zv[VEC], gv[VEC], yv[VEC], d[VEC];
        load_vec<VEC>(z + i, zv);
        load_vec<VEC>(g + i, gv);
        if (a.mode == kLogProbs) load_vec<VEC>(y + i, yv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (w == 0.f) {
            d[j] = 0.f;
          } else if (a.mode == kLogits) {
            d[j] = w * gv[j];
          } else if (a.mode == kProbs) {
            const float p = l == -INFINITY ? 0.f : __expf(zv[j] - l);
            d[j] = w * p * (gv[j] - R1);
          } else {
            const float p = l == -INFINITY ? 0.f : __expf(zv[j] - l);
            const float e = (l == -INFINITY || yv[j] == -INFINITY) ? 0.f : __expf(zv[j] - l - yv[j]);
            d[j] = w * (e * gv[j] - p * R1);
          }
        }
        store_vec<VEC>(dz + i, d);
      }
    }
  }
}

struct Setup {
  std::vector<at::Tensor> keep;  // contiguous members (and a stacked copy if needed)
  EnsArgs a{};
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  bool vec4 = true;
};

void setup(Setup& S, at::TensorList members, const at::Tensor& weights, int64_t mode, bool stacked) {
  S.shape = ensemble_member_shape(members, weights, mode, stacked);
  const int64_t K = weights.size(0), C = S.shape.back();
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < S.shape.size(); ++i) rows *= S.shape[i];
  auto& a = S.a;
  a.K = K;
  a.C = C;
  a.rows = rows;
  a.mode = int(mode);
  S.dtype = members[0].scalar_type();
  S.vec4 = C % 4 == 0;
  if (stacked || K > kMaxListMembers) {
    auto m = stacked ? members[0].contiguous() : at::stack(members).contiguous();
    S.keep.push_back(m);
    a.stacked = m.data_ptr();
    S.vec4 = S.vec4 && reinterpret_cast<uintptr_t>(a.stacked) % (4 * m.element_size()) == 0;
  } else {
    for (int64_t k = 0; k < K; ++k) {
      S.keep.push_back(members[k].contiguous());
      a.members[k] = S.keep.back().data_ptr();
      S.vec4 = S.vec4 && reinterpret_cast<uintptr_t>(a.members[k]) % (4 * S.keep.back().element_size()) == 0;
    }
  }
  S.keep.push_back(weights.to(at::kFloat).contiguous());
  a.weights = S.keep.back().data_ptr<float>();
}

int64_t grid_for(int64_t rows) { return rows < 65535 * 8 ? rows : 65535 * 8; }

template <typename X, typename Y>
void launch_forward(const EnsArgs& a, bool vec4, cudaStream_t stream) {
  if (a.rows == 0) return;
  const int threads = row_block_threads(a.C, vec4 ? 4 : 1);
  const size_t smem = a.K * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "ensemble_average: at most 12288 members on CUDA");
  if (vec4)
    ensemble_forward_kernel<X, Y, 4><<<grid_for(a.rows), threads, smem, stream>>>(a);
  else
    ensemble_forward_kernel<X, Y, 1><<<grid_for(a.rows), threads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ensemble_average_cuda(at::TensorList members, const at::Tensor& weights,
                                                          int64_t mode, bool stacked) {
  const c10::cuda::CUDAGuard guard(weights.device());
  Setup S;
  setup(S, members, weights, mode, stacked);
  auto opts = members[0].options();
  auto out = at::empty(S.shape, opts);
  auto lse = at::empty({S.a.K, S.a.rows}, opts.dtype(at::kFloat));
  S.a.out = out.data_ptr();
  S.a.lse = lse.data_ptr<float>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  visit_cuda_dtype(S.dtype, "member_logits", [&](auto tag) {
    using X = decltype(tag);
    launch_forward<X, X>(S.a, S.vec4, stream);
  });
  return {out, lse};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> ensemble_average_backward_cuda(
    const at::Tensor& grad, at::TensorList members, const at::Tensor& weights, const at::Tensor& out,
    const at::Tensor& lse, int64_t mode, bool stacked) {
  const c10::cuda::CUDAGuard guard(weights.device());
  Setup S;
  setup(S, members, weights, mode, stacked);
  auto& a = S.a;
  const auto opts = members[0].options();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto g = grad.to(S.dtype).contiguous();
  auto lse_c = lse.contiguous();
  a.lse = lse_c.data_ptr<float>();
  // The backward reads y in float32: 16-bit members recompute it rather than trust the rounded
  // output (a ~1% error in log_probs mode).
  at::Tensor y;
  if (S.dtype == at::kFloat) {
    y = out.contiguous();
  } else {
    y = at::empty(S.shape, opts.dtype(at::kFloat));
    EnsArgs f = a;
    f.out = y.data_ptr();
    f.lse = at::empty({a.K, a.rows}, opts.dtype(at::kFloat)).data_ptr<float>();
    visit_cuda_dtype(S.dtype, "member_logits", [&](auto tag) {
      using X = decltype(tag);
      launch_forward<X, float>(f, S.vec4, stream);
    });
  }
  std::vector<at::Tensor> grads;
  if (a.stacked) {
    grads.push_back(at::empty(stacked ? members[0].sizes() : at::IntArrayRef({a.K * a.rows * a.C}), opts));
    a.grad_stacked = grads[0].data_ptr();
  } else {
    for (int64_t k = 0; k < a.K; ++k) {
      grads.push_back(at::empty(members[k].sizes(), opts));
      a.grads[k] = grads.back().data_ptr();
    }
  }
  auto dw_rows = at::empty({a.rows, a.K}, opts.dtype(at::kFloat));
  a.grad = g.data_ptr();
  a.y = y.data_ptr<float>();
  a.dw_rows = dw_rows.data_ptr<float>();
  if (a.rows > 0) {
    const bool vec4 = S.vec4 && reinterpret_cast<uintptr_t>(a.grad) % 16 == 0;
    const int threads = row_block_threads(a.C, vec4 ? 4 : 1);
    visit_cuda_dtype(S.dtype, "member_logits", [&](auto tag) {
      using X = decltype(tag);
      if (vec4)
        ensemble_backward_kernel<X, 4><<<grid_for(a.rows), threads, 0, stream>>>(a);
      else
        ensemble_backward_kernel<X, 1><<<grid_for(a.rows), threads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!stacked && a.stacked) {  // more members than a kernel argument holds: unstack
    auto all = grads[0].view({a.K, -1});
    std::vector<at::Tensor> split;
    for (int64_t k = 0; k < a.K; ++k) split.push_back(all[k].view(members[k].sizes()));
    grads = split;
  }
  return {grads, dw_rows.sum(0).to(weights.scalar_type())};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(reuse_core, CUDA, m) {
  m.impl("ensemble_average", &cuda::ensemble_average_cuda);
  m.impl("ensemble_average_backward", &cuda::ensemble_average_backward_cuda);
}

}  // namespace reuse_core
