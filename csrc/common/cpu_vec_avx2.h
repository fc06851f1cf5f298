// 8-wide AVX2+FMA float policy for the CPU row kernels (see cpu_vec.h for the contract).
// Include only from a translation unit compiled for AVX2 (it starts with
// `#pragma GCC target("avx2,fma")`), and put everything it instantiates in a namespace of
// its own, so no inline function compiled for AVX2 can stand in for a portable one.
#pragma once

#include <immintrin.h>

#include "cpu_vec.h"

namespace reuse_core {
namespace avx2 {
namespace {

struct Ops {
  using T = float;
  using V = __m256;
  using M = __m256;
  static constexpr int W = 8;
  static constexpr bool kWithF64 = false;

  static V set1(T x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const bf16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // Loads n < 8 elements and fills the remaining lanes with `fill`.
  template <typename S>
  static V load_tail(const S* p, int64_t n, T fill) {
    alignas(32) S buf[8];
    S f;
    store_scalar(&f, fill);
    for (int i = 0; i < 8; ++i) buf[i] = i < n ? p[i] : f;
    return load(buf);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(bf16* p, V v) {
    // Round to nearest even (inputs here are never NaN).
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    bits = _mm256_srli_epi32(bits, 16);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  template <typename S>
  static void store_tail(S* p, V v, int64_t n) {
    alignas(32) S buf[8];
    store(buf, v);
    for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
  }
  static void store_scalar(float* p, T x) { *p = x; }
  static void store_scalar(bf16* p, T x) { *p = float_to_bf16(x); }

  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static V and_mask(M m, V a) { return _mm256_and_ps(m, a); }
  static V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static bool all(M m) { return _mm256_movemask_ps(m) == 0xFF; }
  static M unordered(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_UNORD_Q); }
  static M or_mask(M a, M b) { return _mm256_or_ps(a, b); }
  static M none() { return _mm256_setzero_ps(); }
  static bool any(M m) { return _mm256_movemask_ps(m) != 0; }

  // exp(x) to ~2 ulp over the float range; exactly 0 for x < -87.3 (and for -inf), so a
  // masked-out or -inf logit contributes exactly nothing.
  static V exp(V x) {
    const V lo = _mm256_set1_ps(-87.3f);
    const V hi = _mm256_set1_ps(88.72f);
    M underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    // x = n ln2 + r, |r| <= ln2/2, ln2 split in two for an exact product.
    V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    // Minimax polynomial for e^r on [-ln2/2, ln2/2] (Cephes expf coefficients).
    V p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    V r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // Scale by 2^n through the exponent bits.
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    V result = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(underflow, result);
  }

  // log(x) for normal x > 0 (callers never pass 0, negatives or denormals), ~1 ulp
  // (Cephes logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), polynomial in m - 1).
  static V log(V x) {
    const __m256i bits = _mm256_castps_si256(x);
    V e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
    V m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                              _mm256_set1_epi32(0x3F000000)));  // in [0.5, 1)
    const M small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
    m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
    const V z = _mm256_mul_ps(m, m);
    V y = _mm256_set1_ps(7.0376836292e-2f);
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
  }

  static T reduce_add(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static T reduce_max(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace
}  // namespace avx2
}  // namespace reuse_core
