// CUDA ensemble_average: one warp per row (up to 4096 classes) or one block per row. Forward: each member's logsumexp by a block
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
  bool is_stacked;      // member k starts at stacked + k * rows * C (else members[k])
  const void* stacked;
  void* grad_stacked;
  const float* weights;  // (K,), raw (not normalised)
  int64_t K, C, rows;
  int mode;
  void* out;          // forward: (rows, C) in Y
  float* lse;         // (2, K, rows): each member row's max and log sum exp(z - max)
  const void* grad;   // backward: (rows, C) in X
  const float* y;     // backward: the output in float32
  float* dw_rows;     // backward: (rows, K)
};

template <typename X>
__device__ __forceinline__ const X* member_row(const EnsArgs& a, int64_t k, int64_t r) {
  const X* base = a.is_stacked ? static_cast<const X*>(a.stacked) + k * a.rows * a.C : static_cast<const X*>(a.members[k]);
  return base + r * a.C;
}
template <typename X>
__device__ __forceinline__ X* grad_row(const EnsArgs& a, int64_t k, int64_t r) {
  X* base = a.is_stacked ? static_cast<X*>(a.grad_stacked) + k * a.rows * a.C : static_cast<X*>(a.grads[k]);
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

// One member row's max M and log sum exp(z - M) over the row group. Kept apart rather than as
// M + log(sum), which would round to M's ulp. A row of -inf has the uniform softmax (the limit
// of a constant row): M = -inf marks it, LS = log(n). A row holding a NaN: M = LS = NaN (the
// max reduction alone would drop it).
template <typename X, int VEC, bool kWarp>
__device__ void row_max_logsum(const RowGroup<kWarp>& grp, const X* z, int64_t n, float* smem, float& M,
                               float& LS) {
  float m = -INFINITY, s = 0.f;
  bool bad = false;
#pragma unroll 2
  for (int64_t i = int64_t(grp.rank()) * VEC; i < n; i += int64_t(grp.size()) * VEC) {
    float x[VEC];
    load_vec<VEC>(z + i, x);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      bad |= x[j] != x[j];
      if (x[j] > m) { s *= __expf(m - x[j]); m = x[j]; }
      if (x[j] > -INFINITY) s += __expf(x[j] - m);
    }
  }
  if (grp.max(bad ? 1.f : 0.f, smem) > 0.f) {
    M = LS = NAN;
    return;
  }
  M = grp.max(m, smem);
  const float S = grp.sum(m > -INFINITY ? s * __expf(m - M) : 0.f, smem);
  LS = __logf(M > -INFINITY ? S : float(n));
}

// log p at a logit z of a member row with saved M and LS (see row_max_logsum).
__device__ __forceinline__ float member_log_prob(float z, float M, float LS) {
  return (M == -INFINITY ? 0.f : z - M) - LS;
}

template <typename X, typename Y, int VEC, bool kWarp>
__global__ void ensemble_forward_kernel(EnsArgs a) {
  extern __shared__ float lse_smem[];  // 2K per row group: (max, log sum) per member
  __shared__ float smem[32];
  const RowGroup<kWarp> grp;
  float* lse_s = lse_smem + grp.slot() * 2 * a.K;
  const float inv_wsum = 1.f / weight_sum(a);
  const int64_t n = a.C;
  for (int64_t r = grp.first_row(); r < a.rows; r += grp.row_stride()) {
    for (int64_t k = 0; k < a.K; ++k) {
      float M = 0.f, LS = 0.f;
      if (a.mode != kLogits) row_max_logsum<X, VEC>(grp, member_row<X>(a, k, r), n, smem, M, LS);
      if (grp.rank() == 0) {
        lse_s[2 * k] = M;
        lse_s[2 * k + 1] = LS;
        a.lse[k * a.rows + r] = M;
        a.lse[(a.K + k) * a.rows + r] = LS;
      }
    }
    grp.sync();
    // A NaN in any member, whatever its weight, makes the row NaN (logits: the entry below).
    bool nan_row = false;
    for (int64_t k = 0; k < a.K; ++k) nan_row |= lse_s[2 * k] != lse_s[2 * k];
    Y* out = static_cast<Y*>(a.out) + r * n;
    for (int64_t i = int64_t(grp.rank()) * VEC; i < n; i += int64_t(grp.size()) * VEC) {
      float acc[VEC], mx[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) { acc[j] = 0.f; mx[j] = -INFINITY; }
      for (int64_t k = 0; k < a.K; ++k) {
        const float w = a.weights[k] * inv_wsum, M = lse_s[2 * k], LS = lse_s[2 * k + 1];
        if (w == 0.f && a.mode != kLogits) continue;  // no contribution
        float z[VEC];
        load_vec<VEC>(member_row<X>(a, k, r) + i, z);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (a.mode == kLogits) {
            acc[j] += w == 0.f ? (z[j] != z[j] ? z[j] : 0.f) : w * z[j];  // never 0 * (-inf); NaN stays
          } else if (a.mode == kProbs) {
            acc[j] += w * __expf(member_log_prob(z[j], M, LS));
          } else {  // online logsumexp over members of log w + z - lse
            const float x = __logf(w) + member_log_prob(z[j], M, LS);
            if (x > mx[j]) { acc[j] *= __expf(mx[j] - x); mx[j] = x; }
            if (x > -INFINITY) acc[j] += __expf(x - mx[j]);
          }
        }
      }
      if (a.mode == kLogProbs) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] = mx[j] > -INFINITY ? mx[j] + __logf(acc[j]) : -INFINITY;
      }
      if (nan_row) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] = NAN;
      }
      store_vec<VEC>(out + i, acc);
    }
    grp.sync();
  }
}

// log_probs where y < -80: y carries the rounding of a large number (ulp(2e4) = 2e-3), and so
// would exp(lp_k - y). Instead e_k = p_k / sum_j w_j p_j at class i, relative to the largest lp_j.
template <typename X>
__device__ float exact_share(const EnsArgs& a, int64_t r, int64_t k, int64_t i, float inv_wsum) {
  auto lp = [&](int64_t j) {
    return member_log_prob(to_float(member_row<X>(a, j, r)[i]), a.lse[j * a.rows + r], a.lse[(a.K + j) * a.rows + r]);
  };
  float sh = -INFINITY;
  for (int64_t j = 0; j < a.K; ++j)
    if (a.weights[j] > 0.f) sh = fmaxf(sh, lp(j));
  if (sh == -INFINITY) return 0.f;
  float acc = 0.f;
  for (int64_t j = 0; j < a.K; ++j)
    if (a.weights[j] > 0.f) acc += a.weights[j] * inv_wsum * __expf(lp(j) - sh);
  return __expf(lp(k) - sh) / acc;
}

template <typename X, int VEC, bool kWarp>
__global__ void ensemble_backward_kernel(EnsArgs a) {
  __shared__ float smem[32];
  const RowGroup<kWarp> grp;
  const float inv_wsum = 1.f / weight_sum(a);
  const int64_t n = a.C;
  const int64_t i0 = int64_t(grp.rank()) * VEC, step = int64_t(grp.size()) * VEC;
  for (int64_t r = grp.first_row(); r < a.rows; r += grp.row_stride()) {
    const X* g = static_cast<const X*>(a.grad) + r * n;
    const float* y = a.y + r * n;
    // A NaN in row r (the reference's pattern): every weight gradient is NaN; in log_probs mode
    // every member's gradient too, in probs mode that of the member holding it. (The saved max
    // marks it; logits mode finds it in z and y below.)
    bool nan_row = false;
    for (int64_t k = 0; k < a.K; ++k) nan_row |= a.lse[k * a.rows + r] != a.lse[k * a.rows + r];
    const bool all_nan = nan_row && a.mode == kLogProbs;
    for (int64_t k = 0; k < a.K; ++k) {
      const X* z = member_row<X>(a, k, r);
      X* dz = grad_row<X>(a, k, r);
      const float w = a.weights[k] * inv_wsum, M = a.lse[k * a.rows + r], LS = a.lse[(a.K + k) * a.rows + r];
      const bool nan_k = M != M;
      // Pass A: the member's reductions. logits: <g, z - y>; probs: <g, p>, <g, p - y>;
      // log_probs: <g, e>, <g, e - 1> with e = p / exp(y) (0 where y = -inf).
      float r1 = 0.f, r2 = 0.f;
#pragma unroll 2
      for (int64_t i = i0; i < n; i += step) {
        float zv[VEC], gv[VEC], yv[VEC];
        load_vec<VEC>(z + i, zv);
        load_vec<VEC>(g + i, gv);
        load_vec<VEC>(y + i, yv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (a.mode == kLogits) {
            const float t = gv[j] * (zv[j] - yv[j]);
            // skip the NaN terms of a -inf logit (0 * inf, inf - inf), not those of a NaN input
            if (t == t || zv[j] != zv[j] || yv[j] != yv[j]) r2 += t;
          } else if (a.mode == kProbs) {
            const float p = nan_k ? NAN : __expf(member_log_prob(zv[j], M, LS));
            r1 += gv[j] * p;
            r2 += gv[j] * (p - yv[j]);
          } else {
            const float e = all_nan ? NAN
                            : yv[j] == -INFINITY ? 0.f
                            : yv[j] < -80.f ? exact_share<X>(a, r, k, i + j, inv_wsum)
                                            : __expf(member_log_prob(zv[j], M, LS) - yv[j]);
            r1 += gv[j] * e;
            r2 += gv[j] * (e - 1.f);
          }
        }
      }
      const float R1 = a.mode == kLogits ? 0.f : grp.sum(r1, smem);
      const float R2 = grp.sum(r2, smem);
      if (grp.rank() == 0) a.dw_rows[r * a.K + k] = R2 * inv_wsum;
      // Pass B: the member's gradient (0 for a zero weight).
#pragma unroll 2
      for (int64_t i = i0; i < n; i += step) {
        float zv[VEC], gv[VEC], yv[VEC], d[VEC];
        load_vec<VEC>(z + i, zv);
        load_vec<VEC>(g + i, gv);
        if (a.mode == kLogProbs) load_vec<VEC>(y + i, yv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (all_nan || nan_k) {
            d[j] = NAN;
          } else if (w == 0.f) {
            d[j] = 0.f;
          } else if (a.mode == kLogits) {
            d[j] = w * gv[j];
          } else if (a.mode == kProbs) {
            d[j] = w * __expf(member_log_prob(zv[j], M, LS)) * (gv[j] - R1);
          } else {
            const float lp = member_log_prob(zv[j], M, LS);
            const float p = __expf(lp);
            const float e = yv[j] == -INFINITY ? 0.f
                            : yv[j] < -80.f ? exact_share<X>(a, r, k, i + j, inv_wsum)
                                            : __expf(lp - yv[j]);
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
    a.is_stacked = true;
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

// Grid and block for `rows` rows of C classes: a warp per row up to kWarpRowMax classes.
struct Launch {
  int64_t blocks;
  int threads;
  bool warp;
};
Launch launch_shape(int64_t rows, int64_t C, int vec) {
  const int64_t max_blocks = 65535 * 8;
  if (C <= kWarpRowMax) {
    const int64_t b = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    return {b < max_blocks ? b : max_blocks, 32 * kWarpsPerBlock, true};
  }
  return {rows < max_blocks ? rows : max_blocks, row_block_threads(C, vec), false};
}

template <typename X, typename Y>
void launch_forward(const EnsArgs& a, bool vec4, cudaStream_t stream) {
  if (a.rows == 0) return;
  const auto L = launch_shape(a.rows, a.C, vec4 ? 4 : 1);
  const size_t smem = 2 * a.K * sizeof(float) * (L.warp ? kWarpsPerBlock : 1);
  TORCH_CHECK(smem <= 48 * 1024, "ensemble_average: at most ", 48 * 1024 / sizeof(float) / 2 / kWarpsPerBlock,
              " members on CUDA");
  if (vec4 && L.warp)
    ensemble_forward_kernel<X, Y, 4, true><<<L.blocks, L.threads, smem, stream>>>(a);
  else if (vec4)
    ensemble_forward_kernel<X, Y, 4, false><<<L.blocks, L.threads, smem, stream>>>(a);
  else if (L.warp)
    ensemble_forward_kernel<X, Y, 1, true><<<L.blocks, L.threads, smem, stream>>>(a);
  else
    ensemble_forward_kernel<X, Y, 1, false><<<L.blocks, L.threads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ensemble_average_cuda(at::TensorList members, const at::Tensor& weights,
                                                          int64_t mode, bool stacked) {
  const c10::cuda::CUDAGuard guard(weights.device());
  Setup S;
  setup(S, members, weights, mode, stacked);
  auto opts = members[0].options();
  auto out = at::empty(S.shape, opts);
  auto lse = at::empty({2, S.a.K, S.a.rows}, opts.dtype(at::kFloat));
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
  at::Tensor y_lse;  // held until the recompute below has run: a temporary would free its storage at once
  if (S.dtype == at::kFloat) {
    y = out.contiguous();
  } else {
    y = at::empty(S.shape, opts.dtype(at::kFloat));
    y_lse = at::empty({2, a.K, a.rows}, opts.dtype(at::kFloat));
    EnsArgs f = a;
    f.out = y.data_ptr();
    f.lse = y_lse.data_ptr<float>();
    visit_cuda_dtype(S.dtype, "member_logits", [&](auto tag) {
      using X = decltype(tag);
      launch_forward<X, float>(f, S.vec4, stream);
    });
  }
  std::vector<at::Tensor> grads;
  if (a.is_stacked) {
    grads.push_back(stacked ? at::empty(members[0].sizes(), opts) : at::empty({a.K * a.rows * a.C}, opts));
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
    const auto L = launch_shape(a.rows, a.C, vec4 ? 4 : 1);
    visit_cuda_dtype(S.dtype, "member_logits", [&](auto tag) {
      using X = decltype(tag);
      if (vec4 && L.warp)
        ensemble_backward_kernel<X, 4, true><<<L.blocks, L.threads, 0, stream>>>(a);
      else if (vec4)
        ensemble_backward_kernel<X, 4, false><<<L.blocks, L.threads, 0, stream>>>(a);
      else if (L.warp)
        ensemble_backward_kernel<X, 1, true><<<L.blocks, L.threads, 0, stream>>>(a);
      else
        ensemble_backward_kernel<X, 1, false><<<L.blocks, L.threads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!stacked && a.is_stacked) {  // more members than a kernel argument holds: unstack
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
