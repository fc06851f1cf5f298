// Row kernel of the fused distillation loss, templated over a math policy (common/cpu_vec.h)
// so the portable and the AVX2 translation units share one algorithm.
//
// Per row (KERNEL_NOTES.md): pass 1 reads s and t once from memory, in blocks that stay in L1,
// keeps the running maxima and the sums of exp((x - max) / T) (and of exp(s - max) for the
// cross entropy) and parks those exponentials in a per-thread scratch row; pass 2 re-reads the
// row (from cache) and the scratch, and writes the student gradient while it sums the KL term;
// pass 3 runs only when the teacher needs a gradient too.
#pragma once

#include <vector>

#include "../common/cpu_vec.h"

namespace reuse_core {

struct DistillKLParams {
  const void* student;
  const void* teacher;
  const int64_t* labels;  // null: no labels
  void* grad_student;     // null: not wanted
  void* grad_teacher;     // null: not wanted
  void* loss_rows;        // float (double for float64 math), one per row
  int64_t vocab;
  double temperature, kd_weight, ce_weight, grad_scale;  // grad_scale: reduction factor
  int64_t ignore_index;
  DType student_dtype, teacher_dtype;
};

namespace {

template <class Ops, class S, class Tt>
struct DistillKLRows {
  using T = typename Ops::T;
  using V = typename Ops::V;
  using M = typename Ops::M;
  static constexpr int W = Ops::W;
  static constexpr int64_t kBlock = 1024;  // elements per L1 block in pass 1

  static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

  static void run(const DistillKLParams& P, int64_t r0, int64_t r1) {
    const int64_t n = P.vocab;
    const T inf = std::numeric_limits<T>::infinity();
    const T invT = T(1.0 / P.temperature);
    const T T_ = T(P.temperature);
    const T kd = T(P.kd_weight), ce = T(P.ce_weight);
    const bool use_ce = P.ce_weight != 0 && P.labels != nullptr;
    const bool tempered = invT != T(1);
    T* loss_rows = static_cast<T*>(P.loss_rows);
    const int64_t nblocks = (n + kBlock - 1) / kBlock;
    std::vector<T> scratch(3 * n + 2 * nblocks);  // per thread: exps of s/T, t/T, s; block maxima
    T* es = scratch.data();
    T* et = es + n;
    T* ec = et + n;
    T* block_ms = ec + n;
    T* block_mt = block_ms + nblocks;

    for (int64_t r = r0; r < r1; ++r) {
      const S* s = static_cast<const S*>(P.student) + r * n;
      const Tt* t = static_cast<const Tt*>(P.teacher) + r * n;
      S* gs = P.grad_student ? static_cast<S*>(P.grad_student) + r * n : nullptr;
      Tt* gt = P.grad_teacher ? static_cast<Tt*>(P.grad_teacher) + r * n : nullptr;
      const int64_t label = P.labels ? P.labels[r] : -1;
      if (P.labels && label == P.ignore_index) {
        loss_rows[r] = 0;
        if (gs) fill_zero(gs, n);
        if (gt) fill_zero(gt, n);
        continue;
      }

      // Pass 1: maxima and sums of exponentials, online across L1-sized blocks. The
      // exponentials go to a per-thread scratch row (L2), each block relative to the running
      // maximum it saw; pass 2 rescales them per block instead of recomputing them.
      T ms = -inf, mt = -inf;
      V sum_s = Ops::set1(0), sum_t = Ops::set1(0), sum_c = Ops::set1(0);
      const V vinvT = Ops::set1(invT);
      M has_nan = Ops::none();  // a NaN anywhere in s or t: the max below would drop it, depending on its lane
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t b0 = blk * kBlock, len = min64(kBlock, n - b0);
        const S* sb = s + b0;
        const Tt* tb = t + b0;
        T* xs = es + b0;
        T* xt = et + b0;
        T* xc = ec + b0;
        V vms = Ops::set1(-inf), vmt = Ops::set1(-inf);
        for_chunks<W>(len, [&](int64_t i, auto tail) REUSE_AI {
          using Tl = decltype(tail);
          const V vs = vload<Ops, Tl>(sb + i, len - i, -inf), vt = vload<Ops, Tl>(tb + i, len - i, -inf);
          vms = Ops::max(vms, vs);
          vmt = Ops::max(vmt, vt);
          has_nan = Ops::or_mask(has_nan, Ops::unordered(vs, vt));
        });
        const T bms = Ops::reduce_max(vms), bmt = Ops::reduce_max(vmt);
        if (bms > ms) {  // rescale the running sums to the new maximum
          sum_s = Ops::mul(sum_s, Ops::exp(Ops::set1((ms - bms) * invT)));
          if (use_ce) sum_c = Ops::mul(sum_c, Ops::exp(Ops::set1(ms - bms)));
          ms = bms;
        }
        if (bmt > mt) {
          sum_t = Ops::mul(sum_t, Ops::exp(Ops::set1((mt - bmt) * invT)));
          mt = bmt;
        }
        block_ms[blk] = ms;
        block_mt[blk] = mt;
        // Centre on the raw maximum before scaling by 1/T (KERNEL_NOTES: exp((x - m)/T)).
        const V cs = Ops::set1(ms == -inf ? T(0) : ms), ct = Ops::set1(mt == -inf ? T(0) : mt);
        for_chunks<W>(len, [&](int64_t i, auto tail) REUSE_AI {
          using Tl = decltype(tail);
          const V ds = Ops::sub(vload<Ops, Tl>(sb + i, len - i, -inf), cs);
          const V vs = Ops::exp(Ops::mul(ds, vinvT));
          const V vt = Ops::exp(Ops::mul(Ops::sub(vload<Ops, Tl>(tb + i, len - i, -inf), ct), vinvT));
          sum_s = Ops::add(sum_s, vs);
          sum_t = Ops::add(sum_t, vt);
          vstore<Ops, Tl>(xs + i, vs, len - i);
          vstore<Ops, Tl>(xt + i, vt, len - i);
          if (use_ce) {
            const V vc = tempered ? Ops::exp(ds) : vs;
            sum_c = Ops::add(sum_c, vc);
            vstore<Ops, Tl>(xc + i, vc, len - i);
          }
        });
      }
      if (Ops::any(has_nan)) {  // every output of the row depends on every input: all NaN (the reference's)
        loss_rows[r] = std::numeric_limits<T>::quiet_NaN();
        if (gs) fill_nan(gs, n);
        if (gt) fill_nan(gt, n);
        continue;
      }
      const T Ss = Ops::reduce_add(sum_s), St = Ops::reduce_add(sum_t), Sc = Ops::reduce_add(sum_c);
      const T cs0 = ms == -inf ? T(0) : ms, ct0 = mt == -inf ? T(0) : mt;
      const T inv_Ss = Ss > 0 ? T(1) / Ss : T(0);
      const T inv_St = St > 0 ? T(1) / St : T(0);
      const T inv_Sc = Sc > 0 ? T(1) / Sc : T(0);
      const bool use_kd = kd != 0 && St > 0;  // a teacher row with no mass has nothing to teach
      const T gq = use_kd ? kd * T_ * T(P.grad_scale) : T(0);
      const T gc = use_ce ? ce * T(P.grad_scale) : T(0);

      // Pass 2: the student gradient and the KL sum  sum_v p_v (b_v - a_v), with
      // a = (s - max s)/T, b = (t - max t)/T, q = softmax(s/T), p = softmax(t/T).
      const V vcs = Ops::set1(cs0), vct = Ops::set1(ct0);
      const V vgq = Ops::set1(gq), vgc = Ops::set1(gc), zero = Ops::set1(0);
      V kl = Ops::set1(0);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t b0 = blk * kBlock, len = min64(kBlock, n - b0);
        // This block's exponentials were taken relative to block_m*: bring them to the final
        // maxima and normalise in one factor per block.
        const V fs = Ops::set1(block_ms[blk] == -inf ? T(0) : std::exp((block_ms[blk] - cs0) * invT) * inv_Ss);
        const V ft = Ops::set1(block_mt[blk] == -inf ? T(0) : std::exp((block_mt[blk] - ct0) * invT) * inv_St);
        const V fc = Ops::set1(block_ms[blk] == -inf ? T(0) : std::exp(block_ms[blk] - cs0) * inv_Sc);
        const S* sb = s + b0;
        const Tt* tb = t + b0;
        const T* xs = es + b0;
        const T* xt = et + b0;
        const T* xc = ec + b0;
        S* gb = gs ? gs + b0 : nullptr;
        for_chunks<W>(len, [&](int64_t i, auto tail) REUSE_AI {
          using Tl = decltype(tail);
          const V p = Ops::mul(vload<Ops, Tl>(xt + i, len - i, 0), ft);
          const V a = Ops::mul(Ops::sub(vload<Ops, Tl>(sb + i, len - i, -inf), vcs), vinvT);
          const V b = Ops::mul(Ops::sub(vload<Ops, Tl>(tb + i, len - i, -inf), vct), vinvT);
          // p == 0 contributes 0, never 0 * (-inf) = NaN.
          kl = Ops::add(kl, Ops::and_mask(Ops::gt(p, zero), Ops::mul(p, Ops::sub(b, a))));
          if (gb) {
            const V q = Ops::mul(vload<Ops, Tl>(xs + i, len - i, 0), fs);
            V g = Ops::mul(vgq, Ops::sub(q, p));
            if (use_ce) g = Ops::fma(vgc, Ops::mul(vload<Ops, Tl>(xc + i, len - i, 0), fc), g);
            vstore<Ops, Tl>(gb + i, g, len - i);
          }
        });
      }
      if (gs && use_ce && gc != 0) {  // the one-hot term, on the label's element alone
        const T x = ScalarOps<T>::load(s + label);
        const T q = std::exp((x - cs0) * invT) * inv_Ss;
        const T p = std::exp((ScalarOps<T>::load(t + label) - ct0) * invT) * inv_St;
        const T sm = std::exp(x - cs0) * inv_Sc;
        ScalarOps<T>::store(gs + label, gq * (q - p) + gc * (sm - T(1)));
      }

      // Loss of the row, with the infinite cases made explicit instead of inf - inf.
      const T e_p = Ops::reduce_add(kl);  // E_p[b - a], +inf if the student has -inf where p > 0
      T loss = 0;
      bool kl_infinite = false;
      if (use_kd) {
        kl_infinite = !(Ss > 0) || e_p == inf;
        const T kl_row = kl_infinite ? inf : e_p - std::log(St) + std::log(Ss);
        loss += kd * T_ * T_ * kl_row;
      }
      if (use_ce) {
        const T s_y = ScalarOps<T>::load(s + label);
        loss += ce * (Sc > 0 ? std::log(Sc) + cs0 - s_y : inf);
      }
      loss_rows[r] = loss;

      // Pass 3 (mutual learning only): dL/dt = kd T p (log p - log q - KL)
      //                                       = kd T p ((b - a) - E_p[b - a]).
      if (gt) {
        if (!use_kd || kl_infinite) {  // inf - inf: defined as 0 (documented)
          fill_zero(gt, n);
          continue;
        }
        const V ve_p = Ops::set1(e_p), vinv_St = Ops::set1(inv_St);
        for_chunks<W>(n, [&](int64_t i, auto tail) REUSE_AI {
          using Tl = decltype(tail);
          const V a = Ops::mul(Ops::sub(vload<Ops, Tl>(s + i, n - i, -inf), vcs), vinvT);
          const V b = Ops::mul(Ops::sub(vload<Ops, Tl>(t + i, n - i, -inf), vct), vinvT);
          const V p = Ops::mul(Ops::exp(b), vinv_St);
          const V d = Ops::sub(Ops::sub(b, a), ve_p);
          vstore<Ops, Tl>(gt + i, Ops::and_mask(Ops::gt(p, zero), Ops::mul(Ops::mul(vgq, p), d)), n - i);
        });
      }
    }
  }

  template <class X>
  static inline void fill_nan(X* p, int64_t n) {
    for (int64_t i = 0; i < n; ++i) ScalarOps<T>::store(p + i, std::numeric_limits<T>::quiet_NaN());
  }

  template <class X>
  static inline void fill_zero(X* p, int64_t n) {
    std::memset(static_cast<void*>(p), 0, sizeof(X) * n);
  }
};

template <class Ops>
void distill_kl_rows_run(const DistillKLParams& P, int64_t r0, int64_t r1) {
  visit_dtype<Ops::kWithF64>(P.student_dtype, [&](auto s_tag) {
    visit_dtype<Ops::kWithF64>(P.teacher_dtype, [&](auto t_tag) {
      DistillKLRows<Ops, decltype(s_tag), decltype(t_tag)>::run(P, r0, r1);
    });
  });
}

}  // namespace

// Rows [r0, r1) on the dtypes in P; the portable one lives in distill_kl_cpu.cpp, the vector
// ones in distill_kl_cpu_{avx2,avx512}.cpp (float32/bfloat16 storage only).
void distill_kl_rows_portable(const DistillKLParams& P, int64_t r0, int64_t r1);
void distill_kl_rows_avx2(const DistillKLParams& P, int64_t r0, int64_t r1);
void distill_kl_rows_avx512(const DistillKLParams& P, int64_t r0, int64_t r1);


}  // namespace reuse_core
