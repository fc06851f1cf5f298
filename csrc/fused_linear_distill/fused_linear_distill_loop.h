// The chunk loop of fused_linear_distill, shared by the CPU and CUDA registrations.
//
// Rows are taken chunk_size at a time: the chunk's student logits S = h W^T (+ b) (and, for a
// dense teacher, its logits the same way) go into buffers reused across chunks; a backend "step"
// writes the chunk's per-row losses and returns the gradient G = dLoss/dS of the chunk, already
// scaled by the reduction; then grad_h = G W, grad_W += G^T h and grad_b += sum_rows G. The full
// (N, V) logits never exist. Math runs in float32 (float64 when any input is float64).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <tuple>

#include "../ops.h"

namespace reuse_core {

// teacher codes shared with reuse_core/ops/fused_linear_distill.py
enum FLDTeacher : int64_t { kDenseTeacher = 0, kBucketTeacher = 1, kRenormalizeTeacher = 2 };

struct FLDChunk {
  at::Tensor S;          // (n, V) student logits, compute dtype, contiguous
  at::Tensor Tl;         // (n, V) dense teacher logits (undefined for a sparse teacher)
  at::Tensor idx, lp;    // (n, k) kept ids (int64) and their log-probs (compute dtype) for a sparse teacher
  at::Tensor labels;     // (n,) int64, or undefined
  at::Tensor loss_rows;  // (n,) compute dtype: the step writes each row's loss here
  at::Tensor G;          // (n, V) buffer the step may write the gradient into (undefined: no gradient wanted)
  int64_t mode;
  double temperature, kd_weight, ce_weight, grad_scale;
  int64_t ignore_index;
  int64_t row0;          // the chunk's first row (for error messages)
};

// Returns the chunk's gradient (n, V) scaled by grad_scale (chunk.G itself or another tensor),
// or an undefined tensor when chunk.G is undefined.
using FLDStep = std::function<at::Tensor(FLDChunk&)>;

// Rows per chunk when the caller passes chunk_size <= 0 (documented in docs/ops.md): the
// per-chunk buffers (3 logits-sized for a dense teacher: student, teacher, gradient; 2 for a
// sparse one) take at most 64 MiB, rounded down to a multiple of 8 rows, clamped to [8, 1024].
inline int64_t fld_default_chunk(int64_t V, int64_t mode, int64_t elt) {
  const int64_t buffers = mode == kDenseTeacher ? 3 : 2;
  int64_t c = (int64_t(64) << 20) / std::max<int64_t>(1, buffers * V * elt);
  c = (c / 8) * 8;
  return std::min<int64_t>(1024, std::max<int64_t>(8, c));
}

inline void check_fused_linear_distill_args(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_indices,
    const c10::optional<at::Tensor>& teacher_logprobs, int64_t mode, const c10::optional<at::Tensor>& labels,
    double temperature, double ce_weight, int64_t reduction) {
  auto is_float = [](const at::Tensor& x) { return at::isFloatingType(x.scalar_type()); };
  TORCH_CHECK(hidden.dim() >= 1 && is_float(hidden), "fused_linear_distill: student_hidden must be a floating-point tensor (..., H)");
  TORCH_CHECK(weight.dim() == 2 && is_float(weight) && weight.size(1) == hidden.size(-1),
              "fused_linear_distill: student_weight must be a floating-point (V, H) tensor with H = ", hidden.size(-1),
              ", got ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "fused_linear_distill: the vocabulary size V (student_weight.size(0)) must be > 0");
  TORCH_CHECK(weight.device() == hidden.device(), "fused_linear_distill: student_weight is on ", weight.device(),
              " but student_hidden is on ", hidden.device());
  const int64_t V = weight.size(0);
  const auto lead = hidden.sizes().slice(0, hidden.dim() - 1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V && is_float(*bias) && bias->device() == hidden.device(),
                "fused_linear_distill: student_bias must be a floating-point (V,) tensor on ", hidden.device(),
                " with V = ", V, ", got ", bias->sizes());
  }
  TORCH_CHECK(mode >= 0 && mode <= 2, "fused_linear_distill: teacher mode code must be 0, 1 or 2");
  if (mode == kDenseTeacher) {
    TORCH_CHECK(teacher_hidden.has_value() && teacher_weight.has_value(),
                "fused_linear_distill: a dense teacher needs teacher_hidden and teacher_weight");
    const auto& th = *teacher_hidden;
    const auto& tw = *teacher_weight;
    TORCH_CHECK(th.dim() == hidden.dim() && th.sizes().slice(0, th.dim() - 1) == lead && is_float(th),
                "fused_linear_distill: teacher_hidden must be a floating-point tensor with the leading shape ", lead,
                " of student_hidden, got ", th.sizes());
    TORCH_CHECK(tw.dim() == 2 && tw.size(0) == V && tw.size(1) == th.size(-1) && is_float(tw),
                "fused_linear_distill: teacher_weight must be a floating-point (V, Ht) tensor with V = ", V,
                " and Ht = ", th.size(-1), ", got ", tw.sizes());
    TORCH_CHECK(th.device() == hidden.device() && tw.device() == hidden.device(),
                "fused_linear_distill: the teacher's tensors must be on ", hidden.device());
    if (teacher_bias.has_value()) {
      TORCH_CHECK(teacher_bias->dim() == 1 && teacher_bias->size(0) == V && is_float(*teacher_bias) &&
                      teacher_bias->device() == hidden.device(),
                  "fused_linear_distill: teacher_bias must be a floating-point (V,) tensor on ", hidden.device());
    }
  } else {
    TORCH_CHECK(teacher_indices.has_value() && teacher_logprobs.has_value(),
                "fused_linear_distill: a sparse teacher needs teacher_indices and teacher_logprobs");
    const auto& ix = *teacher_indices;
    const auto& lp = *teacher_logprobs;
    TORCH_CHECK(!at::isFloatingType(ix.scalar_type()) && ix.scalar_type() != at::kBool && ix.dim() == hidden.dim() &&
                    ix.sizes().slice(0, ix.dim() - 1) == lead,
                "fused_linear_distill: teacher indices must be an integer tensor (..., k) with the leading shape ", lead,
                " of student_hidden, got ", ix.sizes(), " ", ix.scalar_type());
    TORCH_CHECK(ix.size(-1) >= 1 && ix.size(-1) <= V, "fused_linear_distill: the teacher's k must be in [1, V = ", V,
                "], got ", ix.size(-1));
    TORCH_CHECK(is_float(lp) && lp.sizes() == ix.sizes(),
                "fused_linear_distill: teacher logprobs must be a floating-point tensor of the indices' shape ", ix.sizes(),
                ", got ", lp.sizes());
    TORCH_CHECK(ix.device() == hidden.device() && lp.device() == hidden.device(),
                "fused_linear_distill: the teacher's tensors must be on ", hidden.device());
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "fused_linear_distill: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fused_linear_distill: reduction code must be 0, 1 or 2");
  TORCH_CHECK(ce_weight == 0 || labels.has_value(), "fused_linear_distill: ce_weight > 0 needs labels");
  if (labels.has_value()) {
    TORCH_CHECK(!at::isFloatingType(labels->scalar_type()) && labels->scalar_type() != at::kBool,
                "fused_linear_distill: labels must be an integer tensor, got ", labels->scalar_type());
    TORCH_CHECK(labels->sizes() == lead, "fused_linear_distill: labels must have the leading shape ", lead,
                " of student_hidden, got ", labels->sizes());
    TORCH_CHECK(labels->device() == hidden.device(), "fused_linear_distill: labels are on ", labels->device(),
                " but student_hidden is on ", hidden.device());
  }
}

// The device-generic step (ATen ops + the distill_kl op), the CUDA backend's; fused_linear_distill_cuda.cpp.
at::Tensor fld_generic_step(FLDChunk& P);

// counted: rows whose label is not ignore_index (all rows without labels), after checking the range.
int64_t fld_count_rows(const at::Tensor& labels, int64_t N, int64_t V, int64_t ignore_index);

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_distill_run(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& teacher_hidden, const c10::optional<at::Tensor>& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& teacher_indices,
    const c10::optional<at::Tensor>& teacher_logprobs, int64_t mode, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& row_weight, double temperature, double kd_weight, double ce_weight, int64_t ignore_index, int64_t reduction,
    int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias_wanted, const FLDStep& step) {
  const bool grad_bias = grad_bias_wanted && bias.has_value();
  check_fused_linear_distill_args(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_indices,
                                  teacher_logprobs, mode, labels, temperature, ce_weight, reduction);
  const int64_t H = hidden.size(-1), V = weight.size(0);
  const int64_t N = H > 0 ? hidden.numel() / H : c10::multiply_integers(hidden.sizes().slice(0, hidden.dim() - 1));
  const auto lead = hidden.sizes().slice(0, hidden.dim() - 1);
  const bool dense = mode == kDenseTeacher;

  bool f64 = hidden.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble;
  if (dense) f64 = f64 || teacher_hidden->scalar_type() == at::kDouble || teacher_weight->scalar_type() == at::kDouble;
  const auto cdt = f64 ? at::kDouble : at::kFloat;
  const auto copt = hidden.options().dtype(cdt);

  const at::Tensor h = hidden.reshape({N, H});
  const at::Tensor W = weight.to(cdt);  // no copy for float32 weights
  const at::Tensor b = bias.has_value() ? bias->to(cdt) : at::Tensor();
  at::Tensor th, tW, tb, ix, lp;
  if (dense) {
    th = teacher_hidden->reshape({N, teacher_hidden->size(-1)});
    tW = teacher_weight->to(cdt);
    if (teacher_bias.has_value()) tb = teacher_bias->to(cdt);
  } else {
    ix = teacher_indices->reshape({N, teacher_indices->size(-1)}).to(at::kLong).contiguous();
    lp = teacher_logprobs->reshape({N, teacher_logprobs->size(-1)}).to(cdt).contiguous();
  }
  at::Tensor lab;
  int64_t counted = N;
  if (labels.has_value()) {
    lab = labels->reshape({N}).to(at::kLong).contiguous();
    counted = fld_count_rows(lab, N, V, ignore_index);
  }
  const double grad_scale = reduction == kMean ? (counted > 0 ? 1.0 / double(counted) : 0.0) : 1.0;

  at::Tensor rw;
  if (row_weight.has_value()) {
    TORCH_CHECK(row_weight->numel() == N && row_weight->device() == hidden.device() && at::isFloatingType(row_weight->scalar_type()),
                "fused_linear_distill: row_weight must be a floating-point tensor with one value per row (", N, ")");
    rw = row_weight->reshape({N}).to(cdt);
  }
  const bool want_grad = grad_hidden || grad_weight || grad_bias;
  int64_t C = chunk_size > 0 ? chunk_size : fld_default_chunk(V, mode, f64 ? 8 : 4);
  C = std::max<int64_t>(1, std::min<int64_t>(C, N));

  at::Tensor loss_rows = at::empty({N}, copt);
  at::Tensor gh = grad_hidden ? at::empty({N, H}, copt) : at::Tensor();
  at::Tensor gW = grad_weight ? at::zeros({V, H}, copt) : at::Tensor();
  at::Tensor gb = grad_bias ? at::zeros({V}, copt) : at::Tensor();
  at::Tensor Sbuf = at::empty({N > 0 ? C : 0, V}, copt);
  at::Tensor Tbuf = dense ? at::empty({N > 0 ? C : 0, V}, copt) : at::Tensor();
  at::Tensor Gbuf = want_grad ? at::empty({N > 0 ? C : 0, V}, copt) : at::Tensor();

  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    const at::Tensor hc = h.narrow(0, c0, n).to(cdt);
    FLDChunk ch;
    ch.S = Sbuf.narrow(0, 0, n);
    if (b.defined()) at::addmm_out(ch.S, b, hc, W.t()); else at::mm_out(ch.S, hc, W.t());
    if (dense) {
      const at::Tensor tc = th.narrow(0, c0, n).to(cdt);
      ch.Tl = Tbuf.narrow(0, 0, n);
      if (tb.defined()) at::addmm_out(ch.Tl, tb, tc, tW.t()); else at::mm_out(ch.Tl, tc, tW.t());
    } else {
      ch.idx = ix.narrow(0, c0, n);
      ch.lp = lp.narrow(0, c0, n);
    }
    if (lab.defined()) ch.labels = lab.narrow(0, c0, n);
    ch.loss_rows = loss_rows.narrow(0, c0, n);
    if (want_grad) ch.G = Gbuf.narrow(0, 0, n);
    ch.mode = mode;
    ch.temperature = temperature;
    ch.kd_weight = kd_weight;
    ch.ce_weight = ce_weight;
    ch.grad_scale = grad_scale;
    ch.ignore_index = ignore_index;
    ch.row0 = c0;
    at::Tensor G = step(ch);
    if (!want_grad) continue;
    if (rw.defined()) G = G.mul_(rw.narrow(0, c0, n).unsqueeze(1));
    if (grad_hidden) {
      auto ghc = gh.narrow(0, c0, n);
      at::mm_out(ghc, G, W);
    }
    if (grad_weight) gW.addmm_(G.t(), hc);
    if (grad_bias) gb.add_(G.sum(0));
  }

  at::Tensor loss;
  if (reduction == kNone) {
    loss = loss_rows.reshape(lead).to(hidden.scalar_type());
  } else {
    loss = loss_rows.sum();
    if (reduction == kMean) loss = loss * grad_scale;
    loss = loss.to(hidden.scalar_type());
  }
  auto none = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  gh = grad_hidden ? gh.reshape(hidden.sizes()).to(hidden.scalar_type()) : none(hidden);
  gW = grad_weight ? gW.to(weight.scalar_type()) : none(weight);
  gb = grad_bias ? gb.to(bias->scalar_type()) : none(hidden);
  return {loss, gh, gW, gb};
}

}  // namespace reuse_core
