// Declarations of every kernel registered in registration.cpp and the per-backend files.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace reuse_core {

// reduction codes shared with reuse_core/ops/distill_kl.py
enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };
// ensemble modes shared with reuse_core/ops/ensemble_average.py
enum EnsembleMode : int64_t { kLogits = 0, kProbs = 1, kLogProbs = 2 };

std::string build_info();

}  // namespace reuse_core
