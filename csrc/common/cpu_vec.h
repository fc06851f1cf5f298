// Portable (scalar) math policy for the CPU row kernels, plus bfloat16 helpers.
//
// The row kernels are templates over an "Ops" policy (vector width W, load/store with dtype
// conversion, exp, reductions). This header holds the width-1 policy used on any x86-64/ARM CPU
// and for float64; cpu_vec_avx2.h holds the 8-wide AVX2+FMA one. Neither includes ATen headers:
// the AVX2 translation unit is compiled for a different ISA, and an inline ATen function
// instantiated there could be picked by the linker for the portable path as well.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// Lambdas in the row kernels' inner loops must inline, or the loop pays a call per vector.
#define REUSE_AI __attribute__((always_inline))

namespace reuse_core {

// Free helpers are `static` so each translation unit (portable or AVX2) keeps its own copy.
// Layout-compatible with c10::BFloat16 (one uint16_t holding the top half of a float32).
struct bf16 {
  uint16_t x;
};

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2 };

static inline float bf16_to_float(bf16 v) {
  uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as c10::BFloat16 does.
static inline bf16 float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return bf16{0x7FC0};
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return bf16{uint16_t(bits >> 16)};
}

// In an unnamed namespace: every translation unit gets its own copy (see above).
namespace {

template <typename Acc>
struct ScalarOps {
  using T = Acc;
  using V = Acc;
  using M = bool;
  static constexpr int W = 1;
  static constexpr bool kWithF64 = true;

  static V set1(T x) { return x; }
  static V load(const float* p) { return T(*p); }
  static V load(const double* p) { return T(*p); }
  static V load(const bf16* p) { return T(bf16_to_float(*p)); }
  template <typename S>
  static V load_tail(const S* p, int64_t, T) { return load(p); }
  static void store(float* p, V v) { *p = float(v); }
  static void store(double* p, V v) { *p = double(v); }
  static void store(bf16* p, V v) { *p = float_to_bf16(float(v)); }
  template <typename S>
  static void store_tail(S* p, V v, int64_t) { store(p, v); }

  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V exp(V a) { return std::exp(a); }
  static V log(V a) { return std::log(a); }
  static M gt(V a, V b) { return a > b; }
  // m ? a : 0, and 0 (not NaN) when a is NaN but m is false.
  static V and_mask(M m, V a) { return m ? a : V(0); }
  static V select(M m, V a, V b) { return m ? a : b; }
  static bool all(M m) { return m; }
  // Lanes where a or b is NaN; masks combine with or_mask, none() is the empty mask.
  static M unordered(V a, V b) { return a != a || b != b; }
  static M or_mask(M a, M b) { return a || b; }
  static M none() { return false; }
  static bool any(M m) { return m; }
  static T reduce_add(V v) { return v; }
  static T reduce_max(V v) { return v; }
};

// Runs f(i, tail) over [0, n) in steps of W: full vectors with tail = std::false_type, then
// at most one partial vector with std::true_type, so the main loop carries no tail test.
template <int W, class F>
inline __attribute__((always_inline)) void for_chunks(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + W <= n; i += W) f(i, std::false_type{});
  if (i < n) f(i, std::true_type{});
}

// Load/store a vector, or the first `rem` elements when Tail (other lanes read as `fill`).
template <class Ops, class Tail, class Y>
inline __attribute__((always_inline)) typename Ops::V vload(const Y* p, int64_t rem, typename Ops::T fill) {
  if constexpr (Tail::value) return Ops::load_tail(p, rem, fill); else return Ops::load(p);
}
template <class Ops, class Tail, class Y>
inline __attribute__((always_inline)) void vstore(Y* p, typename Ops::V v, int64_t rem) {
  if constexpr (Tail::value) Ops::store_tail(p, v, rem); else Ops::store(p, v);
}

// Calls f(X{}) with X the storage type of d (float64 only where the policy computes in it).
template <bool kWithF64, class F>
void visit_dtype(DType d, F&& f) {
  switch (d) {
    case DType::f32: f(float{}); break;
    case DType::bf16: f(bf16{}); break;
    case DType::f64:
      if constexpr (kWithF64) f(double{});
      break;
  }
}

}  // namespace

}  // namespace reuse_core
