// Run-time choice of the CPU code path: one build runs on any x86-64, and uses AVX2+FMA where
// the processor has them. REUSE_CORE_CPU_ISA=portable forces the portable path (tests use it).
#pragma once

#include <cstdlib>
#include <cstring>

namespace reuse_core {

inline bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

inline bool use_avx2() {
  const char* forced = std::getenv("REUSE_CORE_CPU_ISA");
  if (forced && std::strcmp(forced, "portable") == 0) return false;
  return cpu_has_avx2();
}

}  // namespace reuse_core
