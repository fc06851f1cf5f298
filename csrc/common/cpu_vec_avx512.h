// 16-wide AVX-512 (F, BW, DQ) float policy for the CPU row kernels (see cpu_vec.h for the
// contract). Same rules as cpu_vec_avx2.h: include only from a translation unit compiled for
// AVX-512 (`#pragma GCC target(...)` first), everything in a namespace of its own.
#pragma once

#include <immintrin.h>

#include "cpu_vec.h"

namespace reuse_core {
namespace avx512 {
namespace {

struct Ops {
  using T = float;
  using V = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static constexpr bool kWithF64 = false;

  static V set1(T x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // Loads n < 16 elements and fills the remaining lanes with `fill`.
  static V load_tail(const float* p, int64_t n, T fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), __mmask16((1u << n) - 1), p);
  }
  static V load_tail(const bf16* p, int64_t n, T fill) {
    const __mmask16 m = __mmask16((1u << n) - 1);
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    const V v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_mask_blend_ps(m, _mm512_set1_ps(fill), v);
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static __m256i to_bf16(V v) {  // round to nearest even (inputs here are never NaN)
    __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
  }
  static void store(bf16* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static void store_tail(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v); }
  static void store_tail(bf16* p, V v, int64_t n) { _mm256_mask_storeu_epi16(p, __mmask16((1u << n) - 1), to_bf16(v)); }

  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static V and_mask(M m, V a) { return _mm512_maskz_mov_ps(m, a); }
  static V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  static bool all(M m) { return m == 0xFFFF; }
  static M unordered(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q); }
  static M or_mask(M a, M b) { return M(a | b); }
  static M none() { return 0; }
  static bool any(M m) { return m != 0; }

  // exp(x) to ~2 ulp; exactly 0 for x < -87.3 and for -inf (as the AVX2 policy).
  static V exp(V x) {
    const V lo = _mm512_set1_ps(-87.3f);
    const M underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.72f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    V p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(_knot_mask16(underflow), _mm512_scalef_ps(p, n));
  }

  // log(x) for normal x > 0 (Cephes logf, as the AVX2 policy).
  static V log(V x) {
    const __m512i bits = _mm512_castps_si512(x);
    V e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126)));
    V m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007FFFFF)),
                                              _mm512_set1_epi32(0x3F000000)));
    const M small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm512_mask_sub_ps(e, small, e, _mm512_set1_ps(1.0f));
    m = _mm512_sub_ps(_mm512_mask_add_ps(m, small, m, m), _mm512_set1_ps(1.0f));
    const V z = _mm512_mul_ps(m, m);
    V y = _mm512_set1_ps(7.0376836292e-2f);
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.1514610310e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.1676998740e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.2420140846e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.4249322787e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.6668057665e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(2.0000714765e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-2.4999993993e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(3.3333331174e-1f));
    y = _mm512_mul_ps(_mm512_mul_ps(y, m), z);
    y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
    return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(m, y));
  }

  static T reduce_add(V v) { return _mm512_reduce_add_ps(v); }
  static T reduce_max(V v) { return _mm512_reduce_max_ps(v); }
};

}  // namespace
}  // namespace avx512
}  // namespace reuse_core
