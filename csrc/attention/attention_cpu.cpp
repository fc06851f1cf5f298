// CPU flash attention: forward and backward drivers. The products of each (query tile, key
// tile) pair are BLAS gemms (the BLAS libtorch links, MKL in the x86 wheels); the softmax steps
// between them are the vectorised tile kernels of attention_cpu_rows.h, instantiated here
// (portable, and the only path for float64) and in attention_cpu_avx2.cpp / _avx512.cpp.
// Only O and the per-row softmax statistics leave the forward; the backward recomputes P tile
// by tile. Extra memory is O(L): per-thread tiles, plus float32 copies of bfloat16 inputs and
// per-query-head dK/dV accumulators under grouped-query attention.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/cpu_features.h"
#include "../ops.h"
#include "attention_checks.h"
#include "attention_cpu_rows.h"

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace reuse_core {

void attention_fwd_tile_portable(const AttnTile<float>& t, float* m, float* l, float* o, int64_t ldo, int64_t D) {
  AttentionRows<ScalarOps<float>>::fwd_tile(t, m, l, o, ldo, D);
}
void attention_fwd_tile_portable(const AttnTile<double>& t, double* m, double* l, double* o, int64_t ldo, int64_t D) {
  AttentionRows<ScalarOps<double>>::fwd_tile(t, m, l, o, ldo, D);
}
void attention_bwd_p_portable(const AttnTile<float>& t, const float* m, const float* log_l) {
  AttentionRows<ScalarOps<float>>::bwd_p(t, m, log_l);
}
void attention_bwd_p_portable(const AttnTile<double>& t, const double* m, const double* log_l) {
  AttentionRows<ScalarOps<double>>::bwd_p(t, m, log_l);
}
void attention_bwd_ds_portable(const AttnTile<float>& t, float* dp, const float* di, float scale) {
  AttentionRows<ScalarOps<float>>::bwd_ds(t, dp, di, scale);
}
void attention_bwd_ds_portable(const AttnTile<double>& t, double* dp, const double* di, double scale) {
  AttentionRows<ScalarOps<double>>::bwd_ds(t, dp, di, scale);
}

namespace {

// Query rows and keys per tile: a 64 x 256 float32 score tile (64 KiB) and its K, V tiles stay
// in L2 while the gemms and the softmax pass over them.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 256;

template <typename T>
struct TileKernels {
  void (*fwd)(const AttnTile<T>&, T*, T*, T*, int64_t, int64_t);
  void (*p)(const AttnTile<T>&, const T*, const T*);
  void (*ds)(const AttnTile<T>&, T*, const T*, T);
};

TileKernels<double> tile_kernels(double) {
  return {&attention_fwd_tile_portable, &attention_bwd_p_portable, &attention_bwd_ds_portable};
}

TileKernels<float> tile_kernels(float) {
  switch (cpu_isa()) {
    case CpuIsa::avx512: return {&attention_fwd_tile_avx512, &attention_bwd_p_avx512, &attention_bwd_ds_avx512};
    case CpuIsa::avx2: return {&attention_fwd_tile_avx2, &attention_bwd_p_avx2, &attention_bwd_ds_avx2};
    default:
      return {static_cast<void (*)(const AttnTile<float>&, float*, float*, float*, int64_t, int64_t)>(
                  &attention_fwd_tile_portable),
              static_cast<void (*)(const AttnTile<float>&, const float*, const float*)>(&attention_bwd_p_portable),
              static_cast<void (*)(const AttnTile<float>&, float*, const float*, float)>(&attention_bwd_ds_portable)};
  }
}

// Column-major BLAS gemm, C = alpha op(A) op(B) + beta C, on the tiles. ATen's typed
// cpublas::gemm is not exported from libtorch, but the BLAS it wraps is (MKL in the x86 wheels):
// its Fortran symbols are declared weak, so a libtorch without them still loads the extension
// and the tiles go through at::addmm_out instead (correct, with a per-call dispatch cost).

// A column-major m x n matrix with leading dimension ld, as a tensor (op 'T': its transpose).
at::Tensor col_major(const void* p, char op, int64_t rows, int64_t cols, int64_t ld, at::ScalarType st) {
  auto x = at::from_blob(const_cast<void*>(p), {rows, cols}, {1, ld}, at::TensorOptions().dtype(st));
  return op == 'T' ? x.t() : x;
}

template <typename T>
void addmm_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  auto A = ta == 'T' ? col_major(a, 'T', k, m, lda, st) : col_major(a, 'N', m, k, lda, st);
  auto B = tb == 'T' ? col_major(b, 'T', n, k, ldb, st) : col_major(b, 'N', k, n, ldb, st);
  auto C = col_major(c, 'N', m, n, ldc, st);
  at::addmm_out(C, C, A, B, beta, alpha);
}

void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (!sgemm_) return addmm_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const int M = int(m), N = int(n), K = int(k), LA = int(lda), LB = int(ldb), LC = int(ldc);
  sgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
}

void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
               const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (!dgemm_) return addmm_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const int M = int(m), N = int(n), K = int(k), LA = int(lda), LB = int(ldb), LC = int(ldc);
  dgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
}

// C (row-major, rows x cols, stride ldc) = alpha * A B^T + beta * C, with A (rows x D) and
// B (cols x D) row-major: the score-like products S = Q K^T and dP = dO V^T.
template <typename T>
void gemm_abt(int64_t rows, int64_t cols, int64_t D, T alpha, const T* a, const T* b, T beta, T* c, int64_t ldc) {
  blas_gemm('T', 'N', cols, rows, D, alpha, b, D, a, D, beta, c, ldc);
}
// C (rows x D) += A B, with A (rows x n, stride lda) and B (n x D) row-major: O += P V, dQ += dS K.
template <typename T>
void gemm_ab_acc(int64_t rows, int64_t n, int64_t D, const T* a, int64_t lda, const T* b, T* c) {
  blas_gemm('N', 'N', D, rows, n, T(1), b, D, a, lda, T(1), c, D);
}
// C (n x D) += A^T B, with A (rows x n, stride lda) and B (rows x D) row-major: dV += P^T dO, dK += dS^T Q.
template <typename T>
void gemm_atb_acc(int64_t rows, int64_t n, int64_t D, const T* a, int64_t lda, const T* b, T* c) {
  blas_gemm('N', 'T', D, n, rows, T(1), b, D, a, lda, T(1), c, D);
}

struct Dims {
  int64_t B, H, Hkv, Lq, Lk, D;
  bool causal;
  // keys a query tile [q0, q0 + rows) can see: causal masks key j for query i when j > i
  int64_t key_end(int64_t q0, int64_t rows) const { return causal ? std::min(Lk, q0 + rows) : Lk; }
};

Dims dims_of(const at::Tensor& q, const at::Tensor& k, bool causal) {
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), causal};
}

// Math in float32 for 16-bit inputs, float64 for float64; contiguous (B, heads, L, D) layout.
at::Tensor math_copy(const at::Tensor& x) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return x.to(acc).contiguous();
}

// 0 for kept keys, -inf for keys the mask ignores: (B, Lk) in the math dtype.
// (masked_keys zeroes those keys' rows of k and v, so that no 0 * NaN or 0 * inf of theirs
// reaches a product: a masked key reaches nothing.)
at::Tensor key_bias(const c10::optional<at::Tensor>& mask, at::ScalarType acc) {
  if (!mask.has_value()) return at::Tensor();
  return at::zeros(mask->sizes(), at::TensorOptions().dtype(acc))
      .masked_fill_(mask->to(at::kCPU).contiguous(), -std::numeric_limits<double>::infinity());
}

at::Tensor masked_keys(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return x;
  return x.masked_fill(mask->to(at::kCPU).view({x.size(0), 1, x.size(2), 1}), 0);
}

// One pass, no temporary: a NaN or inf makes the sum non-finite. (A sum that overflows says
// "not finite" too, which only sends the input down the slower exact path.)
bool all_finite(const at::Tensor& x) { return std::isfinite(x.sum().item<double>()); }

at::Tensor finite_or_zero(const at::Tensor& x) { return all_finite(x) ? x : x.masked_fill(at::logical_not(at::isfinite(x)), 0); }

// O (rows x D) += P V over a tile's `cols` keys. P is 0 where causal masking hides a key, but
// 0 * NaN and 0 * inf are NaN: when `split` (v holds either), each row multiplies only the keys
// it keeps.
template <typename T>
void accumulate_pv(const AttnTile<T>& t, const T* v, int64_t D, T* o, bool split) {
  if (!split || !t.causal || t.diag + 1 >= t.cols) return gemm_ab_acc<T>(t.rows, t.cols, D, t.s, t.lds, v, o);
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t n = std::clamp<int64_t>(t.diag + r + 1, 0, t.cols);
    if (n > 0) gemm_ab_acc<T>(1, n, D, t.s + r * t.lds, t.lds, v, o + r * D);
  }
}

template <typename T>
void forward_impl(const Dims& d, const T* q, const T* k, const T* v, const T* bias, T scale, T* out, T* stats,
                  bool v_nonfinite) {
  const auto kern = tile_kernels(T{});
  const int64_t group = d.H / d.Hkv, nqb = (d.Lq + kBlockQ - 1) / kBlockQ, D = d.D;
  at::parallel_for(0, d.B * d.H * nqb, 1, [&](int64_t u0, int64_t u1) {
    std::vector<T> s(kBlockQ * kBlockK), m(kBlockQ), l(kBlockQ);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / nqb, b = bh / d.H, h = bh % d.H, q0 = (u % nqb) * kBlockQ;
      const int64_t rows = std::min(kBlockQ, d.Lq - q0);
      const int64_t kv_off = (b * d.Hkv + h / group) * d.Lk * D;
      const T* qb = q + (bh * d.Lq + q0) * D;
      T* ob = out + (bh * d.Lq + q0) * D;
      std::fill(ob, ob + rows * D, T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      const int64_t kend = d.key_end(q0, rows);
      for (int64_t k0 = 0; k0 < kend; k0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, kend - k0);
        gemm_abt<T>(rows, cols, D, scale, qb, k + kv_off + k0 * D, T(0), s.data(), cols);
        const AttnTile<T> tile{s.data(), cols, rows, cols, d.causal, q0 - k0, bias ? bias + b * d.Lk + k0 : nullptr};
        kern.fwd(tile, m.data(), l.data(), ob, D, D);
        accumulate_pv<T>(tile, v + kv_off + k0 * D, D, ob, v_nonfinite);
      }
      T* mb = stats + bh * d.Lq + q0;
      T* lb = mb + d.B * d.H * d.Lq;
      for (int64_t r = 0; r < rows; ++r) {
        if (std::isnan(l[r])) {  // a NaN score: NaN output and statistics
          std::fill(ob + r * D, ob + (r + 1) * D, std::numeric_limits<T>::quiet_NaN());
          mb[r] = lb[r] = std::numeric_limits<T>::quiet_NaN();
        } else if (l[r] > T(0)) {
          const T inv = T(1) / l[r];
          for (int64_t j = 0; j < D; ++j) ob[r * D + j] *= inv;
          mb[r] = m[r];
          lb[r] = std::log(l[r]);
        } else {  // every key masked: O = 0 and m = +inf, so the backward's P is 0
          mb[r] = std::numeric_limits<T>::infinity();
          lb[r] = T(0);
        }
      }
    }
  });
}

// q_acc, k_acc: q and k for the products dQ += dS K and dK += dS^T Q, with NaN and inf replaced
// by 0. Wherever a NaN q or k reaches a gradient, dS there is NaN already; where dS is 0 (a
// masked key) it must not turn 0 * NaN into NaN.
template <typename T>
void backward_impl(const Dims& d, const T* q, const T* k, const T* v, const T* bias, T scale, const T* out,
                   const T* dout, const T* stats, T* dq, T* dk, T* dv, const T* q_acc, const T* k_acc) {
  const auto kern = tile_kernels(T{});
  const int64_t group = d.H / d.Hkv, D = d.D;
  // One (batch, query head) per task: it owns its dQ rows and (per query head) its dK, dV
  // accumulators, so no two threads write the same memory.
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t u0, int64_t u1) {
    std::vector<T> s(kBlockQ * kBlockK), dp(kBlockQ * kBlockK), di(kBlockQ);
    for (int64_t bh = u0; bh < u1; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      const int64_t kv_off = (b * d.Hkv + h / group) * d.Lk * D;
      const T *kh = k + kv_off, *vh = v + kv_off, *kh_acc = k_acc + kv_off;
      T* dqh = dq + bh * d.Lq * D;
      T* dkh = dk + bh * d.Lk * D;
      T* dvh = dv + bh * d.Lk * D;
      std::fill(dqh, dqh + d.Lq * D, T(0));
      std::fill(dkh, dkh + d.Lk * D, T(0));
      std::fill(dvh, dvh + d.Lk * D, T(0));
      for (int64_t q0 = 0; q0 < d.Lq; q0 += kBlockQ) {
        const int64_t rows = std::min(kBlockQ, d.Lq - q0), off = (bh * d.Lq + q0) * D;
        const T *qb = q + off, *ob = out + off, *gb = dout + off, *qb_acc = q_acc + off;
        const T *mb = stats + bh * d.Lq + q0, *lb = mb + d.B * d.H * d.Lq;
        for (int64_t r = 0; r < rows; ++r) {
          T acc = 0;
          for (int64_t j = 0; j < D; ++j) acc += gb[r * D + j] * ob[r * D + j];
          di[r] = acc;
        }
        const int64_t kend = d.key_end(q0, rows);
        for (int64_t k0 = 0; k0 < kend; k0 += kBlockK) {
          const int64_t cols = std::min(kBlockK, kend - k0);
          gemm_abt<T>(rows, cols, D, scale, qb, kh + k0 * D, T(0), s.data(), cols);
          const AttnTile<T> tile{s.data(), cols, rows, cols, d.causal, q0 - k0, bias ? bias + b * d.Lk + k0 : nullptr};
          kern.p(tile, mb, lb);
          gemm_atb_acc<T>(rows, cols, D, s.data(), cols, gb, dvh + k0 * D);
          gemm_abt<T>(rows, cols, D, T(1), gb, vh + k0 * D, T(0), dp.data(), cols);
          kern.ds(tile, dp.data(), di.data(), scale);
          gemm_ab_acc<T>(rows, cols, D, dp.data(), cols, kh_acc + k0 * D, dqh + q0 * D);
          gemm_atb_acc<T>(rows, cols, D, dp.data(), cols, qb_acc, dkh + k0 * D);
        }
      }
    }
  });
}

void check_cpu_dtype(const at::Tensor& q) {
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16,
              "attention: on the CPU, q, k and v must be float32, float64 or bfloat16, got ", st);
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& key_padding_mask, bool causal,
                                                 double scale) {
  check_attention_args(q, k, v, key_padding_mask);
  check_cpu_dtype(q);
  const Dims d = dims_of(q, k, causal);
  const auto qm = math_copy(q), km = masked_keys(math_copy(k), key_padding_mask),
             vm = masked_keys(math_copy(v), key_padding_mask);
  const auto acc = qm.scalar_type();
  const bool v_nonfinite = causal && !all_finite(vm);
  auto out = at::empty(q.sizes(), qm.options());
  auto stats = at::empty({2, d.B, d.H, d.Lq}, qm.options());
  const auto bias = key_bias(key_padding_mask, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_cpu", [&] {
    forward_impl<scalar_t>(d, qm.const_data_ptr<scalar_t>(), km.const_data_ptr<scalar_t>(),
                           vm.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                           scalar_t(scale), out.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(), v_nonfinite);
  });
  return {out.to(q.scalar_type()), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& out, const at::Tensor& stats, bool causal,
    double scale) {
  check_attention_args(q, k, v, key_padding_mask);
  check_attention_backward_args(grad, q, out, stats);
  check_cpu_dtype(q);
  const Dims d = dims_of(q, k, causal);
  const auto qm = math_copy(q), km = masked_keys(math_copy(k), key_padding_mask),
             vm = masked_keys(math_copy(v), key_padding_mask), om = math_copy(out), gm = math_copy(grad);
  const auto q_acc = finite_or_zero(qm), k_acc = finite_or_zero(km);
  const auto acc = qm.scalar_type();
  const auto sm = stats.to(acc).contiguous();
  const auto bias = key_bias(key_padding_mask, acc);
  auto dq = at::empty(q.sizes(), qm.options());
  // dK, dV per query head; summed over each group of heads that share a key/value head below
  auto dk = at::empty({d.B, d.H, d.Lk, d.D}, qm.options());
  auto dv = at::empty({d.B, d.H, d.Lk, d.D}, qm.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_backward_cpu", [&] {
    backward_impl<scalar_t>(d, qm.const_data_ptr<scalar_t>(), km.const_data_ptr<scalar_t>(),
                            vm.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                            scalar_t(scale), om.const_data_ptr<scalar_t>(), gm.const_data_ptr<scalar_t>(),
                            sm.const_data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                            dv.data_ptr<scalar_t>(), q_acc.const_data_ptr<scalar_t>(), k_acc.const_data_ptr<scalar_t>());
  });
  if (d.H != d.Hkv) {
    dk = dk.view({d.B, d.Hkv, d.H / d.Hkv, d.Lk, d.D}).sum(2);
    dv = dv.view({d.B, d.Hkv, d.H / d.Hkv, d.Lk, d.D}).sum(2);
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(reuse_core, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace reuse_core
