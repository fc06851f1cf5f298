// The attention tile kernels compiled for AVX-512 (F, BW, VL); picked at run time (common/cpu_features.h).
// Standard headers first, so their inline functions are compiled for the baseline ISA.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#include "../common/cpu_vec_avx512.h"
#endif
#include "attention_cpu_rows.h"

namespace reuse_core {

#if defined(__x86_64__)
using AttnOps512 = avx512::Ops;
#else
using AttnOps512 = ScalarOps<float>;
#endif

void attention_fwd_tile_avx512(const AttnTile<float>& t, float* m, float* l, float* o, int64_t ldo, int64_t D) {
  AttentionRows<AttnOps512>::fwd_tile(t, m, l, o, ldo, D);
}
void attention_bwd_p_avx512(const AttnTile<float>& t, const float* m, const float* log_l) {
  AttentionRows<AttnOps512>::bwd_p(t, m, log_l);
}
void attention_bwd_ds_avx512(const AttnTile<float>& t, float* dp, const float* di, float scale) {
  AttentionRows<AttnOps512>::bwd_ds(t, dp, di, scale);
}

}  // namespace reuse_core
