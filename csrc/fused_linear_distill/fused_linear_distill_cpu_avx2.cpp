// The sparse-teacher row kernel of fused_linear_distill compiled for AVX2+FMA; picked at run time
// (common/cpu_features.h). Standard headers first, so their inline functions are compiled for the
// baseline ISA.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
#include "../common/cpu_vec_avx2.h"
#endif
#include "fused_linear_distill_cpu_rows.h"

namespace reuse_core {

void fld_sparse_rows_avx2(const FLDSparseParams& P, int64_t r0, int64_t r1) {
#if defined(__x86_64__)
  FLDSparseRows<avx2::Ops, float>::run(P, r0, r1);
#else
  fld_sparse_rows_portable(P, r0, r1);
#endif
}

}  // namespace reuse_core
