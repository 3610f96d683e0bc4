// A tiny fp32 SIMD abstraction, compiled once per ISA. Deliberately without an include guard:
// a kernel file includes it (and its kernel body) once per ISA, each time inside its own
// namespace and `#pragma GCC target` region, with QGAIT_VEC set to 512, 256 or 1. That gives
// one binary with AVX-512, AVX2 and scalar code paths chosen at run time (cpu/isa.h), without
// per-file compiler flags.
//
//   Vec          W floats; load/store (unaligned), set1, arithmetic, min/max, floor, rint
//   Mask         per-lane predicate; lt/gt/ge/le, mnot, mand, mor, select(m, a, b);
//                vbeats(x, m): x replaces the running maximum m under torch.max's rule;
//                vmaxnan(m, x): the new running maximum by that rule (value only);
//                mord2(k, a, b): k and neither a nor b NaN (one instruction for two vectors on
//                AVX-512); mtrue(), mall(k)
//   vexp/vtanh   fp32 approximations (Cephes polynomials), max rel. error ~2e-7 (see below)
//
// NaN: vmax(lo, x) and vmin(hi, x) return x when x is NaN (x86 MAXPS/MINPS return the second
// operand when either is NaN), which is how a NaN input reaches the output.
//
// A running maximum m with its first arg-max, as torch.max(dim) keeps it: x replaces m when
// x > m, or when x is NaN and m is not (the first NaN wins and then stays); ties keep the first.
// That is "!(x <= m) && m == m"; beats() is the scalar form every kernel's tail uses.
static inline bool beats(float x, float m) { return !(x <= m) && m == m; }

#include <cmath>
#include <cstdint>

#if QGAIT_VEC == 512

struct Vec {
  __m512 v;
  static constexpr int W = 16;
};
using Mask = __mmask16;
static inline Vec vload(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
static inline Vec vset1(float a) { return {_mm512_set1_ps(a)}; }
static inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
static inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
static inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
static inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline Vec vmax(Vec lo, Vec x) { return {_mm512_max_ps(lo.v, x.v)}; }
static inline Vec vmin(Vec hi, Vec x) { return {_mm512_min_ps(hi.v, x.v)}; }
static inline Vec vfloor(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)}; }
// Round half to even, as std::nearbyint in the default rounding mode.
static inline Vec vrint(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
static inline Vec vabs(Vec a) { return {_mm512_abs_ps(a.v)}; }
static inline Mask vlt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
static inline Mask vgt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
static inline Mask vbeats(Vec x, Vec m) {
  return _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(m.v, m.v, _CMP_ORD_Q), x.v, m.v, _CMP_NLE_UQ);
}
// Two instructions instead of select(vbeats)'s three: where x is a number, MAXPS(x, m) (which
// returns m, the second operand, when m is NaN: a NaN stays); where x is NaN, x.
static inline Vec vmaxnan(Vec m, Vec x) {
  return {_mm512_mask_max_ps(x.v, _mm512_cmp_ps_mask(x.v, x.v, _CMP_ORD_Q), x.v, m.v)};
}
static inline Mask mord2(Mask k, Vec a, Vec b) { return _mm512_mask_cmp_ps_mask(k, a.v, b.v, _CMP_ORD_Q); }
static inline Mask mtrue() { return static_cast<Mask>(0xFFFF); }
static inline bool mall(Mask k) { return k == 0xFFFF; }
static inline Mask mnot(Mask m) { return static_cast<Mask>(~m); }
static inline Mask mor(Mask a, Mask b) { return static_cast<Mask>(a | b); }
static inline Vec select(Mask m, Vec a, Vec b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }
static inline float vsum(Vec a) { return _mm512_reduce_add_ps(a.v); }
// a * 2^n for integer-valued n
static inline Vec vldexp(Vec a, Vec n) { return {_mm512_scalef_ps(a.v, n.v)}; }

#elif QGAIT_VEC == 256

struct Vec {
  __m256 v;
  static constexpr int W = 8;
};
struct Mask {
  __m256 m;
};
static inline Vec vload(const float* p) { return {_mm256_loadu_ps(p)}; }
static inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
static inline Vec vset1(float a) { return {_mm256_set1_ps(a)}; }
static inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
static inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
static inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
static inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
static inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
static inline Vec vmax(Vec lo, Vec x) { return {_mm256_max_ps(lo.v, x.v)}; }
static inline Vec vmin(Vec hi, Vec x) { return {_mm256_min_ps(hi.v, x.v)}; }
static inline Vec vfloor(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)}; }
static inline Vec vrint(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
static inline Vec vabs(Vec a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
static inline Mask vlt(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
static inline Mask vgt(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
static inline Mask vbeats(Vec x, Vec m) {
  return {_mm256_and_ps(_mm256_cmp_ps(x.v, m.v, _CMP_NLE_UQ), _mm256_cmp_ps(m.v, m.v, _CMP_ORD_Q))};
}
static inline Mask mnot(Mask m) { return {_mm256_xor_ps(m.m, _mm256_castsi256_ps(_mm256_set1_epi32(-1)))}; }
static inline Mask mor(Mask a, Mask b) { return {_mm256_or_ps(a.m, b.m)}; }
static inline Vec select(Mask m, Vec a, Vec b) { return {_mm256_blendv_ps(b.v, a.v, m.m)}; }
static inline Vec vmaxnan(Vec m, Vec x) { return select(vbeats(x, m), x, m); }
static inline Mask mord2(Mask k, Vec a, Vec b) { return {_mm256_and_ps(k.m, _mm256_cmp_ps(a.v, b.v, _CMP_ORD_Q))}; }
static inline Mask mtrue() { return {_mm256_castsi256_ps(_mm256_set1_epi32(-1))}; }
static inline bool mall(Mask k) { return _mm256_movemask_ps(k.m) == 0xFF; }
static inline float vsum(Vec a) {
  __m128 lo = _mm256_castps256_ps128(a.v), hi = _mm256_extractf128_ps(a.v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
static inline Vec vldexp(Vec a, Vec n) {
  // n is integer-valued and within [-127, 127] here (vexp clamps its input)
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(a.v, _mm256_castsi256_ps(e))};
}

#else  // scalar

struct Vec {
  float v;
  static constexpr int W = 1;
};
using Mask = bool;
static inline Vec vload(const float* p) { return {*p}; }
static inline void vstore(float* p, Vec a) { *p = a.v; }
static inline Vec vset1(float a) { return {a}; }
static inline Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
static inline Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
static inline Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
static inline Vec operator/(Vec a, Vec b) { return {a.v / b.v}; }
static inline Vec vfma(Vec a, Vec b, Vec c) { return {std::fma(a.v, b.v, c.v)}; }
static inline Vec vmax(Vec lo, Vec x) { return {x.v < lo.v ? lo.v : x.v}; }  // NaN x -> x
static inline Vec vmin(Vec hi, Vec x) { return {x.v > hi.v ? hi.v : x.v}; }
static inline Vec vfloor(Vec a) { return {std::floor(a.v)}; }
static inline Vec vrint(Vec a) { return {std::nearbyint(a.v)}; }
static inline Vec vabs(Vec a) { return {std::fabs(a.v)}; }
static inline Mask vlt(Vec a, Vec b) { return a.v < b.v; }
static inline Mask vgt(Vec a, Vec b) { return a.v > b.v; }
static inline Mask vbeats(Vec x, Vec m) { return beats(x.v, m.v); }
static inline Mask mnot(Mask m) { return !m; }
static inline Mask mor(Mask a, Mask b) { return a || b; }
static inline Vec select(Mask m, Vec a, Vec b) { return m ? a : b; }
static inline Vec vmaxnan(Vec m, Vec x) { return beats(x.v, m.v) ? x : m; }
static inline Mask mord2(Mask k, Vec a, Vec b) { return k && a.v == a.v && b.v == b.v; }
static inline Mask mtrue() { return true; }
static inline bool mall(Mask k) { return k; }
static inline float vsum(Vec a) { return a.v; }
static inline Vec vldexp(Vec a, Vec n) { return {std::ldexp(a.v, static_cast<int>(n.v))}; }

#endif

// exp(x) for x <= 88 (Cephes expf): x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6
// polynomial, then scaled by 2^n. Inputs are clamped to [-87, 88] (callers need no more).
static inline Vec vexp(Vec x) {
  x = vmin(vset1(88.0f), vmax(vset1(-87.0f), x));
  Vec n = vrint(x * vset1(1.44269504088896341f));
  Vec r = vfma(n, vset1(-0.693359375f), x);  // ln2 split in two for an exact n*ln2_hi
  r = vfma(n, vset1(2.12194440e-4f), r);
  Vec p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(p * r, r, r + vset1(1.0f));
  return vldexp(p, n);
}

// tanh(z) (Cephes tanhf): an odd polynomial for |z| < 0.625, where 1 - 2/(exp(2|z|)+1) would
// lose relative accuracy to cancellation, and the exp form elsewhere (saturates to +-1).
static inline Vec vtanh(Vec z) {
  Vec a = vabs(z);
  Vec s = z * z;
  Vec p = vset1(-5.70498872745e-3f);
  p = vfma(p, s, vset1(2.06390887954e-2f));
  p = vfma(p, s, vset1(-5.37397155531e-2f));
  p = vfma(p, s, vset1(1.33314422036e-1f));
  p = vfma(p, s, vset1(-3.33332819422e-1f));
  Vec small = vfma(p * s, z, z);
  Vec big = vset1(1.0f) - vset1(2.0f) / (vexp(a + a) + vset1(1.0f));
  big = select(vlt(z, vset1(0.0f)), vset1(0.0f) - big, big);
  return select(vlt(a, vset1(0.625f)), small, big);
}
