// Row kernels of the fused ensemble average, templated over a math policy (common/cpu_vec.h)
// so the portable and the AVX2 translation units share one algorithm. Math follows
// KERNEL_NOTES.md ("Ensemble averaging"); every member row (C values) stays in L1/L2 between
// the passes a row needs, so each member is read from memory once per direction.
#pragma once

#include <algorithm>
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
  // (2, K, rows), float (double for float64): each member row's max and log of its sum of
  // exp(z - max). Kept apart, not as max + log(sum): that sum rounds to the max's ulp, which
  // at logits of 1e4 costs 1e-3 relative in every exp(z - lse).
  void* lse;
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

  // Writes e = exp(z - max z) to `e`, max z to `m`, and returns log(sum(e)). A row of -inf is
  // the limit of a constant row, whose softmax is uniform: m = -inf marks it, e = 1 and
  // log(n) is returned. A row holding a NaN: m = NaN and NaN is returned (e is not written).
  static T row_exp_logsum(const X* z, int64_t n, T* e, T& m) {
    const T inf = std::numeric_limits<T>::infinity();
    V vm = Ops::set1(-inf);
    auto bad = Ops::none();
    for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
      const V x = vload<Ops, decltype(tail)>(z + i, n - i, -inf);
      bad = Ops::or_mask(bad, Ops::unordered(x, x));
      vm = Ops::max(vm, x);
    });
    if (Ops::any(bad)) return m = std::numeric_limits<T>::quiet_NaN();
    m = Ops::reduce_max(vm);
    if (m == -inf) {
      for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI { vstore<Ops, decltype(tail)>(e + i, Ops::set1(1), n - i); });
      return std::log(T(n));
    }
    const V c = Ops::set1(m);
    V acc = Ops::set1(0);
    for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
      using Tl = decltype(tail);
      const V x = Ops::exp(Ops::sub(vload<Ops, Tl>(z + i, n - i, -inf), c));
      acc = Ops::add(acc, x);
      vstore<Ops, Tl>(e + i, x, n - i);
    });
    return std::log(Ops::reduce_add(acc));
  }

  // log p_k at class i from the member's saved max and log-sum (see row_exp_logsum).
  static T log_prob(const EnsembleParams& P, int64_t r, int64_t k, int64_t i, const T* lse_m, const T* lse_s) {
    const T m = lse_m[k * P.rows + r], ls = lse_s[k * P.rows + r];
    return m == -std::numeric_limits<T>::infinity() ? -ls : (ScalarOps<T>::load(row_of(P, k, r) + i) - m) - ls;
  }

  // Whether a member row of row r holds a NaN (its saved max is NaN).
  static bool row_has_nan(const EnsembleParams& P, int64_t r, const T* lse_m) {
    for (int64_t k = 0; k < P.K; ++k)
      if (std::isnan(lse_m[k * P.rows + r])) return true;
    return false;
  }

  // The output row r into y[0..C) in the math dtype. `e` is scratch for K rows. Writes the
  // members' lse when `write_lse`, else reads them. A NaN in any member, whatever its weight,
  // makes the row NaN (logits: the entry), as 0 * NaN is NaN in the reference.
  static void compute_row(const EnsembleParams& P, int64_t r, T* y, T* e, bool write_lse) {
    const int64_t n = P.C, K = P.K;
    const T inf = std::numeric_limits<T>::infinity();
    T* lse_m = static_cast<T*>(P.lse);
    T* lse_s = lse_m + K * P.rows;
    for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI { vstore<Ops, decltype(tail)>(y + i, Ops::set1(0), n - i); });
    bool nan_row = false;
    for (int64_t k = 0; k < K; ++k) {
      const X* z = row_of(P, k, r);
      T* ek = e + k * n;
      if (P.mode == kLogitsMode) {
        if (write_lse) lse_m[k * P.rows + r] = lse_s[k * P.rows + r] = 0;
        const V w = Ops::set1(T(P.wn[k]));
        const bool zero = P.wn[k] == 0;
        for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
          using Tl = decltype(tail);
          const V x = vload<Ops, Tl>(z + i, n - i, 0), acc = vload<Ops, Tl>(y + i, n - i, 0);
          // A zero weight adds only its NaN entries: never 0 * (-inf).
          vstore<Ops, Tl>(y + i, zero ? Ops::add(acc, Ops::and_mask(Ops::unordered(x, x), x)) : Ops::fma(w, x, acc), n - i);
        });
        continue;
      }
      // One exp per member element: y accumulates w_k e_k / sum(e_k), e_k = exp(z_k - max z_k).
      if (!write_lse && P.wn[k] == 0) {
        nan_row |= std::isnan(lse_m[k * P.rows + r]);
        continue;
      }
      T m;
      const T ls = row_exp_logsum(z, n, ek, m);
      if (write_lse) {
        lse_m[k * P.rows + r] = m;
        lse_s[k * P.rows + r] = ls;
      }
      nan_row |= std::isnan(m);
      if (nan_row || P.wn[k] == 0) continue;
      const V w = Ops::set1(T(P.wn[k]) * std::exp(-ls));  // w e / sum(e)
      for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
        using Tl = decltype(tail);
        vstore<Ops, Tl>(y + i, Ops::fma(w, vload<Ops, Tl>(ek + i, n - i, 0), vload<Ops, Tl>(y + i, n - i, 0)), n - i);
      });
    }
    if (nan_row) {
      std::fill(y, y + n, std::numeric_limits<T>::quiet_NaN());
      return;
    }
    if (P.mode != kLogProbsMode) return;
    // log of the mixture. Where it is below 1e-30 the float sum may have lost members to
    // underflow: those entries take the exact logsumexp over members instead.
    const V tiny = Ops::set1(T(1e-30));
    bool any_tiny = false;
    for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
      using Tl = decltype(tail);
      const V u = vload<Ops, Tl>(y + i, n - i, 1);
      const auto big = Ops::gt(u, tiny);
      any_tiny |= !Ops::all(big);
      vstore<Ops, Tl>(y + i, Ops::select(big, Ops::log(Ops::max(u, tiny)), Ops::set1(-inf)), n - i);
    });
    if (any_tiny) {
      for (int64_t i = 0; i < n; ++i) {
        if (y[i] != -inf) continue;
        T mx = -inf, sum = 0;
        for (int64_t k = 0; k < K; ++k)
          if (P.wn[k] > 0) mx = ScalarOps<T>::max(mx, T(P.log_wn[k]) + log_prob(P, r, k, i, lse_m, lse_s));
        if (mx == -inf) continue;  // every member gives this class probability 0
        for (int64_t k = 0; k < K; ++k)
          if (P.wn[k] > 0) sum += std::exp(T(P.log_wn[k]) + log_prob(P, r, k, i, lse_m, lse_s) - mx);
        y[i] = mx + std::log(sum);
      }
    }
  }

  static void forward(const EnsembleParams& P, int64_t r0, int64_t r1) {
    std::vector<T> a(P.C), b(P.K * P.C);
    for (int64_t r = r0; r < r1; ++r) {
      compute_row(P, r, a.data(), b.data(), /*write_lse=*/true);
      X* out = static_cast<X*>(P.out) + r * P.C;
      for (int64_t i = 0; i < P.C; i += W) st(out, i, P.C, ld_acc(a.data(), i, P.C));
    }
  }

  static inline V ld_acc(const T* p, int64_t i, int64_t n) {
    return i + W > n ? Ops::load_tail(p + i, n - i, T(0)) : Ops::load(p + i);
  }

  // log_probs: p_k / sum_j w_j p_j at class i, each p_j = exp(lp_j) taken relative to the
  // largest lp_j so nothing rounds at the scale of lp itself.
  static T exact_share(const EnsembleParams& P, int64_t r, int64_t k, int64_t i, const T* lse_m, const T* lse_s) {
    const T inf = std::numeric_limits<T>::infinity();
    auto lp = [&](int64_t j) { return log_prob(P, r, j, i, lse_m, lse_s); };
    T sh = -inf;
    for (int64_t j = 0; j < P.K; ++j)
      if (P.wn[j] > 0) sh = ScalarOps<T>::max(sh, lp(j));
    if (sh == -inf) return 0;
    T acc = 0;
    for (int64_t j = 0; j < P.K; ++j)
      if (P.wn[j] > 0) acc += T(P.wn[j]) * std::exp(lp(j) - sh);
    return std::exp(lp(k) - sh) / acc;
  }

  static void backward(const EnsembleParams& P, int64_t r0, int64_t r1) {
    const int64_t n = P.C, K = P.K;
    const T inf = std::numeric_limits<T>::infinity();
    const T* lse_m = static_cast<const T*>(P.lse);
    const T* lse_s = lse_m + K * P.rows;
    std::vector<T> e(n), p(n), yb(n), ey(n), scratch(sizeof(X) == sizeof(T) ? 0 : K * n);
    for (int64_t r = r0; r < r1; ++r) {
      const X* g = static_cast<const X*>(P.grad) + r * n;
      // y in the math dtype: the saved output when it is stored in it, else recomputed (a
      // 16-bit y would cost the gradients its rounding error, ~1% in log_probs mode).
      if (sizeof(X) == sizeof(T)) {
        for (int64_t i = 0; i < n; i += W) st(yb.data(), i, n, ld(static_cast<const X*>(P.out) + r * n, i, n, 0));
      } else {
        compute_row(P, r, yb.data(), scratch.data(), /*write_lse=*/false);
      }
      const T* y = yb.data();
      // log_probs: where every finite y > -80, e_k = p_k exp(-y) takes one shared exp per entry
      // instead of one per member (exp(80) is still far from overflow).
      bool y_moderate = false;
      if (P.mode == kLogProbsMode) {
        T ymin = inf;
        for (int64_t i = 0; i < n; ++i)
          if (y[i] != -inf && y[i] < ymin) ymin = y[i];
        y_moderate = ymin > T(-80);
        if (y_moderate)
          for (int64_t i = 0; i < n; i += W)
            st(ey.data(), i, n, Ops::and_mask(Ops::gt(ld_acc(y, i, n), Ops::set1(-inf)),
                                              Ops::exp(Ops::sub(Ops::set1(0), ld_acc(y, i, n)))));
      }
      double* dw = P.dw_rows + r * K;
      // A NaN in row r (the reference's pattern): every weight gradient is NaN; in log_probs
      // mode every member's gradient too, in probs mode that of the member holding it. (The
      // saved max marks it; logits mode finds it in y and z below.)
      const bool nan_row = row_has_nan(P, r, lse_m);
      if (nan_row && P.mode == kLogProbsMode) {
        for (int64_t k = 0; k < K; ++k) {
          X* dz = static_cast<X*>(P.grad_members[k]) + r * n;
          for (int64_t i = 0; i < n; i += W) st(dz, i, n, Ops::set1(std::numeric_limits<T>::quiet_NaN()));
          dw[k] = std::numeric_limits<double>::quiet_NaN();
        }
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        const X* z = row_of(P, k, r);
        X* dz = static_cast<X*>(P.grad_members[k]) + r * n;
        const T wk = T(P.wn[k]), m = lse_m[k * P.rows + r], ls = lse_s[k * P.rows + r];
        const bool empty = m == -inf;  // a member row of -inf: uniform, p_k = 1 / C
        if (P.mode == kLogitsMode) {
          // dz_k = w_k g; dw_k = <g, z_k - y> / sum(w), skipping NaN terms (0 * inf, inf - inf).
          V gz = Ops::set1(0);
          const V vw = Ops::set1(wk);
          for (int64_t i = 0; i < n; i += W) {
            const V vg = ld(g, i, n, 0), vz = ld(z, i, n, 0), vy = ld_acc(y, i, n);
            const V t = Ops::mul(vg, Ops::sub(vz, vy));
            // drop the NaN terms of a -inf logit (0 * inf, inf - inf), keep +-inf ones (t*t > -1)
            // and those of a NaN input, in z or (from any member) in y.
            const auto keep = Ops::or_mask(Ops::gt(Ops::mul(t, t), Ops::set1(-1)), Ops::unordered(vz, vy));
            gz = Ops::add(gz, Ops::and_mask(keep, t));
            st(dz, i, n, Ops::mul(vw, vg));
          }
          dw[k] = double(Ops::reduce_add(gz)) * P.inv_wsum;
        } else if (P.mode == kProbsMode) {
          // p_k = softmax(z_k); dz_k = w_k p_k (g - <g, p_k>); dw_k = <g, p_k - y> / sum(w).
          V gp = Ops::set1(0), gpy = Ops::set1(0);
          const V cm = Ops::set1(empty ? T(0) : m), cs = Ops::set1(ls);
          const bool nan_k = std::isnan(m);  // the vector exp would not keep it
          for (int64_t i = 0; i < n; i += W) {
            const V pv = nan_k ? Ops::set1(m) : empty ? Ops::set1(std::exp(-ls))
                                                      : Ops::exp(Ops::sub(Ops::sub(ld(z, i, n, -inf), cm), cs));
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
          const V cm = Ops::set1(empty ? T(0) : m), cs = Ops::set1(ls), one = Ops::set1(1);
          for (int64_t i = 0; i < n; i += W) {
            const V x = empty ? Ops::set1(-ls) : Ops::sub(Ops::sub(ld(z, i, n, -inf), cm), cs);
            const V pv = Ops::exp(x);
            const V ev = y_moderate ? Ops::mul(pv, ld_acc(ey.data(), i, n))
                                    : Ops::and_mask(Ops::gt(ld_acc(y, i, n), Ops::set1(-inf)),
                                                    Ops::exp(Ops::sub(x, ld_acc(y, i, n))));
            st(e.data(), i, n, ev);
            st(p.data(), i, n, pv);
          }
          if (!y_moderate) {
            // Where y < -80 it carries the rounding of a large number (ulp(2e4) = 2e-3), and
            // exp(lp - y) with it: take e_k = p_k / sum_j w_j p_j relative to the largest lp_j.
            for (int64_t i = 0; i < n; ++i)
              if (y[i] < T(-80) && y[i] != -inf) e[i] = exact_share(P, r, k, i, lse_m, lse_s);
          }
          V ge = Ops::set1(0), ge1 = Ops::set1(0);
          for (int64_t i = 0; i < n; i += W) {
            const V vg = ld(g, i, n, 0), ev = ld_acc(e.data(), i, n);
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

// Rows [r0, r1); the portable one lives in ensemble_average_cpu.cpp, the vector ones in
// ensemble_average_cpu_{avx2,avx512}.cpp (float32/bfloat16 storage only).
void ensemble_rows_portable(const EnsembleParams& P, int64_t r0, int64_t r1, bool backward);
void ensemble_rows_avx2(const EnsembleParams& P, int64_t r0, int64_t r1, bool backward);
void ensemble_rows_avx512(const EnsembleParams& P, int64_t r0, int64_t r1, bool backward);

}  // namespace reuse_core
