// CPU fused_linear_distill: the chunk loop (fused_linear_distill_loop.h) with
// - a dense teacher: the chunk's loss and student-logit gradient from distill_kl's row kernel
//   (csrc/distill_kl/distill_kl_cpu_rows.h, the same AVX2/AVX-512/portable paths), written into a
//   gradient buffer reused across chunks;
// - a sparse (top-k) teacher: the row kernel below, for the "bucket" and "renormalize" tails
//   (docs/ops.md defines them).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/cpu_features.h"
#include "../distill_kl/distill_kl_cpu_rows.h"
#include "fused_linear_distill_loop.h"

namespace reuse_core {

int64_t fld_count_rows(const at::Tensor& labels, int64_t N, int64_t V, int64_t ignore_index) {
  if (labels.is_cuda()) {
    const auto counted_mask = labels != ignore_index;
    const auto bad = counted_mask & ((labels < 0) | (labels >= V));
    TORCH_CHECK(!bad.any().item<bool>(), "fused_linear_distill: labels must be in [0, ", V, ") or ignore_index (",
                ignore_index, ")");
    return counted_mask.sum().item<int64_t>();
  }
  const auto lab = labels.contiguous();
  const int64_t* l = lab.data_ptr<int64_t>();
  int64_t counted = 0;
  for (int64_t r = 0; r < N; ++r) {
    if (l[r] == ignore_index) continue;
    TORCH_CHECK(l[r] >= 0 && l[r] < V, "fused_linear_distill: labels must be in [0, ", V, ") or ignore_index (",
                ignore_index, "), got ", l[r], " at row ", r);
    ++counted;
  }
  return counted;
}

namespace {

// Marks the row's kept ids in `mark` (zeroed, V bytes); a repeated or out-of-range id is an error.
inline void mark_ids(const int64_t* idx, int64_t k, int64_t V, int64_t row, std::vector<uint8_t>& mark) {
  for (int64_t i = 0; i < k; ++i) {
    const int64_t id = idx[i];
    if (id < 0 || id >= V || mark[id]) {
      for (int64_t j = 0; j < i; ++j) mark[idx[j]] = 0;
      TORCH_CHECK(id >= 0 && id < V, "fused_linear_distill: teacher indices must be in [0, ", V, "), got ", id,
                  " in row ", row);
      TORCH_CHECK(false, "fused_linear_distill: teacher indices of row ", row, " repeat id ", id,
                  " (each kept id may appear once)");
    }
    mark[id] = 1;
  }
}

// One row of the sparse-teacher loss. T is the math type (float, or double for float64 inputs);
// sums are kept in double. `mark` is a per-thread zeroed scratch of V bytes, left zeroed.
template <class T>
void sparse_row(const T* s, const int64_t* idx, const T* lp, int64_t V, int64_t k, int64_t label, bool use_ce,
                const FLDChunk& P, int64_t row, std::vector<uint8_t>& mark, std::vector<T>& es, T* loss, T* g) {
  const bool bucket = P.mode == kBucketTeacher;
  const double Tm = P.temperature, invT = 1.0 / Tm;
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  mark_ids(idx, k, V, row, mark);
  bool has_nan = false;
  double m = -inf;
  for (int64_t j = 0; j < V; ++j) {
    has_nan |= std::isnan(s[j]);
    m = std::max<double>(m, s[j]);
  }
  for (int64_t i = 0; i < k; ++i) has_nan |= std::isnan(lp[i]);
  if (has_nan) {
    for (int64_t i = 0; i < k; ++i) mark[idx[i]] = 0;
    *loss = T(nan);
    if (g) for (int64_t j = 0; j < V; ++j) g[j] = T(nan);
    return;
  }
  const double c = m == -inf ? 0.0 : m;
  // Z: all ids, ZS: kept, Zr: not kept (the student's tail, summed directly, never 1 - kept).
  double Z = 0, ZS = 0, Zr = 0, Zc = 0;
  for (int64_t j = 0; j < V; ++j) {
    const T e = std::exp(T((double(s[j]) - c) * invT));  // exp in T (expf for float32), sums in double
    es[j] = e;
    Z += e;
    if (mark[j]) ZS += e; else Zr += e;
    if (use_ce) Zc += invT == 1.0 ? double(e) : double(std::exp(T(double(s[j]) - c)));
  }
  const double logZ = std::log(Z);
  // The teacher: p_i = exp(lp_i), P = sum; renormalised to 1 when rounding makes P > 1.
  double Pk = 0;
  for (int64_t i = 0; i < k; ++i) Pk += std::exp(double(lp[i]));
  const double logP = std::log(Pk);
  const double pshift = (bucket ? (Pk > 1 ? logP : 0.0) : logP);  // log p_i = lp_i - pshift
  // A renormalize teacher row with no mass (all log-probs -inf) has nothing to teach; a bucket
  // one puts all its mass in the tail.
  const bool use_kd = P.kd_weight != 0 && (bucket || Pk > 0);
  const double r = bucket ? std::max(0.0, 1.0 - std::min(Pk, 1.0)) : 0.0;
  const bool tail = bucket && k < V && r > 0;
  const double gq = use_kd ? P.kd_weight * Tm * P.grad_scale : 0.0;
  const double gc = use_ce ? P.ce_weight * P.grad_scale : 0.0;
  // log of the student's normaliser over the outcomes compared: all ids (bucket), kept ids (renormalize)
  const double logQ = bucket ? logZ : std::log(ZS);

  double kl = 0;
  if (use_kd) {
    for (int64_t i = 0; i < k; ++i) {
      const double logp = double(lp[i]) - pshift;
      const double p = std::exp(logp);
      if (p > 0) kl += p * (logp - ((double(s[idx[i]]) - c) * invT - logQ));
    }
    if (tail) kl += r * (std::log(r) - (std::log(Zr) - logZ));  // log q_r = log Zr - log Z; Zr = 0 gives +inf
    if (!(Z > 0) || (!bucket && !(ZS > 0))) kl = inf;
  }
  double L = use_kd ? P.kd_weight * Tm * Tm * kl : 0.0;
  if (use_ce) L += P.ce_weight * (Zc > 0 ? std::log(Zc) + c - double(s[label]) : inf);
  *loss = T(L);

  if (g) {
    const double invZ = Z > 0 ? 1.0 / Z : 0.0, invZS = ZS > 0 ? 1.0 / ZS : 0.0, invZr = Zr > 0 ? 1.0 / Zr : 0.0;
    const double invZc = Zc > 0 ? 1.0 / Zc : 0.0;
    for (int64_t j = 0; j < V; ++j) {
      const double e = es[j];
      double gj;
      if (bucket) gj = gq * (e * invZ - (mark[j] ? 0.0 : r * e * invZr));  // q_j - r q_j / q_r off the kept ids
      else gj = mark[j] ? gq * e * invZS : 0.0;
      if (use_ce) gj += gc * (invT == 1.0 ? e : double(std::exp(T(double(s[j]) - c)))) * invZc;
      g[j] = T(gj);
    }
    for (int64_t i = 0; i < k; ++i) g[idx[i]] -= T(gq * std::exp(double(lp[i]) - pshift));
    if (use_ce) g[label] -= T(gc);
  }
  for (int64_t i = 0; i < k; ++i) mark[idx[i]] = 0;
}

template <class T>
void sparse_chunk(FLDChunk& P) {
  const int64_t n = P.S.size(0), V = P.S.size(1), k = P.idx.size(1);
  const T* S = P.S.data_ptr<T>();
  const int64_t* IX = P.idx.data_ptr<int64_t>();
  const T* LP = P.lp.data_ptr<T>();
  const int64_t* lab = P.labels.defined() ? P.labels.data_ptr<int64_t>() : nullptr;
  T* loss = P.loss_rows.data_ptr<T>();
  T* G = P.G.defined() ? P.G.data_ptr<T>() : nullptr;
  const bool use_ce = P.ce_weight != 0 && lab != nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / V);
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> mark(V, 0);
    std::vector<T> es(V);
    for (int64_t r = r0; r < r1; ++r) {
      T* g = G ? G + r * V : nullptr;
      const int64_t label = lab ? lab[r] : -1;
      if (lab && label == P.ignore_index) {
        mark_ids(IX + r * k, k, V, P.row0 + r, mark);  // an ignored row's ids are checked all the same
        for (int64_t i = 0; i < k; ++i) mark[IX[r * k + i]] = 0;
        loss[r] = 0;
        if (g) std::fill(g, g + V, T(0));
        continue;
      }
      sparse_row<T>(S + r * V, IX + r * k, LP + r * k, V, k, label, use_ce, P, P.row0 + r, mark, es, loss + r, g);
    }
  });
}

at::Tensor cpu_step(FLDChunk& P) {
  const bool f64 = P.S.scalar_type() == at::kDouble;
  if (P.mode != kDenseTeacher) {
    if (f64) sparse_chunk<double>(P); else sparse_chunk<float>(P);
    return P.G;
  }
  DistillKLParams D;
  D.student = P.S.data_ptr();
  D.teacher = P.Tl.data_ptr();
  D.labels = P.labels.defined() ? P.labels.data_ptr<int64_t>() : nullptr;
  D.grad_student = P.G.defined() ? P.G.data_ptr() : nullptr;
  D.grad_teacher = nullptr;
  D.loss_rows = P.loss_rows.data_ptr();
  D.vocab = P.S.size(1);
  D.temperature = P.temperature;
  D.kd_weight = P.kd_weight;
  D.ce_weight = P.ce_weight;
  D.grad_scale = P.grad_scale;
  D.ignore_index = P.ignore_index;
  D.student_dtype = D.teacher_dtype = f64 ? DType::f64 : DType::f32;
  const CpuIsa isa = f64 ? CpuIsa::portable : cpu_isa();
  const int64_t n = P.S.size(0), grain = std::max<int64_t>(1, 32768 / D.vocab);
  if (isa == CpuIsa::portable && !f64) {
    // The portable rows compute in double: give them double loss rows, then copy back.
    auto rows64 = at::empty({n}, P.loss_rows.options().dtype(at::kDouble));
    D.loss_rows = rows64.data_ptr();
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) { distill_kl_rows_portable(D, r0, r1); });
    P.loss_rows.copy_(rows64);
    return P.G;
  }
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    switch (isa) {
      case CpuIsa::avx512: distill_kl_rows_avx512(D, r0, r1); break;
      case CpuIsa::avx2: distill_kl_rows_avx2(D, r0, r1); break;
      default: distill_kl_rows_portable(D, r0, r1);
    }
  });
  return P.G;
}

// REUSE_CORE_FLD_GENERIC=1 (read on every call) runs the CUDA backend's device-generic step on the
// CPU instead, so the tests check that composition where no GPU is lent.
bool use_generic_step() {
  const char* e = std::getenv("REUSE_CORE_FLD_GENERIC");
  return e != nullptr && std::strcmp(e, "1") == 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_distill_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_indices,
    const c10::optional<at::Tensor>& teacher_logprobs, int64_t mode, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& row_weight, double temperature, double kd_weight, double ce_weight, int64_t ignore_index, int64_t reduction,
    int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) {
  return fused_linear_distill_run(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_indices,
                                  teacher_logprobs, mode, labels, row_weight, temperature, kd_weight, ce_weight, ignore_index,
                                  reduction, chunk_size, grad_hidden, grad_weight, grad_bias,
                                  use_generic_step() ? FLDStep(fld_generic_step) : FLDStep(cpu_step));
}

}  // namespace

TORCH_LIBRARY_IMPL(reuse_core, CPU, m) { m.impl("fused_linear_distill", &fused_linear_distill_cpu); }

}  // namespace reuse_core
