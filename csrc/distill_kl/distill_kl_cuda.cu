// CUDA distill_kl: one block per row. Pass 1 keeps per-thread online maxima and sums of
// exponentials, combined across the block; pass 2 re-reads the row and writes the student
// gradient while summing the KL term; pass 3 (teacher gradient) only for mutual learning.
// Long rows are read by blocks of up to 1024 threads, so few rows are in flight per SM and the
// re-reads of passes 2-3 come from L2, not HBM; rows up to 4096 classes get one warp each.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/cuda_dispatch.h"
#include "../common/cuda_utils.cuh"
#include "../ops.h"
#include "distill_kl_checks.h"

namespace reuse_core {
namespace cuda {
namespace {

struct KLArgs {
  const void* student;
  const void* teacher;
  const int64_t* labels;  // null: none
  void* grad_student;     // null: not wanted
  void* grad_teacher;     // null: not wanted
  float* loss_rows;
  const float* grad_scale;  // device scalar: the reduction's factor
  int64_t rows, vocab, ignore_index;
  float inv_T, T, kd, ce;
};

template <typename S, typename Tt, int VEC, bool kWarp>
__global__ void distill_kl_kernel(KLArgs a) {
  __shared__ float smem[32];
  const RowGroup<kWarp> grp;
  const int64_t n = a.vocab;
  const float inv_T = a.inv_T;
  const bool use_ce_global = a.ce != 0.f && a.labels != nullptr;
  const int64_t i0 = int64_t(grp.rank()) * VEC, step = int64_t(grp.size()) * VEC;
  for (int64_t r = grp.first_row(); r < a.rows; r += grp.row_stride()) {
    const S* s = static_cast<const S*>(a.student) + r * n;
    const Tt* t = static_cast<const Tt*>(a.teacher) + r * n;
    S* gs = a.grad_student ? static_cast<S*>(a.grad_student) + r * n : nullptr;
    Tt* gt = a.grad_teacher ? static_cast<Tt*>(a.grad_teacher) + r * n : nullptr;
    const int64_t label = a.labels ? a.labels[r] : -1;
    if (a.labels && label == a.ignore_index) {
      for (int64_t i = grp.rank(); i < n; i += grp.size()) {
        if (gs) gs[i] = from_float<S>(0.f);
        if (gt) gt[i] = from_float<Tt>(0.f);
      }
      if (grp.rank() == 0) a.loss_rows[r] = 0.f;
      continue;
    }
    CUDA_KERNEL_ASSERT((!a.labels || (label >= 0 && label < n)) && "distill_kl: label out of range");
    const bool use_ce = use_ce_global;

    // Pass 1: per-thread online maxima and sums, rescaled only when the maximum grows.
    float ms = -INFINITY, ss = 0.f, sc = 0.f, mt = -INFINITY, st = 0.f;
    bool bad = false;  // a NaN in the row, which the max reductions would drop
#pragma unroll 2
    for (int64_t i = i0; i < n; i += step) {
      float xs[VEC], xt[VEC];
      load_vec<VEC>(s + i, xs);
      load_vec<VEC>(t + i, xt);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        bad |= xs[j] != xs[j] || xt[j] != xt[j];
        if (xs[j] > ms) {
          const float d = ms - xs[j];  // -inf while ms is -inf: the sums are 0 anyway
          ss *= __expf(d * inv_T);
          if (use_ce) sc *= __expf(d);
          ms = xs[j];
        }
        if (xs[j] > -INFINITY) {
          ss += __expf((xs[j] - ms) * inv_T);
          if (use_ce) sc += __expf(xs[j] - ms);
        }
        if (xt[j] > mt) {
          st *= __expf((mt - xt[j]) * inv_T);
          mt = xt[j];
        }
        if (xt[j] > -INFINITY) st += __expf((xt[j] - mt) * inv_T);
      }
    }
    if (grp.max(bad ? 1.f : 0.f, smem) > 0.f) {  // NaN loss and gradient rows
      for (int64_t i = grp.rank(); i < n; i += grp.size()) {
        if (gs) gs[i] = from_float<S>(NAN);
        if (gt) gt[i] = from_float<Tt>(NAN);
      }
      if (grp.rank() == 0) a.loss_rows[r] = NAN;
      grp.sync();
      continue;
    }
    const float Ms = grp.max(ms, smem), Mt = grp.max(mt, smem);
    const float fs = ms > -INFINITY ? __expf((ms - Ms) * inv_T) : 0.f;
    const float ft = mt > -INFINITY ? __expf((mt - Mt) * inv_T) : 0.f;
    const float Ss = grp.sum(ss * fs, smem), St = grp.sum(st * ft, smem);
    const float Sc = use_ce ? grp.sum(ms > -INFINITY ? sc * __expf(ms - Ms) : 0.f, smem) : 0.f;
    const float cs = Ms > -INFINITY ? Ms : 0.f, ct = Mt > -INFINITY ? Mt : 0.f;
    const float inv_Ss = Ss > 0.f ? 1.f / Ss : 0.f, inv_St = St > 0.f ? 1.f / St : 0.f;
    const float inv_Sc = Sc > 0.f ? 1.f / Sc : 0.f;
    const bool use_kd = a.kd != 0.f && St > 0.f;
    const float scale = *a.grad_scale;
    const float gq = use_kd ? a.kd * a.T * scale : 0.f, gc = use_ce ? a.ce * scale : 0.f;

    // Pass 2: student gradient and sum_v p_v (b_v - a_v).
    float kl = 0.f;
#pragma unroll 2
    for (int64_t i = i0; i < n; i += step) {
      float xs[VEC], xt[VEC], g[VEC];
      load_vec<VEC>(s + i, xs);
      load_vec<VEC>(t + i, xt);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float av = (xs[j] - cs) * inv_T, bv = (xt[j] - ct) * inv_T;
        const float p = __expf(bv) * inv_St;
        if (p > 0.f) kl += p * (bv - av);  // p = 0 contributes 0, never 0 * (-inf)
        g[j] = gq * (__expf(av) * inv_Ss - p);
        if (use_ce) g[j] += gc * (__expf(xs[j] - cs) * inv_Sc - (i + j == label ? 1.f : 0.f));
      }
      if (gs) store_vec<VEC>(gs + i, g);
    }
    const float e_p = grp.sum(kl, smem);
    const bool kl_infinite = use_kd && (!(Ss > 0.f) || e_p == INFINITY);
    if (grp.rank() == 0) {
      float loss = 0.f;
      if (use_kd) loss += a.kd * a.T * a.T * (kl_infinite ? INFINITY : e_p - __logf(St) + __logf(Ss));
      if (use_ce) loss += a.ce * (Sc > 0.f ? __logf(Sc) + cs - to_float(s[label]) : INFINITY);
      a.loss_rows[r] = loss;
    }

    // Pass 3 (mutual learning): dL/dt = kd T p ((b - a) - E_p[b - a]); 0 where KL is infinite.
    if (gt) {
      const bool zero = !use_kd || kl_infinite;
  #pragma unroll 2
    for (int64_t i = i0; i < n; i += step) {
        float xs[VEC], xt[VEC], g[VEC];
        load_vec<VEC>(s + i, xs);
        load_vec<VEC>(t + i, xt);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float av = (xs[j] - cs) * inv_T, bv = (xt[j] - ct) * inv_T;
          const float p = __expf(bv) * inv_St;
          g[j] = (zero || !(p > 0.f)) ? 0.f : gq * p * ((bv - av) - e_p);
        }
        store_vec<VEC>(gt + i, g);
      }
    }
    grp.sync();  // smem reuse by the next row
  }
}

template <typename S, typename Tt, int VEC>
void launch(const KLArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  const int64_t max_blocks = 65535 * 8;
  if (a.vocab <= kWarpRowMax) {  // a warp per row, several rows per block
    const int64_t blocks = (a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    distill_kl_kernel<S, Tt, VEC, true><<<blocks < max_blocks ? blocks : max_blocks, 32 * kWarpsPerBlock, 0, stream>>>(a);
  } else {
    const int threads = row_block_threads(a.vocab, VEC);
    distill_kl_kernel<S, Tt, VEC, false><<<a.rows < max_blocks ? a.rows : max_blocks, threads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The widest vector both inputs (and the gradients written) allow: 8 for two 16-bit dtypes
// (16-byte loads), 4 with float32, else 1.
template <typename S, typename Tt>
void launch_widest(const KLArgs& a, cudaStream_t stream) {
  auto fits = [&](int vec) {
    return a.vocab % vec == 0 && aligned_to<S>(a.student, vec) && aligned_to<Tt>(a.teacher, vec) &&
           (!a.grad_student || aligned_to<S>(a.grad_student, vec)) &&
           (!a.grad_teacher || aligned_to<Tt>(a.grad_teacher, vec));
  };
  if constexpr (sizeof(S) == 2 && sizeof(Tt) == 2) {
    if (fits(8)) return launch<S, Tt, 8>(a, stream);
  }
  if (fits(4)) return launch<S, Tt, 4>(a, stream);
  launch<S, Tt, 1>(a, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_kl_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    double temperature, double kd_weight, double ce_weight, int64_t ignore_index, int64_t reduction,
    bool grad_student, bool grad_teacher) {
  check_distill_kl_args(student, teacher, labels, temperature, ce_weight, reduction);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto s = student.contiguous(), t = teacher.contiguous();
  const int64_t V = s.size(-1), N = s.numel() / V;
  const auto fopt = s.options().dtype(at::kFloat);

  // The mean's divisor stays on the device: no host sync.
  at::Tensor lab, scale;
  if (labels.has_value()) {
    lab = labels->reshape({-1}).to(at::kLong).contiguous();
    scale = reduction == kMean ? (lab != ignore_index).sum().clamp_min(1).to(at::kFloat).reciprocal()
                               : at::ones({}, fopt);
  } else {
    scale = at::full({}, reduction == kMean ? 1.0 / std::max<int64_t>(N, 1) : 1.0, fopt);
  }
  auto loss_rows = at::empty({N}, fopt);
  auto gs = grad_student ? at::empty(s.sizes(), s.options()) : at::empty({0}, s.options());
  auto gt = grad_teacher ? at::empty(t.sizes(), t.options()) : at::empty({0}, t.options());

  KLArgs a;
  a.student = s.data_ptr();
  a.teacher = t.data_ptr();
  a.labels = labels.has_value() ? lab.data_ptr<int64_t>() : nullptr;
  a.grad_student = grad_student ? gs.data_ptr() : nullptr;
  a.grad_teacher = grad_teacher ? gt.data_ptr() : nullptr;
  a.loss_rows = loss_rows.data_ptr<float>();
  a.grad_scale = scale.data_ptr<float>();
  a.rows = N;
  a.vocab = V;
  a.ignore_index = ignore_index;
  a.inv_T = float(1.0 / temperature);
  a.T = float(temperature);
  a.kd = float(kd_weight);
  a.ce = float(ce_weight);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  visit_cuda_dtype(s.scalar_type(), "student_logits", [&](auto s_tag) {
    visit_cuda_dtype(t.scalar_type(), "teacher_logits", [&](auto t_tag) {
      launch_widest<decltype(s_tag), decltype(t_tag)>(a, stream);
    });
  });

  at::Tensor loss;
  if (reduction == kNone) {
    loss = loss_rows.reshape(s.sizes().slice(0, s.dim() - 1)).to(s.scalar_type());
  } else {
    loss = loss_rows.sum();
    if (reduction == kMean) loss = loss * scale;
    loss = loss.to(s.scalar_type());
  }
  return {loss, gs, gt};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(reuse_core, CUDA, m) { m.impl("distill_kl", &cuda::distill_kl_cuda); }

}  // namespace reuse_core
