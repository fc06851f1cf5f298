// The ensemble_average row kernels compiled for AVX-512 (F, BW, VL); picked at run time.
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
#include "ensemble_average_cpu_rows.h"

namespace reuse_core {

void ensemble_rows_avx512(const EnsembleParams& P, int64_t r0, int64_t r1, bool backward) {
#if defined(__x86_64__)
  ensemble_rows_run<avx512::Ops>(P, r0, r1, backward);
#else
  ensemble_rows_portable(P, r0, r1, backward);
#endif
}

}  // namespace reuse_core
