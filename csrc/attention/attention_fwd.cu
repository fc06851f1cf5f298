// CUDA flash attention, forward: one block per (query tile, batch, head) walks the key tiles
// with an online softmax (running max m and sum l per query row, O rescaled when m grows) and
// writes O and the row statistics (m, log l) the backward recomputes P from.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../common/cuda_dispatch.h"
#include "../ops.h"
#include "attention_checks.h"
#include "attention_cuda.cuh"

namespace reuse_core {
namespace cuda {
namespace attn {
namespace {

template <typename X, int D>
size_t fwd_smem_bytes() {
  using T = FwdTiles<X, D>;
  return 2 * aligned_bytes(sizeof(X) * T::BK * D) + aligned_bytes(sizeof(X) * T::BQ * D) +
         aligned_bytes(sizeof(float) * T::BQ * T::BK) + aligned_bytes(sizeof(X) * T::BQ * T::BK) +
         aligned_bytes(sizeof(float) * T::BQ * D);
}

template <typename X, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(Params p) {
  using T = FwdTiles<X, D>;
  constexpr int BQ = T::BQ, BK = T::BK, G = kThreads / BQ;  // G threads per query row
  extern __shared__ __align__(kAlign) char smem_raw[];
  SmemCarve sm{smem_raw};
  X* Qs = sm.take<X>(BQ * D);
  X* Ks = sm.take<X>(BK * D);
  X* Vs = sm.take<X>(BK * D);
  float* Ss = sm.take<float>(BQ * BK);
  X* Ps = sm.take<X>(BQ * BK);
  float* Os = sm.take<float>(BQ * D);

  const int64_t nqb = (p.Lq + BQ - 1) / BQ;
  const int64_t bh = int64_t(blockIdx.x) / nqb, b = bh / p.H, h = bh % p.H;
  const int64_t q0 = (int64_t(blockIdx.x) % nqb) * BQ;
  const int64_t kvh = b * p.Hkv + h / (p.H / p.Hkv);
  const X* q = static_cast<const X*>(p.q) + bh * p.Lq * p.d;
  const X* k = static_cast<const X*>(p.k) + kvh * p.Lk * p.d;
  const X* v = static_cast<const X*>(p.v) + kvh * p.Lk * p.d;
  const bool* kpm = p.kpm ? p.kpm + b * p.Lk : nullptr;

  load_tile<X, D>(Qs, q, q0, BQ, p.Lq, p.d);
  fill(Os, BQ * D, 0.f);
  const int r = threadIdx.x / G, sub = threadIdx.x % G;
  const int64_t qi = q0 + r;
  float m = -INFINITY, l = 0.f;
  bool nan_row = false;  // a NaN among the row's kept scores: NaN output and statistics
  const int64_t kend = p.causal ? (q0 + BQ < p.Lk ? q0 + BQ : p.Lk) : p.Lk;

  for (int64_t k0 = 0; k0 < kend; k0 += BK) {
    __syncthreads();  // the previous tile's readers are done with Ks, Vs, Ps
    load_tile<X, D>(Ks, k, k0, BK, p.Lk, p.d);
    load_tile<X, D>(Vs, v, k0, BK, p.Lk, p.d);
    int v_bad = 0;
    for (int i = threadIdx.x; i < BK * D; i += kThreads) v_bad |= !isfinite(to_float(Vs[i]));
    // a NaN or inf in V: P V below sums only the keys each row keeps (0 * NaN is NaN)
    v_bad = __syncthreads_or(v_bad);
    block_gemm<false, true, BQ, BK, D>(Qs, D, Ks, D, Ss, BK, false);
    __syncthreads();
    // online softmax on row r: this thread's columns sub, sub + G, ...
    float mx = -INFINITY;
    int bad = 0;
    for (int j = sub; j < BK; j += G) {
      const float s = masked(qi, k0 + j, p.Lk, p.causal, kpm) ? -INFINITY : Ss[r * BK + j] * p.scale;
      Ss[r * BK + j] = s;
      mx = fmaxf(mx, s);  // drops a NaN: `bad` keeps it
      bad |= s != s;
    }
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) {
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    }
    nan_row |= bad != 0;
    const float m_new = fmaxf(m, mx);
    // every key so far masked: P = 0, nothing to rescale (l and O are still 0)
    const float alpha = m_new == -INFINITY ? 1.f : __expf(m - m_new);
    float sum = 0.f;
    for (int j = sub; j < BK; j += G) {
      const float e = (nan_row || m_new == -INFINITY) ? 0.f : __expf(Ss[r * BK + j] - m_new);
      Ps[r * BK + j] = from_float<X>(e);
      sum += e;
    }
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    l = l * alpha + sum;
    m = m_new;
    if (alpha != 1.f)
      for (int c = sub; c < D; c += G) Os[r * D + c] *= alpha;
    __syncthreads();
    if (!v_bad) {
      block_gemm<false, false, BQ, D, BK>(Ps, BK, Vs, D, Os, D, true);
    } else {
      for (int i = threadIdx.x; i < BQ * D; i += kThreads) {
        const int rr = i / D, c = i % D;
        float acc = Os[i];
        for (int j = 0; j < BK; ++j)
          if (!masked(q0 + rr, k0 + j, p.Lk, p.causal, kpm)) acc = fmaf(to_float(Ps[rr * BK + j]), to_float(Vs[j * D + c]), acc);
        Os[i] = acc;
      }
    }
  }
  __syncthreads();
  if (qi < p.Lq) {
    X* out = static_cast<X*>(p.out) + (bh * p.Lq + qi) * p.d;
    const float inv = l > 0.f ? 1.f / l : 0.f;  // l = 0: every key masked, O = 0
    for (int c = sub; c < p.d; c += G) out[c] = from_float<X>(nan_row ? NAN : Os[r * D + c] * inv);
    if (sub == 0) {
      float* stat = p.stats + bh * p.Lq + qi;
      stat[0] = nan_row ? NAN : l > 0.f ? m : INFINITY;
      stat[p.B * p.H * p.Lq] = nan_row ? NAN : l > 0.f ? __logf(l) : 0.f;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const c10::optional<at::Tensor>& key_padding_mask, bool causal,
                                                  double scale) {
  check_attention_args(q, k, v, key_padding_mask);
  TORCH_CHECK(q.size(3) <= 256, "attention: on CUDA the head dim D must be <= 256, got ", q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  auto out = at::empty(q.sizes(), q.options());
  auto stats = at::empty({2, q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, stats};
  Params p{};
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.kpm = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.stats = stats.data_ptr<float>();
  p.B = q.size(0);
  p.H = q.size(1);
  p.Hkv = k.size(1);
  p.Lq = q.size(2);
  p.Lk = k.size(2);
  p.d = int(q.size(3));
  p.causal = causal;
  p.scale = float(scale);
  visit_cuda_dtype(q.scalar_type(), "attention: q, k and v", [&](auto x) {
    visit_head_dim(p.d, [&](auto dim) {
      using X = decltype(x);
      constexpr int D = decltype(dim)::value;
      const int64_t tiles = (p.Lq + FwdTiles<X, D>::BQ - 1) / FwdTiles<X, D>::BQ;
      launch(attention_fwd_kernel<X, D>, fwd_smem_bytes<X, D>(), p.B * p.H * tiles, p, "attention");
    });
  });
  return {out, stats};
}

}  // namespace
}  // namespace attn
}  // namespace cuda

TORCH_LIBRARY_IMPL(reuse_core, CUDA, m) { m.impl("attention", &cuda::attn::attention_cuda); }

}  // namespace reuse_core
