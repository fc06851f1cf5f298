// Run-time choice of the CPU code path: one build runs on any x86-64 and uses the widest
// vector unit the processor has (AVX-512, else AVX2+FMA, else the portable path).
// REUSE_CORE_CPU_ISA=portable|avx2|avx512 asks for a narrower path (tests use it); a path the
// processor lacks is never picked.
#pragma once

#include <cstdlib>
#include <cstring>

namespace reuse_core {

enum class CpuIsa { portable = 0, avx2 = 1, avx512 = 2 };

inline CpuIsa cpu_best_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const CpuIsa best = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
                                 ? CpuIsa::avx512
                             : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? CpuIsa::avx2
                                                                                                 : CpuIsa::portable;
  return best;
#else
  return CpuIsa::portable;
#endif
}

// Read on every call, so a test can switch paths with the environment variable.
inline CpuIsa cpu_isa() {
  const CpuIsa best = cpu_best_isa();
  const char* forced = std::getenv("REUSE_CORE_CPU_ISA");
  CpuIsa want = best;
  if (forced && std::strcmp(forced, "portable") == 0) want = CpuIsa::portable;
  if (forced && std::strcmp(forced, "avx2") == 0) want = CpuIsa::avx2;
  return int(want) < int(best) ? want : best;
}

inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::avx512 ? "avx512" : isa == CpuIsa::avx2 ? "avx2" : "portable";
}

}  // namespace reuse_core
