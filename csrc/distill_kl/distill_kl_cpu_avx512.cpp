// The distill_kl row kernel compiled for AVX-512 (F, BW, VL); picked at run time (common/cpu_features.h).
// Standard headers first, so their inline functions are compiled for the baseline ISA.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#include "../common/cpu_vec_avx512.h"
#endif
#include "distill_kl_cpu_rows.h"

namespace reuse_core {

void distill_kl_rows_avx512(const DistillKLParams& P, int64_t r0, int64_t r1) {
#if defined(__x86_64__)
  distill_kl_rows_run<avx512::Ops>(P, r0, r1);
#else
  distill_kl_rows_portable(P, r0, r1);
#endif
}

}  // namespace reuse_core
