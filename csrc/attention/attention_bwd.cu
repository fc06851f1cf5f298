// CUDA flash attention, backward: one block per (key tile, batch, query head) holds its K and V
// tiles and float32 dK, dV accumulators, and walks the query tiles: it recomputes
// P = exp(scale S - m - log l) from the forward's row statistics, adds P^T dO to dV and
// dS^T Q to dK (dS = scale P (dP - D_i), dP = dO V^T), and adds its share of dS K to the
// float32 dQ with atomics. dK, dV are per query head; the host sums them over the heads that
// share a key/value head.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/cuda_dispatch.h"
#include "../ops.h"
#include "attention_checks.h"
#include "attention_cuda.cuh"

namespace reuse_core {
namespace cuda {
namespace attn {
namespace {

template <typename X, int D>
size_t bwd_smem_bytes() {
  using T = BwdTiles<X, D>;
  return 2 * aligned_bytes(sizeof(X) * T::BK * D) + 2 * aligned_bytes(sizeof(X) * T::BQ * D) +
         2 * aligned_bytes(sizeof(float) * T::BQ * T::BK) + 2 * aligned_bytes(sizeof(X) * T::BQ * T::BK) +
         aligned_bytes(sizeof(float) * T::BQ * D) + 2 * aligned_bytes(sizeof(float) * T::BK * D) +
         3 * aligned_bytes(sizeof(float) * T::BQ);
}

template <typename X, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_kernel(Params p) {
  using T = BwdTiles<X, D>;
  constexpr int BQ = T::BQ, BK = T::BK;
  extern __shared__ __align__(kAlign) char smem_raw[];
  SmemCarve sm{smem_raw};
  X* Ks = sm.take<X>(BK * D);
  X* Vs = sm.take<X>(BK * D);
  X* Qs = sm.take<X>(BQ * D);
  X* dOs = sm.take<X>(BQ * D);
  float* Ss = sm.take<float>(BQ * BK);
  float* dPs = sm.take<float>(BQ * BK);
  X* Ps = sm.take<X>(BQ * BK);
  X* dSs = sm.take<X>(BQ * BK);
  float* dQs = sm.take<float>(BQ * D);
  float* dKs = sm.take<float>(BK * D);
  float* dVs = sm.take<float>(BK * D);
  float* row_m = sm.take<float>(BQ);
  float* row_logl = sm.take<float>(BQ);
  float* row_di = sm.take<float>(BQ);

  const int64_t nkb = (p.Lk + BK - 1) / BK;
  const int64_t bh = int64_t(blockIdx.x) / nkb, b = bh / p.H, h = bh % p.H;
  const int64_t k0 = (int64_t(blockIdx.x) % nkb) * BK;
  const int64_t kvh = b * p.Hkv + h / (p.H / p.Hkv);
  const X* q = static_cast<const X*>(p.q) + bh * p.Lq * p.d;
  const X* dout = static_cast<const X*>(p.dout) + bh * p.Lq * p.d;
  const bool* kpm = p.kpm ? p.kpm + b * p.Lk : nullptr;
  const int64_t nstat = p.B * p.H * p.Lq;

  // Q and K with NaN and inf read as 0. A row that a NaN q or k reaches has NaN statistics, so
  // its P and dS are NaN and carry it to every gradient it reaches; where dS is 0 (a masked key)
  // 0 * NaN must not make a NaN.
  load_tile<X, D, true>(Ks, static_cast<const X*>(p.k) + kvh * p.Lk * p.d, k0, BK, p.Lk, p.d);
  load_tile<X, D>(Vs, static_cast<const X*>(p.v) + kvh * p.Lk * p.d, k0, BK, p.Lk, p.d);
  fill(dKs, BK * D, 0.f);
  fill(dVs, BK * D, 0.f);
  // causal: queries before k0 see none of these keys
  for (int64_t q0 = p.causal ? k0 / BQ * BQ : 0; q0 < p.Lq; q0 += BQ) {
    __syncthreads();  // the previous tile's readers are done with Qs, dOs, dQs and the rows
    load_tile<X, D, true>(Qs, q, q0, BQ, p.Lq, p.d);
    load_tile<X, D>(dOs, dout, q0, BQ, p.Lq, p.d);
    for (int r = threadIdx.x; r < BQ; r += kThreads) {
      const int64_t qi = q0 + r;
      const bool in = qi < p.Lq;
      row_m[r] = in ? p.stats[bh * p.Lq + qi] : INFINITY;  // +inf: P = 0 for the row
      row_logl[r] = in ? p.stats[nstat + bh * p.Lq + qi] : 0.f;
      row_di[r] = in ? p.di[bh * p.Lq + qi] : 0.f;
    }
    __syncthreads();
    block_gemm<false, true, BQ, BK, D>(Qs, D, Ks, D, Ss, BK, false);    // S = Q K^T
    block_gemm<false, true, BQ, BK, D>(dOs, D, Vs, D, dPs, BK, false);  // dP = dO V^T
    __syncthreads();
    for (int i = threadIdx.x; i < BQ * BK; i += kThreads) {
      const int r = i / BK, j = i % BK;
      const bool off = masked(q0 + r, k0 + j, p.Lk, p.causal, kpm);
      // m = +inf (no key, or a row past Lq): exp(-inf) = 0; m = NaN (a NaN row): NaN
      const float pr = off ? 0.f : row_m[r] != row_m[r] ? NAN : __expf(Ss[i] * p.scale - row_m[r] - row_logl[r]);
      Ps[i] = from_float<X>(pr);
      dSs[i] = from_float<X>(off ? 0.f : pr * (dPs[i] - row_di[r]) * p.scale);  // dP may be NaN there (a NaN v)
    }
    __syncthreads();
    block_gemm<true, false, BK, D, BQ>(Ps, BK, dOs, D, dVs, D, true);   // dV += P^T dO
    block_gemm<true, false, BK, D, BQ>(dSs, BK, Qs, D, dKs, D, true);   // dK += dS^T Q
    block_gemm<false, false, BQ, D, BK>(dSs, BK, Ks, D, dQs, D, false); // dQ part = dS K
    __syncthreads();
    float* dq = p.dq + (bh * p.Lq + q0) * p.d;
    for (int i = threadIdx.x; i < BQ * D; i += kThreads) {
      const int r = i / D, c = i % D;
      if (q0 + r < p.Lq && c < p.d) atomicAdd(dq + int64_t(r) * p.d + c, dQs[i]);
    }
  }
  __syncthreads();
  float* dk = p.dk + (bh * p.Lk + k0) * p.d;
  float* dv = p.dv + (bh * p.Lk + k0) * p.d;
  for (int i = threadIdx.x; i < BK * D; i += kThreads) {
    const int r = i / D, c = i % D;
    if (k0 + r < p.Lk && c < p.d) {
      dk[int64_t(r) * p.d + c] = dKs[i];
      dv[int64_t(r) * p.d + c] = dVs[i];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& out, const at::Tensor& stats, bool causal,
    double scale) {
  check_attention_args(q, k, v, key_padding_mask);
  check_attention_backward_args(grad, q, out, stats);
  TORCH_CHECK(q.size(3) <= 256, "attention_backward: on CUDA the head dim D must be <= 256, got ", q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), Lq = q.size(2), Lk = k.size(2), d = q.size(3);
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), gc = grad.contiguous();
  const auto mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  const auto st = stats.to(at::kFloat).contiguous();
  const auto di = (gc.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();  // D_i = rowsum(dO * O)
  const auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::zeros({B, H, Lq, d}, f32);
  auto dk = at::zeros({B, H, Lk, d}, f32);
  auto dv = at::zeros({B, H, Lk, d}, f32);
  if (B * H * Lq > 0 && Lk > 0) {
    Params p{};
    p.q = qc.data_ptr();
    p.k = kc.data_ptr();
    p.v = vc.data_ptr();
    p.kpm = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    p.stats = st.data_ptr<float>();
    p.dout = gc.data_ptr();
    p.di = di.data_ptr<float>();
    p.dq = dq.data_ptr<float>();
    p.dk = dk.data_ptr<float>();
    p.dv = dv.data_ptr<float>();
    p.B = B;
    p.H = H;
    p.Hkv = Hkv;
    p.Lq = Lq;
    p.Lk = Lk;
    p.d = int(d);
    p.causal = causal;
    p.scale = float(scale);
    visit_cuda_dtype(q.scalar_type(), "attention_backward: q, k and v", [&](auto x) {
      visit_head_dim(p.d, [&](auto dim) {
        using X = decltype(x);
        constexpr int D = decltype(dim)::value;
        const int64_t tiles = (p.Lk + BwdTiles<X, D>::BK - 1) / BwdTiles<X, D>::BK;
        launch(attention_bwd_kernel<X, D>, bwd_smem_bytes<X, D>(), p.B * p.H * tiles, p, "attention_backward");
      });
    });
  }
  if (H != Hkv) {
    dk = dk.view({B, Hkv, H / Hkv, Lk, d}).sum(2);
    dv = dv.view({B, Hkv, H / Hkv, Lk, d}).sum(2);
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace
}  // namespace attn
}  // namespace cuda

TORCH_LIBRARY_IMPL(reuse_core, CUDA, m) { m.impl("attention_backward", &cuda::attn::attention_backward_cuda); }

}  // namespace reuse_core
