// Row kernel of fused_linear_distill's sparse (top-k) teacher, templated over a math policy
// (common/cpu_vec.h) so the portable, AVX2 and AVX-512 translation units share one algorithm.
// docs/ops.md defines the two tails and their gradients.
//
// Per row: pass 1 finds the maximum m (and any NaN); pass 2 parks e_j = exp((s_j - m) / T) in a
// per-thread scratch row and sums them (Z). Bucket: pass 3 sums the tail Zr directly over the ids
// not kept (their entries zeroed for it; never Z minus the kept sum, which cancels when the kept
// mass is near 1), and redoes it about the tail's own maximum when the tail lies so far below m
// that its exponentials lost their digits. Renormalize: the kept ids' log-sum-exp about their
// own maximum. Pass 4 writes the gradient as a scale of e (plus the cross entropy's softmax), then
// the k kept entries are rewritten in double. The ids are checked (in range, no repeats) by the
// caller, before any row runs.
#pragma once

#include <algorithm>
#include <vector>

#include "../common/cpu_vec.h"

namespace reuse_core {

struct FLDSparseParams {
  const void* student;    // (n, vocab) logits, float (double when f64)
  const int64_t* idx;     // (n, k) kept ids
  const void* logprobs;   // (n, k), the dtype of student
  const int64_t* labels;  // (n,) or null
  void* grad;             // (n, vocab) gradient of the logits, or null
  void* loss_rows;        // (n,), the dtype of student
  int64_t vocab, k;
  bool bucket, f64;
  double temperature, kd_weight, ce_weight, grad_scale;
  int64_t ignore_index;
};

namespace {

template <class Ops, class X>
struct FLDSparseRows {
  using T = typename Ops::T;
  using V = typename Ops::V;
  using M = typename Ops::M;
  static constexpr int W = Ops::W;

  static void run(const FLDSparseParams& P, int64_t r0, int64_t r1) {
    const int64_t n = P.vocab, k = P.k;
    const T inf = std::numeric_limits<T>::infinity();
    const double invT = 1.0 / P.temperature, Tm = P.temperature;
    const bool tempered = invT != 1.0;
    const bool use_ce = P.ce_weight != 0 && P.labels != nullptr;
    std::vector<T> scratch(2 * n + k);  // per thread: exp((s - m)/T), exp(s - m), the kept e
    std::vector<T> tail_scratch;        // pass 3b's, allocated by the first row that needs it
    T* es = scratch.data();
    T* ec = tempered ? es + n : es;  // the cross entropy's exponentials: the same ones at T = 1
    T* kept = es + 2 * n;
    const V vinvT = Ops::set1(T(invT));

    for (int64_t r = r0; r < r1; ++r) {
      const X* s = static_cast<const X*>(P.student) + r * n;
      const X* lp = static_cast<const X*>(P.logprobs) + r * k;
      const int64_t* ix = P.idx + r * k;
      X* g = P.grad ? static_cast<X*>(P.grad) + r * n : nullptr;
      X* loss = static_cast<X*>(P.loss_rows) + r;
      const int64_t label = P.labels ? P.labels[r] : -1;
      if (P.labels && label == P.ignore_index) {
        ScalarOps<T>::store(loss, T(0));
        if (g) std::memset(static_cast<void*>(g), 0, sizeof(X) * n);
        continue;
      }

      // Pass 1: the maximum; a NaN anywhere makes the row NaN (the max would drop it).
      V vm = Ops::set1(-inf);
      M nan = Ops::none();
      for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
        const V x = vload<Ops, decltype(tail)>(s + i, n - i, -inf);
        vm = Ops::max(vm, x);
        nan = Ops::or_mask(nan, Ops::unordered(x, x));
      });
      bool has_nan = Ops::any(nan);
      for (int64_t i = 0; i < k; ++i) has_nan |= std::isnan(double(lp[i]));
      if (has_nan) {
        ScalarOps<T>::store(loss, std::numeric_limits<T>::quiet_NaN());
        if (g) for (int64_t j = 0; j < n; ++j) ScalarOps<T>::store(g + j, std::numeric_limits<T>::quiet_NaN());
        continue;
      }
      const T m = Ops::reduce_max(vm);
      const T c = m == -inf ? T(0) : m;

      // Pass 2: the exponentials and their sums over all ids.
      const V vc = Ops::set1(c);
      V vz = Ops::set1(0), vzc = Ops::set1(0);
      for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
        using Tl = decltype(tail);
        const V d = Ops::sub(vload<Ops, Tl>(s + i, n - i, -inf), vc);
        const V e = Ops::exp(Ops::mul(d, vinvT));
        vz = Ops::add(vz, e);
        vstore<Ops, Tl>(es + i, e, n - i);
        if (use_ce && tempered) {
          const V e1 = Ops::exp(d);
          vzc = Ops::add(vzc, e1);
          vstore<Ops, Tl>(ec + i, e1, n - i);
        }
      });
      const double Z = Ops::reduce_add(vz);
      const double Zc = !use_ce ? 0.0 : tempered ? double(Ops::reduce_add(vzc)) : Z;

      // Bucket, pass 3: the tail sum Zr over the ids not kept, read from the scratch with the kept
      // entries zeroed. When even its largest term is below 2^-60 (the tail lies over 41 T below the
      // maximum) those exponentials have lost their digits: pass 3b redoes the tail's
      // log-sum-exp about its own maximum m_r, in a third scratch row: log q_r = log Zr +
      // tail_shift - log Z, with tail_shift = (m_r - m) / T.
      for (int64_t i = 0; i < k; ++i) kept[i] = es[ix[i]];
      double Zr = 0, tail_shift = 0;
      const T* er = es;  // the tail's exponentials, about the maximum or about m_r
      if (P.bucket && k < n) {
        for (int64_t i = 0; i < k; ++i) es[ix[i]] = T(0);
        V vr = Ops::set1(0), vrmax = Ops::set1(0);
        for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
          const V e = vload<Ops, decltype(tail)>(es + i, n - i, T(0));
          vr = Ops::add(vr, e);
          vrmax = Ops::max(vrmax, e);
        });
        Zr = Ops::reduce_add(vr);
        for (int64_t i = 0; i < k; ++i) es[ix[i]] = kept[i];
        if (Ops::reduce_max(vrmax) < T(0x1p-60)) {
          tail_scratch.resize(n);
          T* et = tail_scratch.data();
          for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
            using Tl = decltype(tail);
            vstore<Ops, Tl>(et + i, vload<Ops, Tl>(s + i, n - i, -inf), n - i);
          });
          for (int64_t i = 0; i < k; ++i) et[ix[i]] = -inf;
          V vmr = Ops::set1(-inf);
          for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
            vmr = Ops::max(vmr, vload<Ops, decltype(tail)>(et + i, n - i, -inf));
          });
          const T mr = Ops::reduce_max(vmr);
          Zr = 0;
          if (mr > -inf) {
            const V vmr_ = Ops::set1(mr);
            V vz2 = Ops::set1(0);
            for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
              using Tl = decltype(tail);
              const V e = Ops::exp(Ops::mul(Ops::sub(vload<Ops, Tl>(et + i, n - i, -inf), vmr_), vinvT));
              vz2 = Ops::add(vz2, e);
              vstore<Ops, Tl>(et + i, e, n - i);
            });
            Zr = Ops::reduce_add(vz2);
            tail_shift = (double(mr) - double(c)) * invT;
          } else {
            std::fill(et, et + n, T(0));
          }
          er = et;
        }
      }

      // Renormalize: the student over the kept ids, about their own maximum (k terms, in double).
      double cS = -double(inf), ZS = 0;
      if (!P.bucket) {
        for (int64_t i = 0; i < k; ++i) cS = std::max(cS, double(s[ix[i]]));
        if (cS > -double(inf)) for (int64_t i = 0; i < k; ++i) ZS += std::exp((double(s[ix[i]]) - cS) * invT);
      }

      // The teacher: p_i = exp(lp_i), P = their sum, renormalised to 1 when rounding makes P > 1.
      double Pk = 0;
      for (int64_t i = 0; i < k; ++i) Pk += std::exp(double(lp[i]));
      const double logP = std::log(Pk);
      const double pshift = P.bucket ? (Pk > 1 ? logP : 0.0) : logP;  // log p_i = lp_i - pshift
      // A renormalize teacher row with no mass has nothing to teach; a bucket one puts it all in the tail.
      const bool use_kd = P.kd_weight != 0 && (P.bucket || Pk > 0);
      const double rr = P.bucket ? std::max(0.0, 1.0 - std::min(Pk, 1.0)) : 0.0;
      const bool has_tail = P.bucket && k < n && rr > 0;
      const double gq = use_kd ? P.kd_weight * Tm * P.grad_scale : 0.0;
      const double gc = use_ce ? P.ce_weight * P.grad_scale : 0.0;
      const double logZ = std::log(Z);
      // log q_i = (s_i - m) / T - logQ, q over the outcomes compared: all ids (bucket), the kept ones (renormalize)
      const double logQ = P.bucket ? logZ : (cS - double(c)) * invT + std::log(ZS);

      double kl = 0;
      if (use_kd) {
        for (int64_t i = 0; i < k; ++i) {
          const double logp = double(lp[i]) - pshift;
          const double p = std::exp(logp);
          if (p > 0) kl += p * (logp - ((double(s[ix[i]]) - c) * invT - logQ));
        }
        // log q_r = log Zr + tail_shift - log Z; Zr = 0 gives +inf
        if (has_tail) kl += rr * (std::log(rr) - (std::log(Zr) + tail_shift - logZ));
        if (!(Z > 0) || (!P.bucket && !(ZS > 0))) kl = inf;
      }
      double L = use_kd ? P.kd_weight * Tm * Tm * kl : 0.0;
      if (use_ce) L += P.ce_weight * (Zc > 0 ? std::log(Zc) + c - double(s[label]) : double(inf));
      ScalarOps<T>::store(loss, T(L));
      if (!g) continue;

      // Pass 4: off the kept ids the gradient is gq (q_j - r q_j / q_r) = gq (e_j / Z - r er_j / Zr)
      // (bucket) or 0 (renormalize), plus gc exp(s_j - m) / Zc; the kept entries and the label
      // are rewritten after.
      const double invZ = Z > 0 ? 1.0 / Z : 0.0, invZr = Zr > 0 ? 1.0 / Zr : 0.0;
      const double invZc = Zc > 0 ? 1.0 / Zc : 0.0;
      const double a = P.bucket ? gq * invZ : 0.0, a_tail = P.bucket ? -gq * rr * invZr : 0.0;
      const V vb = Ops::set1(T(gc * invZc));
      if (er == es) {
        const V va = Ops::set1(T(a + a_tail));
        for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
          using Tl = decltype(tail);
          V gv = Ops::mul(va, vload<Ops, Tl>(es + i, n - i, T(0)));
          if (use_ce) gv = Ops::fma(vb, vload<Ops, Tl>(ec + i, n - i, T(0)), gv);
          vstore<Ops, Tl>(g + i, gv, n - i);
        });
      } else {
        const V va = Ops::set1(T(a)), vt = Ops::set1(T(a_tail));
        for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
          using Tl = decltype(tail);
          V gv = Ops::fma(vt, vload<Ops, Tl>(er + i, n - i, T(0)), Ops::mul(va, vload<Ops, Tl>(es + i, n - i, T(0))));
          if (use_ce) gv = Ops::fma(vb, vload<Ops, Tl>(ec + i, n - i, T(0)), gv);
          vstore<Ops, Tl>(g + i, gv, n - i);
        });
      }
      // The label's entry gc (q_y - 1) is summed in double and rounded once: rounding gc q_y first
      // and then subtracting gc leaves a row whose terms cancel (a one-id vocabulary) eps gc off 0.
      bool label_kept = false;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t j = ix[i];
        double gj = P.bucket ? gq * double(kept[i]) * invZ
                             : (ZS > 0 ? gq * std::exp((double(s[j]) - cS) * invT) / ZS : 0.0);
        if (use_kd) gj -= gq * std::exp(double(lp[i]) - pshift);
        if (use_ce) gj += gc * double(ec[j]) * invZc;
        if (use_ce && j == label) {
          gj -= gc;
          label_kept = true;
        }
        ScalarOps<T>::store(g + j, T(gj));
      }
      if (use_ce && !label_kept) {
        const double gl = a * double(es[label]) + a_tail * double(er[label]) + gc * double(ec[label]) * invZc - gc;
        ScalarOps<T>::store(g + label, T(gl));
      }
    }
  }
};

}  // namespace

// Rows [r0, r1) of one chunk; the portable one (float and double) lives in
// fused_linear_distill_cpu.cpp, the vector ones (float) in fused_linear_distill_cpu_{avx2,avx512}.cpp.
void fld_sparse_rows_portable(const FLDSparseParams& P, int64_t r0, int64_t r1);
void fld_sparse_rows_avx2(const FLDSparseParams& P, int64_t r0, int64_t r1);
void fld_sparse_rows_avx512(const FLDSparseParams& P, int64_t r0, int64_t r1);

}  // namespace reuse_core
