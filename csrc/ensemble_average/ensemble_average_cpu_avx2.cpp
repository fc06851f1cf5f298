// The ensemble_average row kernels compiled for AVX2+FMA; picked at run time.
// Standard headers first, so their inline functions are compiled for the baseline ISA.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
#include "../common/cpu_vec_avx2.h"
#endif
#include "ensemble_average_cpu_rows.h"

namespace reuse_core {

void ensemble_rows_avx2(const EnsembleParams& P, int64_t r0, int64_t r1, bool backward) {
#if defined(__x86_64__)
  ensemble_rows_run<avx2::Ops>(P, r0, r1, backward);
#else
  ensemble_rows_portable(P, r0, r1, backward);
#endif
}

}  // namespace reuse_core
