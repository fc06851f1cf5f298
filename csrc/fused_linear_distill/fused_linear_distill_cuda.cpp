// CUDA fused_linear_distill: the chunk loop (fused_linear_distill_loop.h) on cuBLAS (through
// ATen) with, per chunk,
// - a dense teacher: the registered distill_kl op (its CUDA kernel) on the chunk's logits;
// - a sparse teacher: the bucket / renormalize loss composed of ATen ops (gather, scatter,
//   logsumexp), which run on any device.
// This file is plain C++ (no nvcc): the CUDA work is ATen's and distill_kl's. The step is
// device-generic, so the CPU tests also run it (REUSE_CORE_FLD_GENERIC=1) to check it where no
// GPU is lent; on a GPU it stays "compiled, not run here" until a GPU run verifies it.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>

#include "fused_linear_distill_loop.h"

namespace reuse_core {

at::Tensor fld_generic_step(FLDChunk& P) {
  const int64_t n = P.S.size(0), V = P.S.size(1);
  const double T = P.temperature, invT = 1.0 / T;
  const bool want_grad = P.G.defined();
  const bool use_ce = P.ce_weight != 0 && P.labels.defined();
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor counted = P.labels.defined() ? (P.labels != P.ignore_index) : at::Tensor();

  if (P.mode == kDenseTeacher) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("reuse_core::distill_kl", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, double,
                             double, int64_t, int64_t, bool, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the kernel itself, not its autograd wrapper
    c10::optional<at::Tensor> lab;
    if (P.labels.defined()) lab = P.labels;
    // reduction "none": per-row losses and an unscaled gradient; the reduction's factor is ours.
    auto [loss, gs, gt] = op.call(P.S, P.Tl, lab, P.temperature, P.kd_weight, P.ce_weight, P.ignore_index,
                                  int64_t(kNone), want_grad, false);
    P.loss_rows.copy_(loss);
    if (!want_grad) return at::Tensor();
    return P.grad_scale == 1.0 ? gs : gs.mul_(P.grad_scale);
  }

  const int64_t k = P.idx.size(1);
  const bool bucket = P.mode == kBucketTeacher;
  const auto& idx = P.idx;
  TORCH_CHECK(!((idx < 0) | (idx >= V)).any().item<bool>(), "fused_linear_distill: teacher indices must be in [0, ",
              V, ")");
  if (k > 1) {
    const auto sorted = std::get<0>(idx.sort(1));
    TORCH_CHECK(!(sorted.narrow(1, 1, k - 1) == sorted.narrow(1, 0, k - 1)).any().item<bool>(),
                "fused_linear_distill: teacher indices repeat an id in a row (each kept id may appear once)");
  }
  const auto zero = at::zeros({}, P.S.options());
  const auto logq = at::log_softmax(P.S * invT, 1);  // (n, V)
  const auto logq_kept = logq.gather(1, idx);        // (n, k)
  const auto Pk = P.lp.exp().sum(1, true);           // (n, 1)
  // A renormalize teacher row with no mass has nothing to teach; a bucket one is all tail.
  const auto has_mass = bucket ? at::ones_like(Pk, Pk.options().dtype(at::kBool)) : ~(Pk <= 0);
  const double gq = P.kd_weight * T * P.grad_scale;
  at::Tensor kl, g;
  if (bucket) {
    const auto logp = P.lp - at::where(Pk > 1, Pk.log(), zero);
    const auto p = logp.exp();
    const auto r = (1 - Pk.clamp_max(1)).clamp_min(0);
    auto mark = at::zeros({n, V}, P.S.options().dtype(at::kBool));
    mark.scatter_(1, idx, true);
    const auto logq_r = at::logsumexp(logq.masked_fill(mark, -inf), 1, true);  // log of the tail mass, never log(1 - kept)
    const auto tail = (r > 0) & (k < V);
    kl = at::where(p > 0, p * (logp - logq_kept), zero).sum(1, true) +
         at::where(tail, r * (r.log() - logq_r), zero);
    if (want_grad) {
      const auto ratio = at::where(logq_r == -inf, zero, (logq - logq_r).exp());  // q_j / q_r
      g = gq * (logq.exp() - at::where(mark, zero, r * ratio));
      g.scatter_add_(1, idx, -gq * p);
    }
  } else {
    const auto logp = P.lp - Pk.log();
    const auto p = logp.exp();
    const auto log_qt = logq_kept - at::logsumexp(logq_kept, 1, true);
    kl = at::where(p > 0, p * (logp - log_qt), zero).sum(1, true);
    if (want_grad) g = at::zeros({n, V}, P.S.options()).scatter_(1, idx, gq * (log_qt.exp() - p));
  }
  auto L = at::where(has_mass, P.kd_weight * T * T * kl, zero).squeeze(1);
  if (P.kd_weight == 0) L = at::zeros({n}, P.S.options());
  if (want_grad) g = at::where(has_mass, g, zero);
  if (P.kd_weight == 0 && want_grad) g = at::zeros({n, V}, P.S.options());
  if (use_ce) {
    const auto lab = at::where(counted, P.labels, at::zeros({}, P.labels.options()));
    L = L + P.ce_weight * (at::logsumexp(P.S, 1) - P.S.gather(1, lab.unsqueeze(1)).squeeze(1));
    if (want_grad) {
      const double gc = P.ce_weight * P.grad_scale;
      g = g + gc * at::softmax(P.S, 1);
      g.scatter_add_(1, lab.unsqueeze(1), at::full({n, 1}, -gc, P.S.options()));
    }
  }
  if (counted.defined()) {
    L = at::where(counted, L, zero);
    if (want_grad) g = at::where(counted.unsqueeze(1), g, zero);
  }
  // A NaN anywhere in a row's logits or log-probs: its loss and gradient are NaN (the reference's).
  const auto row_nan = (P.S.isnan().any(1) | P.lp.isnan().any(1)).unsqueeze(1);
  const auto nan = at::full({}, std::numeric_limits<double>::quiet_NaN(), P.S.options());
  L = at::where(row_nan.squeeze(1), nan, L);
  if (want_grad) g = at::where(row_nan, nan, g);
  P.loss_rows.copy_(L);
  return g;
}

#ifdef REUSE_WITH_CUDA
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_distill_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_indices,
    const c10::optional<at::Tensor>& teacher_logprobs, int64_t mode, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& row_weight, double temperature, double kd_weight, double ce_weight, int64_t ignore_index, int64_t reduction,
    int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) {
  return fused_linear_distill_run(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_indices,
                                  teacher_logprobs, mode, labels, row_weight, temperature, kd_weight, ce_weight, ignore_index,
                                  reduction, chunk_size, grad_hidden, grad_weight, grad_bias, fld_generic_step);
}

}  // namespace

TORCH_LIBRARY_IMPL(reuse_core, CUDA, m) { m.impl("fused_linear_distill", &fused_linear_distill_cuda); }
#endif

}  // namespace reuse_core
