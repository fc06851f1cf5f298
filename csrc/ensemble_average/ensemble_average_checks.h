// Argument checks shared by the CPU and CUDA ensemble_average kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace reuse_core {

// Validates the members against the weights and returns the shape of one member (..., C).
inline std::vector<int64_t> ensemble_member_shape(at::TensorList members, const at::Tensor& weights, int64_t mode,
                                                  bool stacked) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "ensemble_average: mode code must be 0 (logits), 1 (probs) or 2 (log_probs)");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) >= 1, "ensemble_average: weights must be a 1-d tensor (K,), got ",
              weights.sizes());
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), "ensemble_average: weights must be floating point");
  const int64_t K = weights.size(0);
  TORCH_CHECK(!members.empty(), "ensemble_average: no members");
  const auto& m0 = members[0];
  for (const auto& m : members) {
    TORCH_CHECK(at::isFloatingType(m.scalar_type()), "ensemble_average: members must be floating point, got ",
                m.scalar_type());
    TORCH_CHECK(m.scalar_type() == m0.scalar_type(), "ensemble_average: members differ in dtype");
    TORCH_CHECK(m.sizes() == m0.sizes(), "ensemble_average: members differ in shape: ", m.sizes(), " vs ", m0.sizes());
    TORCH_CHECK(m.device() == weights.device(), "ensemble_average: members are on ", m.device(),
                " but weights are on ", weights.device());
  }
  std::vector<int64_t> shape;
  if (stacked) {
    TORCH_CHECK(members.size() == 1 && m0.dim() >= 2 && m0.size(0) == K,
                "ensemble_average: stacked members must be one (K, ..., C) tensor with K = ", K);
    shape.assign(m0.sizes().begin() + 1, m0.sizes().end());
  } else {
    TORCH_CHECK(int64_t(members.size()) == K, "ensemble_average: got ", members.size(), " members but ", K,
                " weights");
    TORCH_CHECK(m0.dim() >= 1, "ensemble_average: members must be (..., C)");
    shape.assign(m0.sizes().begin(), m0.sizes().end());
  }
  TORCH_CHECK(shape.back() > 0, "ensemble_average: the class dimension C must be > 0");
  return shape;
}

}  // namespace reuse_core
