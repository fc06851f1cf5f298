// Row kernels of the fused ensemble average, templated over a math policy (common/cpu_vec.h)
// so the portable and the AVX2 translation units share one algorithm. Math follows
// KERNEL_NOTES.md ("Ensemble averaging"); every member row (C values) stays in L1/L2 between
// the passes a row needs, so each member is read from memory once per direction.
#pragma once

#include <vector>

#include "../common/cpu_vec.h"

namespace reuse_core {

struct EnsembleParams {
  int64_t K, C, rows;
  int64_t mode;                   // EnsembleMode
  DType dtype;                    // members, output and member gradients
  const void* const* members;     // K row-major (rows, C) blocks
  const double* wn;               // normalised weights w_k / sum(w)
  const double* log_wn;           // log(wn), -inf for a zero weight
  double inv_wsum;                // 1 / sum(w)
  void* out;                      // (rows, C)
  void* lse;                      // (K, rows), float (double for float64)
  // backward only
  const void* grad;               // (rows, C)
  void* const* grad_members;      // K blocks
  double* dw_rows;                // (rows, K) per-row contributions to dL/dw
};

namespace {

template <class Ops, class X>
struct EnsembleRows {
  using T = typename Ops::T;
  using V = typename Ops::V;
  static constexpr int W = Ops::W;

  static inline V ld(const X* p, int64_t i, int64_t n, T fill) {
    return i + W > n ? Ops::load_tail(p + i, n - i, fill) : Ops::load(p + i);
  }
  template <class Y>
  static inline void st(Y* p, int64_t i, int64_t n, V v) {
    if (i + W > n) Ops::store_tail(p + i, v, n - i); else Ops::store(p + i, v);
  }
  static inline const X* row_of(const EnsembleParams& P, int64_t k, int64_t r) {
    return static_cast<const X*>(P.members[k]) + r * P.C;
  }

  // logsumexp of one row; -inf for a row of -inf.
  static T row_lse(const X* z, int64_t n) {
    const T inf = std::numeric_limits<T>::infinity();
    V vm = Ops::set1(-inf);
    for (int64_t i = 0; i < n; i += W) vm = Ops::max(vm, ld(z, i, n, -inf));
    const T m = Ops::reduce_max(vm);
    if (m == -inf) return -inf;
    const V c = Ops::set1(m);
    V acc = Ops::set1(0);
    for (int64_t i = 0; i < n; i += W) acc = Ops::add(acc, Ops::exp(Ops::sub(ld(z, i, n, -inf), c)));
    return m + std::log(Ops::reduce_add(acc));
  }

  // The output row r into a[0..C) in the math dtype (b: scratch). Writes the members' lse
  // when `write_lse`, else reads them.
  static void compute_row(const EnsembleParams& P, int64_t r, T* a, T* b, bool write_lse) {
    const int64_t n = P.C, K = P.K;
    const T inf = std::numeric_limits<T>::infinity();
    T* lse = static_cast<T*>(P.lse);
    for (int64_t i = 0; i < n; i += W) st(a, i, n, Ops::set1(P.mode == kLogProbsMode ? -inf : T(0)));
    if (P.mode == kLogProbsMode)
      for (int64_t i = 0; i < n; i += W) st(b, i, n, Ops::set1(0));
    for (int64_t k = 0; k < K; ++k) {
      const X* z = row_of(P, k, r);
      if (write_lse) lse[k * P.rows + r] = P.mode == kLogitsMode ? T(0) : row_lse(z, n);
      const T l = lse[k * P.rows + r];
      if (P.wn[k] == 0 || l == -inf) continue;  // no contribution (and no 0 * -inf)
      const V w = Ops::set1(T(P.wn[k])), c = Ops::set1(l);
      for (int64_t i = 0; i < n; i += W) {
        const V x = ld(z, i, n, -inf);
        if (P.mode == kLogitsMode) {
          st(a, i, n, Ops::fma(w, x, ld_acc(a, i, n)));
        } else if (P.mode == kProbsMode) {
          st(a, i, n, Ops::fma(w, Ops::exp(Ops::sub(x, c)), ld_acc(a, i, n)));
        } else {
          st(a, i, n, Ops::max(ld_acc(a, i, n), Ops::add(Ops::sub(x, c), Ops::set1(T(P.log_wn[k])))));
        }
      }
    }
    if (P.mode != kLogProbsMode) return;
    for (int64_t k = 0; k < K; ++k) {  // second sweep: sum exp(x - max) with the final max
      const T l = lse[k * P.rows + r];
      if (P.wn[k] == 0 || l == -inf) continue;
      const V c = Ops::set1(T(P.log_wn[k]) - l);
      for (int64_t i = 0; i < n; i += W) {
        const V x = Ops::add(ld(row_of(P, k, r), i, n, -inf), c);
        const V m = ld_acc(a, i, n);
        // m = -inf only where every member gives probability 0: that entry stays -inf.
        const V e = Ops::and_mask(Ops::gt(m, Ops::set1(-inf)), Ops::exp(Ops::sub(x, m)));
        st(b, i, n, Ops::add(ld_acc(b, i, n), e));
      }
    }
    for (int64_t i = 0; i < n; ++i) a[i] = a[i] == -inf ? -inf : a[i] + std::log(b[i]);
  }

  static void forward(const EnsembleParams& P, int64_t r0, int64_t r1) {
    std::vector<T> a(P.C), b(P.C);
    for (int64_t r = r0; r < r1; ++r) {
      compute_row(P, r, a.data(), b.data(), /*write_lse=*/true);
      X* out = static_cast<X*>(P.out) + r * P.C;
      for (int64_t i = 0; i < P.C; i += W) st(out, i, P.C, ld_acc(a.data(), i, P.C));
    }
  }

  static inline V ld_acc(const T* p, int64_t i, int64_t n) {
    return i + W > n ? Ops::load_tail(p + i, n - i, T(0)) : Ops::load(p + i);
  }

  static void backward(const EnsembleParams& P, int64_t r0, int64_t r1) {
    const int64_t n = P.C, K = P.K;
    const T inf = std::numeric_limits<T>::infinity();
    const T* lse = static_cast<const T*>(P.lse);
    std::vector<T> e(n), p(n), yb(n);
    for (int64_t r = r0; r < r1; ++r) {
      const X* g = static_cast<const X*>(P.grad) + r * n;
      // y in the math dtype: the saved output when it is stored in it, else recomputed (a
      // 16-bit y would cost the gradients its rounding error, ~1% in log_probs mode).
      if (sizeof(X) == sizeof(T)) {
        for (int64_t i = 0; i < n; i += W) st(yb.data(), i, n, ld(static_cast<const X*>(P.out) + r * n, i, n, 0));
      } else {
        compute_row(P, r, yb.data(), e.data(), /*write_lse=*/false);
      }
      const T* y = yb.data();
      double* dw = P.dw_rows + r * K;
      for (int64_t k = 0; k < K; ++k) {
        const X* z = row_of(P, k, r);
        X* dz = static_cast<X*>(P.grad_members[k]) + r * n;
        const T wk = T(P.wn[k]), l = lse[k * P.rows + r];
        if (P.mode == kLogitsMode) {
          // dz_k = w_k g; dw_k = <g, z_k - y> / sum(w), skipping inf - inf entries.
          V gz = Ops::set1(0);
          const V vw = Ops::set1(wk);
          for (int64_t i = 0; i < n; i += W) {
            const V vg = ld(g, i, n, 0), d = Ops::sub(ld(z, i, n, 0), ld_acc(y, i, n));
            gz = Ops::add(gz, Ops::and_mask(Ops::gt(Ops::mul(d, d), Ops::set1(-1)), Ops::mul(vg, d)));
            st(dz, i, n, Ops::mul(vw, vg));
          }
          dw[k] = double(Ops::reduce_add(gz)) * P.inv_wsum;
        } else if (P.mode == kProbsMode) {
          // p_k = softmax(z_k); dz_k = w_k p_k (g - <g, p_k>); dw_k = <g, p_k - y> / sum(w).
          V gp = Ops::set1(0), gpy = Ops::set1(0);
          const V c = Ops::set1(l == -inf ? T(0) : l);
          for (int64_t i = 0; i < n; i += W) {
            const V pv = l == -inf ? Ops::set1(0) : Ops::exp(Ops::sub(ld(z, i, n, -inf), c));
            st(p.data(), i, n, pv);
            const V vg = ld(g, i, n, 0);
            gp = Ops::fma(vg, pv, gp);
            gpy = Ops::fma(vg, Ops::sub(pv, ld_acc(y, i, n)), gpy);  // <g, p_k - y>, no cancellation
          }
          const T gp_s = Ops::reduce_add(gp);
          dw[k] = double(Ops::reduce_add(gpy)) * P.inv_wsum;
          const V vw = Ops::set1(wk), vgp = Ops::set1(gp_s);
          for (int64_t i = 0; i < n; i += W)
            st(dz, i, n, Ops::mul(Ops::mul(vw, ld_acc(p.data(), i, n)), Ops::sub(ld(g, i, n, 0), vgp)));
        } else {
          // e_k = p_k / exp(y) (0 where y = -inf), r_k = w_k e_k;
          // dz_k = r_k g - p_k <r_k, g>; dw_k = <g, e_k - 1> / sum(w).
          V ge = Ops::set1(0), ge1 = Ops::set1(0);
          const V c = Ops::set1(l == -inf ? T(0) : l), one = Ops::set1(1);
          for (int64_t i = 0; i < n; i += W) {
            const V x = l == -inf ? Ops::set1(-inf) : Ops::sub(ld(z, i, n, -inf), c);
            const V vy = ld_acc(y, i, n);
            const V ev = Ops::and_mask(Ops::gt(vy, Ops::set1(-inf)), Ops::exp(Ops::sub(x, vy)));
            st(e.data(), i, n, ev);
            st(p.data(), i, n, Ops::exp(x));
            const V vg = ld(g, i, n, 0);
            ge = Ops::fma(vg, ev, ge);
            ge1 = Ops::fma(vg, Ops::sub(ev, one), ge1);  // <g, e_k - 1>, no cancellation
          }
          const T ge_s = Ops::reduce_add(ge);
          dw[k] = double(Ops::reduce_add(ge1)) * P.inv_wsum;
          if (wk == 0) {  // r_k = 0 exactly; e_k may overflow where this member alone has mass
            std::memset(static_cast<void*>(dz), 0, sizeof(X) * n);
            continue;
          }
          const V vw = Ops::set1(wk), vrg = Ops::set1(wk * ge_s);
          for (int64_t i = 0; i < n; i += W) {
            const V dv = Ops::sub(Ops::mul(Ops::mul(vw, ld_acc(e.data(), i, n)), ld(g, i, n, 0)),
                                  Ops::mul(ld_acc(p.data(), i, n), vrg));
            st(dz, i, n, dv);
          }
        }
      }
    }
  }

  static constexpr int64_t kLogitsMode = 0, kProbsMode = 1, kLogProbsMode = 2;
};

template <class Ops>
void ensemble_rows_run(const EnsembleParams& P, int64_t r0, int64_t r1, bool backward) {
  visit_dtype<Ops::kWithF64>(P.dtype, [&](auto tag) {
    using R = EnsembleRows<Ops, decltype(tag)>;
    if (backward) R::backward(P, r0, r1); else R::forward(P, r0, r1);
  });
}

}  // namespace

// Rows [r0, r1); the portable one lives in ensemble_average_cpu.cpp, the AVX2 one in
// ensemble_average_cpu_avx2.cpp (float32/bfloat16 storage only).
void ensemble_rows_portable(const EnsembleParams& P, int64_t r0, int64_t r1, bool backward);
void ensemble_rows_avx2(const EnsembleParams& P, int64_t r0, int64_t r1, bool backward);

}  // namespace reuse_core
