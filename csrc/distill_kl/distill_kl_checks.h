// Argument checks shared by the CPU and CUDA distill_kl kernels (the Python wrapper checks the
// same things first with friendlier errors; these guard direct torch.ops callers).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace reuse_core {

inline void check_distill_kl_args(const at::Tensor& student, const at::Tensor& teacher,
                                  const c10::optional<at::Tensor>& labels, double temperature,
                                  double ce_weight, int64_t reduction) {
  TORCH_CHECK(student.dim() >= 1, "distill_kl: student_logits must have at least 1 dimension (..., V)");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "distill_kl: teacher_logits must have the shape of student_logits ",
              student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK(student.size(-1) > 0, "distill_kl: the class dimension V of the logits must be > 0");
  for (const auto* x : {&student, &teacher}) {
    const auto dt = x->scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                "distill_kl: logits must be floating point (float32, float64, bfloat16, float16), got ", dt);
  }
  TORCH_CHECK(student.device() == teacher.device(), "distill_kl: teacher_logits is on ", teacher.device(),
              " but student_logits is on ", student.device());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "distill_kl: temperature must be a finite number > 0, got ",
              temperature);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "distill_kl: reduction code must be 0, 1 or 2");
  TORCH_CHECK(ce_weight == 0 || labels.has_value(), "distill_kl: ce_weight > 0 needs labels");
  if (labels.has_value()) {
    const auto& l = *labels;
    TORCH_CHECK(!at::isFloatingType(l.scalar_type()) && l.scalar_type() != at::kBool,
                "distill_kl: labels must be an integer tensor, got ", l.scalar_type());
    TORCH_CHECK(l.numel() == student.numel() / student.size(-1) && l.sizes() == student.sizes().slice(0, student.dim() - 1),
                "distill_kl: labels must have the leading shape of the logits ", student.sizes().slice(0, student.dim() - 1),
                ", got ", l.sizes());
    TORCH_CHECK(l.device() == student.device(), "distill_kl: labels are on ", l.device(), " but the logits are on ",
                student.device());
  }
}

}  // namespace reuse_core
