// CPU ensemble_average: argument checks, outputs, the parallel loop over rows. The row kernels
// are ensemble_average_cpu_rows.h, instantiated here (portable) and in the AVX2 file.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../common/cpu_alloc.h"
#include "../common/cpu_features.h"
#include "../ops.h"
#include "ensemble_average_checks.h"
#include "ensemble_average_cpu_rows.h"

namespace reuse_core {

void ensemble_rows_portable(const EnsembleParams& P, int64_t r0, int64_t r1, bool backward) {
  if (P.dtype == DType::f64)
    ensemble_rows_run<ScalarOps<double>>(P, r0, r1, backward);
  else
    ensemble_rows_run<ScalarOps<float>>(P, r0, r1, backward);
}

namespace {

DType member_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    default:
      TORCH_CHECK(false, "ensemble_average: on the CPU, members must be float32, float64 or bfloat16, got ",
                  x.scalar_type());
  }
}

// Contiguous members, their row count, normalised weights, and the kernel parameters.
struct Prepared {
  std::vector<at::Tensor> members;  // keeps contiguous copies alive
  std::vector<const void*> ptrs;
  std::vector<double> wn, log_wn;
  EnsembleParams P{};
};

void prepare(Prepared& S, at::TensorList members, const at::Tensor& weights, int64_t mode, bool stacked) {
  const auto shape = ensemble_member_shape(members, weights, mode, stacked);
  const int64_t K = weights.size(0), C = shape.back();
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  for (const auto& m : members) S.members.push_back(m.contiguous());
  for (int64_t k = 0; k < K; ++k) {
    const auto& m = stacked ? S.members[0] : S.members[k];
    const int64_t offset = stacked ? k * rows * C : 0;
    S.ptrs.push_back(static_cast<const char*>(m.data_ptr()) + offset * m.element_size());
  }
  const auto w = weights.to(at::kDouble).contiguous();
  const double* wp = w.data_ptr<double>();
  double sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(wp[k] >= 0, "ensemble_average: weights must be non-negative, got ", wp[k], " for member ", k);
    sum += wp[k];
  }
  TORCH_CHECK(sum > 0 && std::isfinite(sum), "ensemble_average: weights must have a positive, finite sum, got ", sum);
  for (int64_t k = 0; k < K; ++k) {
    S.wn.push_back(wp[k] / sum);
    S.log_wn.push_back(wp[k] > 0 ? std::log(wp[k] / sum) : -std::numeric_limits<double>::infinity());
  }
  auto& P = S.P;
  P.K = K;
  P.C = C;
  P.rows = rows;
  P.mode = mode;
  P.dtype = member_dtype(S.members[0]);
  P.members = S.ptrs.data();
  P.wn = S.wn.data();
  P.log_wn = S.log_wn.data();
  P.inv_wsum = 1.0 / sum;
}

void run_rows(const EnsembleParams& P, bool backward) {
  const CpuIsa isa = P.dtype == DType::f64 ? CpuIsa::portable : cpu_isa();
  const int64_t grain = std::max<int64_t>(1, 16384 / (P.C * P.K));
  at::parallel_for(0, P.rows, grain, [&](int64_t r0, int64_t r1) {
    switch (isa) {
      case CpuIsa::avx512: ensemble_rows_avx512(P, r0, r1, backward); break;
      case CpuIsa::avx2: ensemble_rows_avx2(P, r0, r1, backward); break;
      default: ensemble_rows_portable(P, r0, r1, backward);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> ensemble_average_cpu(at::TensorList members, const at::Tensor& weights,
                                                         int64_t mode, bool stacked) {
  Prepared S;
  prepare(S, members, weights, mode, stacked);
  const auto shape = ensemble_member_shape(members, weights, mode, stacked);
  const auto& m0 = S.members[0];
  const auto acc = m0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = empty_cpu_output(shape, m0.scalar_type());
  auto lse = at::empty({2, S.P.K, S.P.rows}, m0.options().dtype(acc));
  S.P.out = out.data_ptr();
  S.P.lse = lse.data_ptr();
  run_rows(S.P, /*backward=*/false);
  return {out, lse};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> ensemble_average_backward_cpu(
    const at::Tensor& grad, at::TensorList members, const at::Tensor& weights, const at::Tensor& out,
    const at::Tensor& lse, int64_t mode, bool stacked) {
  Prepared S;
  prepare(S, members, weights, mode, stacked);
  const auto& m0 = S.members[0];
  TORCH_CHECK(grad.sizes() == out.sizes(), "ensemble_average_backward: grad must have the output's shape");
  const auto g = grad.to(m0.scalar_type()).contiguous();
  const auto o = out.contiguous();
  const auto l = lse.contiguous();
  std::vector<at::Tensor> grads;
  std::vector<void*> gptrs;
  for (const auto& m : S.members) grads.push_back(empty_cpu_output(m.sizes(), m.scalar_type()));
  for (int64_t k = 0; k < S.P.K; ++k) {
    const int64_t offset = stacked ? k * S.P.rows * S.P.C : 0;
    auto& gk = stacked ? grads[0] : grads[k];
    gptrs.push_back(static_cast<char*>(gk.data_ptr()) + offset * gk.element_size());
  }
  auto dw_rows = at::empty({S.P.rows, S.P.K}, m0.options().dtype(at::kDouble));
  S.P.grad = g.data_ptr();
  S.P.out = const_cast<void*>(o.data_ptr());
  S.P.lse = const_cast<void*>(l.data_ptr());
  S.P.grad_members = gptrs.data();
  S.P.dw_rows = dw_rows.data_ptr<double>();
  run_rows(S.P, /*backward=*/true);
  return {grads, dw_rows.sum(0).to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(reuse_core, CPU, m) {
  m.impl("ensemble_average", &ensemble_average_cpu);
  m.impl("ensemble_average_backward", &ensemble_average_backward_cpu);
}

}  // namespace reuse_core
