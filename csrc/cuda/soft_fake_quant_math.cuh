// The per-element math of the CUDA soft fake-quant (qgait/ops/soft_quant.py documents it),
// shared by the kernels (soft_fake_quant.cu) and a host build that tests/test_build.py checks
// against the CPU kernel bit for bit, since there is no GPU to run the kernels on here.
//
// Every rounding step is explicit, because the kernels are built with --use_fast_math, which
// turns tanhf into tanh.approx (~1e-3 error), divisions into approximations and a*b+c into
// fma. On the device the helpers below are the IEEE _rn intrinsics (never contracted or
// approximated); on the host they are plain IEEE operations (compile with contraction off).
// The operation order mirrors csrc/cpu/vec.h and cpu/soft_fake_quant_kernel.h: y equals the
// CPU kernel's bit for bit; dx equals its AVX-512 / AVX2 builds' (where gcc fuses 1 - t^2 and
// q - v g into fma, as written here) and is within an ulp of its scalar build's.
#pragma once
#include <cmath>
#include <cstring>

#include "soft_fake_quant.cuh"

#ifdef __CUDACC__
#define QGAIT_HD __host__ __device__ __forceinline__
#else
#define QGAIT_HD inline
#endif

namespace qgait::cuda {

#ifdef __CUDA_ARCH__
QGAIT_HD float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
QGAIT_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
QGAIT_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
QGAIT_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
QGAIT_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
QGAIT_HD float as_float(int i) { return __int_as_float(i); }
// r = 1/s: IEEE round-to-nearest without flush-to-zero whatever the flags, so it equals
// torch's host-side 1.0f / scale and hard results match torch's fake-quant ops bit for bit.
QGAIT_HD float rcp_rn(float s) {
  float r;
  asm("rcp.rn.f32 %0, %1;" : "=f"(r) : "f"(s));
  return r;
}
#else
QGAIT_HD float fma_rn(float a, float b, float c) { return std::fma(a, b, c); }
QGAIT_HD float mul_rn(float a, float b) { return a * b; }
QGAIT_HD float add_rn(float a, float b) { return a + b; }
QGAIT_HD float sub_rn(float a, float b) { return a - b; }
QGAIT_HD float div_rn(float a, float b) { return a / b; }
QGAIT_HD float as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
QGAIT_HD float rcp_rn(float s) { return 1.0f / s; }
#endif

// exp(x), x clamped to [-87, 88]: x = n ln2 + r, exp(r) by a degree-6 polynomial, times 2^n.
QGAIT_HD float sfq_exp(float x) {
  x = x > 88.f ? 88.f : (x < -87.f ? -87.f : x);  // comparisons keep NaN
  const float n = rintf(x * 1.44269504088896341f);
  float r = fma_rn(n, -0.693359375f, x);  // ln2 split in two: n * ln2_hi is exact
  r = fma_rn(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fma_rn(p, r, 1.3981999507e-3f);
  p = fma_rn(p, r, 8.3334519073e-3f);
  p = fma_rn(p, r, 4.1665795894e-2f);
  p = fma_rn(p, r, 1.6666665459e-1f);
  p = fma_rn(p, r, 5.0000001201e-1f);
  p = fma_rn(mul_rn(p, r), r, add_rn(r, 1.0f));
  // 2^n built from its exponent bits (n in [-126, 127] here). A NaN n is mapped to 0 before the
  // conversion, as the device's cvt does (p stays NaN): converting NaN to int is undefined in
  // host C++, which the emulation's UBSan build reported.
  const int ni = n == n ? static_cast<int>(n) : 0;
  return mul_rn(p, as_float((ni + 127) << 23));
}

// tanh(z): an odd polynomial for |z| < 0.625 (where 1 - 2/(e^{2|z|}+1) cancels), else the
// exp form, which saturates to +-1.
QGAIT_HD float sfq_tanh(float z) {
  const float a = fabsf(z);
  const float s = mul_rn(z, z);
  float p = -5.70498872745e-3f;
  p = fma_rn(p, s, 2.06390887954e-2f);
  p = fma_rn(p, s, -5.37397155531e-2f);
  p = fma_rn(p, s, 1.33314422036e-1f);
  p = fma_rn(p, s, -3.33332819422e-1f);
  const float small = fma_rn(mul_rn(p, s), z, z);
  float big = sub_rn(1.0f, div_rn(2.0f, add_rn(sfq_exp(add_rn(a, a)), 1.0f)));
  big = z < 0.f ? -big : big;
  return a < 0.625f ? small : big;
}

// y of one element: c = clamp(x r, qn, qp); q = rint(c) | sigma(c) | c (soft at k = 0).
QGAIT_HD float fwd_elem(float x, float s, float r, const SfqConsts& P) {
  const float v = mul_rn(x, r);
  const float c = v < P.qn ? P.qn : (v > P.qp ? P.qp : v);  // NaN stays NaN
  float q;
  if (!P.soft) {
    q = rintf(c);  // half to even, like torch.round / nearbyint
  } else if (P.k0) {
    q = c;
  } else {
    const float fl = floorf(c);
    const float t = sfq_tanh(mul_rn(P.k, sub_rn(sub_rn(c, fl), 0.5f)));
    q = fma_rn(t, P.tanh_scale, add_rn(fl, 0.5f));
  }
  return add_rn(mul_rn(q, s), 0.f);  // -0 -> +0, bit-identical to torch
}

// dx and the step-gradient term of one element:
//   inside (qn <= v <= qp): dx = gy g,  term = gy (q - v g);   below/above: dx = 0, term = gy qn/qp.
// NaN v counts as inside, so NaN reaches dx and the step gradient (as on the CPU).
QGAIT_HD void bwd_elem(float gy, float x, float r, const SfqConsts& P, float& dx, float& term) {
  const float v = mul_rn(x, r);
  const bool below = v < P.qn, above = v > P.qp;
  const float c = below ? P.qn : (above ? P.qp : v);
  float g, q;
  if (P.k0) {
    g = 1.f;
    q = P.soft ? c : rintf(c);
  } else {
    const float fl = floorf(c);
    const float t = sfq_tanh(mul_rn(P.k, sub_rn(sub_rn(c, fl), 0.5f)));
    g = mul_rn(P.g_scale, fma_rn(-t, t, 1.f));  // 1 - t^2 with one rounding
    q = P.soft ? fma_rn(t, P.tanh_scale, add_rn(fl, 0.5f)) : rintf(c);
  }
  dx = (below || above) ? 0.f : mul_rn(gy, g);
  term = mul_rn(gy, below ? P.qn : (above ? P.qp : fma_rn(-v, g, q)));  // q - v g, fused
}

}  // namespace qgait::cuda
