// CPU distill_kl: argument checks, output allocation, parallel loop over rows. The row kernel
// itself is distill_kl_cpu_rows.h, instantiated here (portable) and in distill_kl_cpu_avx2.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/cpu_alloc.h"
#include "../common/cpu_features.h"
#include "../ops.h"
#include "distill_kl_checks.h"
#include "distill_kl_cpu_rows.h"

namespace reuse_core {

void distill_kl_rows_portable(const DistillKLParams& P, int64_t r0, int64_t r1) {
  // One element at a time, a float32 running sum drifts: the mutual-learning teacher gradient
  // missed its tolerance about 1 seed in 300. The portable path does its math in float64.
  distill_kl_rows_run<ScalarOps<double>>(P, r0, r1);
}

namespace {

DType to_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK(false, "distill_kl: on the CPU, logits must be float32, float64 or bfloat16, got ", x.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_kl_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    double temperature, double kd_weight, double ce_weight, int64_t ignore_index, int64_t reduction,
    bool grad_student, bool grad_teacher) {
  check_distill_kl_args(student, teacher, labels, temperature, ce_weight, reduction);
  const auto s = student.contiguous(), t = teacher.contiguous();
  const int64_t V = s.size(-1), N = s.numel() / V;

  // Labels: validate the range and count the rows that take part (the mean's divisor) first,
  // so pass 2 can write the gradient already scaled.
  at::Tensor lab;
  int64_t counted = N;
  if (labels.has_value()) {
    lab = labels->reshape({-1}).to(at::kLong).contiguous();
    const int64_t* l = lab.data_ptr<int64_t>();
    counted = 0;
    for (int64_t r = 0; r < N; ++r) {
      if (l[r] == ignore_index) continue;
      TORCH_CHECK(l[r] >= 0 && l[r] < V, "distill_kl: labels must be in [0, ", V, ") or ignore_index (", ignore_index,
                  "), got ", l[r], " at row ", r);
      ++counted;
    }
  }
  const double grad_scale = reduction == kMean ? (counted > 0 ? 1.0 / counted : 0.0) : 1.0;

  const bool f64 = s.scalar_type() == at::kDouble || t.scalar_type() == at::kDouble;
  const CpuIsa isa = f64 ? CpuIsa::portable : cpu_isa();
  const auto acc = isa == CpuIsa::portable ? at::kDouble : at::kFloat;  // the portable rows' math type
  auto loss_rows = at::empty({N}, s.options().dtype(acc));
  auto gs = grad_student ? empty_cpu_output(s.sizes(), s.scalar_type()) : at::empty({0}, s.options());
  auto gt = grad_teacher ? empty_cpu_output(t.sizes(), t.scalar_type()) : at::empty({0}, t.options());

  DistillKLParams P;
  P.student = s.data_ptr();
  P.teacher = t.data_ptr();
  P.labels = labels.has_value() ? lab.data_ptr<int64_t>() : nullptr;
  P.grad_student = grad_student ? gs.data_ptr() : nullptr;
  P.grad_teacher = grad_teacher ? gt.data_ptr() : nullptr;
  P.loss_rows = loss_rows.data_ptr();
  P.vocab = V;
  P.temperature = temperature;
  P.kd_weight = kd_weight;
  P.ce_weight = ce_weight;
  P.grad_scale = grad_scale;
  P.ignore_index = ignore_index;
  P.student_dtype = to_dtype(s);
  P.teacher_dtype = to_dtype(t);

  const int64_t grain = std::max<int64_t>(1, 32768 / V);
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    switch (isa) {
      case CpuIsa::avx512: distill_kl_rows_avx512(P, r0, r1); break;
      case CpuIsa::avx2: distill_kl_rows_avx2(P, r0, r1); break;
      default: distill_kl_rows_portable(P, r0, r1);
    }
  });

  at::Tensor loss;
  if (reduction == kNone) {
    loss = loss_rows.reshape(s.sizes().slice(0, s.dim() - 1)).to(s.scalar_type());
  } else {
    loss = loss_rows.sum();
    if (reduction == kMean) loss = loss * grad_scale;
    loss = loss.to(s.scalar_type());
  }
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(reuse_core, CPU, m) { m.impl("distill_kl", &distill_kl_cpu); }

}  // namespace reuse_core
