// The element-wise parts of the CPU flash attention, per tile of scores, templated over a math
// policy (common/cpu_vec.h) so the portable, AVX2 and AVX-512 translation units share one
// algorithm. The matrix products around them are BLAS calls in attention_cpu.cpp; this header
// includes no ATen (see cpu_vec.h for why).
//
// A tile is `rows` query rows by `cols` keys of S = scale * Q K^T, row-major with stride `lds`.
// Masks: with `causal`, row r keeps its first clamp(diag + r + 1, 0, cols) columns (diag is the
// tile's first query index minus its first key index: key j is masked for query i when j > i);
// `bias` (or null) is 0 or -inf per column (the key padding mask): a -inf column is masked, even
// where its score is NaN. A NaN among a row's kept scores makes the row NaN.
#pragma once

#include "../common/cpu_vec.h"

namespace reuse_core {

template <typename T>
struct AttnTile {
  T* s;
  int64_t lds, rows, cols;
  bool causal;
  int64_t diag;
  const T* bias;
};

// Forward: online-softmax step. S becomes P = exp(S - m_new) (0 where masked); m (running max)
// and l (running sum) are updated, and each row of O (stride ldo, D columns) is scaled by
// exp(m_old - m_new) so that O += P V can follow. A row with a NaN score gets P = NaN at its kept
// columns and l = NaN, so O += P V makes its output NaN.
void attention_fwd_tile_portable(const AttnTile<float>& t, float* m, float* l, float* o, int64_t ldo, int64_t D);
void attention_fwd_tile_portable(const AttnTile<double>& t, double* m, double* l, double* o, int64_t ldo, int64_t D);
void attention_fwd_tile_avx2(const AttnTile<float>& t, float* m, float* l, float* o, int64_t ldo, int64_t D);
void attention_fwd_tile_avx512(const AttnTile<float>& t, float* m, float* l, float* o, int64_t ldo, int64_t D);
// Backward: S becomes P = exp((S - m) - log_l) per row, from the forward's row max m and log
// of the sum (0 where masked, and for fully masked rows, which have m = +inf; NaN at the kept
// columns of a NaN row, which has m = NaN). Subtracting m
// first keeps float32 precision where scores are large: S - m is exact near the max, while a
// rounded logsumexp of ~1e3 would be off by 3e-5 in every exponent.
void attention_bwd_p_portable(const AttnTile<float>& t, const float* m, const float* log_l);
void attention_bwd_p_portable(const AttnTile<double>& t, const double* m, const double* log_l);
void attention_bwd_p_avx2(const AttnTile<float>& t, const float* m, const float* log_l);
void attention_bwd_p_avx512(const AttnTile<float>& t, const float* m, const float* log_l);
// Backward: dP (same layout as P = t.s) becomes dS = scale * P * (dP - Di), 0 where masked.
void attention_bwd_ds_portable(const AttnTile<float>& t, float* dp, const float* di, float scale);
void attention_bwd_ds_portable(const AttnTile<double>& t, double* dp, const double* di, double scale);
void attention_bwd_ds_avx2(const AttnTile<float>& t, float* dp, const float* di, float scale);
void attention_bwd_ds_avx512(const AttnTile<float>& t, float* dp, const float* di, float scale);

namespace {

template <class Ops>
struct AttentionRows {
  using T = typename Ops::T;
  using V = typename Ops::V;
  static constexpr int W = Ops::W;

  static inline int64_t kept(const AttnTile<T>& t, int64_t r) {
    if (!t.causal) return t.cols;
    const int64_t n = t.diag + r + 1;
    return n < 0 ? 0 : n > t.cols ? t.cols : n;
  }

  static inline void zero(T* p, int64_t n) {
    for (int64_t j = 0; j < n; ++j) p[j] = T(0);
  }

  // x, or -inf where the key padding bias masks the column (bias -inf), NaN or not.
  static inline V masked_by(V bias, V x) {
    return Ops::select(Ops::gt(bias, Ops::set1(-std::numeric_limits<T>::infinity())), x, bias);
  }

  // P of a NaN row: NaN at its kept columns, 0 at the masked ones.
  static void nan_row(const AttnTile<T>& t, T* s, int64_t n) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (int64_t j = 0; j < n; ++j) s[j] = t.bias && t.bias[j] < T(0) ? T(0) : nan;
    zero(s + n, t.cols - n);
  }

  static void fwd_tile(const AttnTile<T>& t, T* m, T* l, T* o, int64_t ldo, int64_t D) {
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t r = 0; r < t.rows; ++r) {
      T* s = t.s + r * t.lds;
      const int64_t n = kept(t, r);
      V vmax = Ops::set1(ninf);
      auto bad = Ops::none();
      if (t.bias) {
        const T* bias = t.bias;
        for_chunks<W>(n, [&](int64_t j, auto tail) REUSE_AI {
          const V x = masked_by(vload<Ops, decltype(tail)>(bias + j, n - j, 0), vload<Ops, decltype(tail)>(s + j, n - j, ninf));
          vstore<Ops, decltype(tail)>(s + j, x, n - j);
          bad = Ops::or_mask(bad, Ops::unordered(x, x));
          vmax = Ops::max(vmax, x);
        });
      } else {
        for_chunks<W>(n, [&](int64_t j, auto tail) REUSE_AI {
          const V x = vload<Ops, decltype(tail)>(s + j, n - j, ninf);
          bad = Ops::or_mask(bad, Ops::unordered(x, x));
          vmax = Ops::max(vmax, x);
        });
      }
      if (Ops::any(bad)) {  // the max and the vector exp would both drop the NaN
        nan_row(t, s, n);
        l[r] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      const T mx = Ops::reduce_max(vmax);
      const T m_new = mx > m[r] ? mx : m[r];
      if (m_new == ninf) {  // every key so far masked: P = 0, O and l stay 0
        zero(s, t.cols);
        continue;
      }
      const V vm = Ops::set1(m_new);
      V vsum = Ops::set1(0);
      for_chunks<W>(n, [&](int64_t j, auto tail) REUSE_AI {
        const V p = Ops::exp(Ops::sub(vload<Ops, decltype(tail)>(s + j, n - j, ninf), vm));
        vstore<Ops, decltype(tail)>(s + j, p, n - j);
        vsum = Ops::add(vsum, p);
      });
      zero(s + n, t.cols - n);
      const T alpha = m[r] == ninf ? T(0) : T(std::exp(m[r] - m_new));
      l[r] = l[r] * alpha + Ops::reduce_add(vsum);
      m[r] = m_new;
      if (alpha != T(1)) {
        T* orow = o + r * ldo;
        const V va = Ops::set1(alpha);
        for_chunks<W>(D, [&](int64_t j, auto tail) REUSE_AI {
          vstore<Ops, decltype(tail)>(orow + j, Ops::mul(vload<Ops, decltype(tail)>(orow + j, D - j, 0), va), D - j);
        });
      }
    }
  }

  static void bwd_p(const AttnTile<T>& t, const T* m, const T* log_l) {
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t r = 0; r < t.rows; ++r) {
      T* s = t.s + r * t.lds;
      if (std::isnan(m[r])) {
        nan_row(t, s, kept(t, r));
        continue;
      }
      const int64_t n = std::isinf(m[r]) ? 0 : kept(t, r);  // m = +inf: a fully masked row
      const V vm = Ops::set1(m[r]), vl = Ops::set1(log_l[r]);
      if (t.bias) {
        const T* bias = t.bias;
        for_chunks<W>(n, [&](int64_t j, auto tail) REUSE_AI {
          const V x = masked_by(vload<Ops, decltype(tail)>(bias + j, n - j, 0), vload<Ops, decltype(tail)>(s + j, n - j, ninf));
          vstore<Ops, decltype(tail)>(s + j, Ops::exp(Ops::sub(Ops::sub(x, vm), vl)), n - j);
        });
      } else {
        for_chunks<W>(n, [&](int64_t j, auto tail) REUSE_AI {
          const V x = vload<Ops, decltype(tail)>(s + j, n - j, ninf);
          vstore<Ops, decltype(tail)>(s + j, Ops::exp(Ops::sub(Ops::sub(x, vm), vl)), n - j);
        });
      }
      zero(s + n, t.cols - n);
    }
  }

  static void bwd_ds(const AttnTile<T>& t, T* dp, const T* di, T scale) {
    const V vs = Ops::set1(scale);
    for (int64_t r = 0; r < t.rows; ++r) {
      const T* p = t.s + r * t.lds;
      T* d = dp + r * t.lds;
      const int64_t n = kept(t, r);
      const V vd = Ops::set1(di[r]);
      for_chunks<W>(n, [&](int64_t j, auto tail) REUSE_AI {
        V x = Ops::mul(Ops::mul(vload<Ops, decltype(tail)>(p + j, n - j, 0), vs),
                       Ops::sub(vload<Ops, decltype(tail)>(d + j, n - j, 0), vd));
        // P = 0 there, but dP - Di may be NaN (a NaN v, or Di of a NaN row)
        if (t.bias) x = Ops::and_mask(Ops::gt(vload<Ops, decltype(tail)>(t.bias + j, n - j, 0), Ops::set1(-std::numeric_limits<T>::infinity())), x);
        vstore<Ops, decltype(tail)>(d + j, x, n - j);
      });
      zero(d + n, t.cols - n);
    }
  }
};

}  // namespace

}  // namespace reuse_core
