// Argument checks shared by the CPU and CUDA attention kernels (the Python wrapper checks the
// same things first with friendlier errors; these guard direct torch.ops callers).
#pragma once

#include <ATen/ATen.h>

namespace reuse_core {

inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4, "attention: q must be 4-D (B, H, Lq, D), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 4, "attention: k must be 4-D (B, Hkv, Lk, D), got ", k.dim(), "-D");
  TORCH_CHECK(v.sizes() == k.sizes(), "attention: v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), "attention: k has batch size ", k.size(0), " but q has ", q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "attention: k has head dim ", k.size(3), " but q has ", q.size(3));
  TORCH_CHECK(q.size(3) > 0, "attention: the head dim D must be > 0");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention: the query heads H (", q.size(1),
              ") must be a multiple of the key/value heads Hkv (", k.size(1), ")");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention: q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "attention: q, k and v must be on one device");
  if (key_padding_mask.has_value()) {
    const auto& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "attention: key_padding_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == k.size(2),
                "attention: key_padding_mask must have shape (B, Lk) = (", q.size(0), ", ", k.size(2), "), got ",
                m.sizes());
    TORCH_CHECK(m.device() == q.device(), "attention: key_padding_mask is on ", m.device(), " but q is on ",
                q.device());
  }
}

inline void check_attention_backward_args(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& out,
                                          const at::Tensor& stats) {
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "attention_backward: grad and out must have the shape of q ", q.sizes());
  TORCH_CHECK(stats.dim() == 4 && stats.size(0) == 2 && stats.size(1) == q.size(0) && stats.size(2) == q.size(1) &&
                  stats.size(3) == q.size(2),
              "attention_backward: stats must have shape (2, B, H, Lq)");
  TORCH_CHECK(grad.device() == q.device() && out.device() == q.device() && stats.device() == q.device(),
              "attention_backward: every tensor must be on the device of q");
}

}  // namespace reuse_core
