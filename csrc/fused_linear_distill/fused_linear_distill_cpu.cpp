// CPU fused_linear_distill: the chunk loop (fused_linear_distill_loop.h) with
// - a dense teacher: the chunk's loss and student-logit gradient from distill_kl's row kernel
//   (csrc/distill_kl/distill_kl_cpu_rows.h, the same AVX2/AVX-512/portable paths), written into a
//   gradient buffer reused across chunks;
// - a sparse (top-k) teacher: fused_linear_distill_cpu_rows.h (portable here, AVX2 and AVX-512 in
//   their own files), for the "bucket" and "renormalize" tails (docs/ops.md defines them).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/cpu_features.h"
#include "../distill_kl/distill_kl_cpu_rows.h"
#include "fused_linear_distill_cpu_rows.h"
#include "fused_linear_distill_loop.h"

namespace reuse_core {

void fld_sparse_rows_portable(const FLDSparseParams& P, int64_t r0, int64_t r1) {
  // float64 math for float32 storage too, as distill_kl's portable rows
  if (P.f64) FLDSparseRows<ScalarOps<double>, double>::run(P, r0, r1);
  else FLDSparseRows<ScalarOps<double>, float>::run(P, r0, r1);
}

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

// The sparse-teacher rows of a chunk (fused_linear_distill_cpu_rows.h), on the widest vector
// unit for float32; the ids of each row are checked first, so no row kernel needs to throw.
void sparse_chunk(FLDChunk& P) {
  const int64_t n = P.S.size(0), V = P.S.size(1), k = P.idx.size(1);
  FLDSparseParams R;
  R.student = P.S.data_ptr();
  R.idx = P.idx.data_ptr<int64_t>();
  R.logprobs = P.lp.data_ptr();
  R.labels = P.labels.defined() ? P.labels.data_ptr<int64_t>() : nullptr;
  R.grad = P.G.defined() ? P.G.data_ptr() : nullptr;
  R.loss_rows = P.loss_rows.data_ptr();
  R.vocab = V;
  R.k = k;
  R.bucket = P.mode == kBucketTeacher;
  R.f64 = P.S.scalar_type() == at::kDouble;
  R.temperature = P.temperature;
  R.kd_weight = P.kd_weight;
  R.ce_weight = P.ce_weight;
  R.grad_scale = P.grad_scale;
  R.ignore_index = P.ignore_index;
  const CpuIsa isa = R.f64 ? CpuIsa::portable : cpu_isa();
  const int64_t grain = std::max<int64_t>(1, 32768 / V);
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> mark(V, 0);
    for (int64_t r = r0; r < r1; ++r) {  // an ignored row's ids are checked all the same
      const int64_t* ix = R.idx + r * k;
      mark_ids(ix, k, V, P.row0 + r, mark);
      for (int64_t i = 0; i < k; ++i) mark[ix[i]] = 0;
    }
    switch (isa) {
      case CpuIsa::avx512: fld_sparse_rows_avx512(R, r0, r1); break;
      case CpuIsa::avx2: fld_sparse_rows_avx2(R, r0, r1); break;
      default: fld_sparse_rows_portable(R, r0, r1);
    }
  });
}

at::Tensor cpu_step(FLDChunk& P) {
  const bool f64 = P.S.scalar_type() == at::kDouble;
  if (P.mode != kDenseTeacher) {
    sparse_chunk(P);
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
