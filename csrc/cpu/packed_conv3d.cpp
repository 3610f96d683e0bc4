// CPU packed low-bit Conv3d: direct convolution over a channels-last, spatially padded copy of
// the input held as uint8 codes, with int8 (or int4) weights and exact int32 accumulation.
//
//   x codes      u[n, t, h, w, c] = x_int + zp       (zp = -lo >= 0, see below)
//   accumulator  acc[co] = sum_{tap, c} u * w_int - zp * sum_{tap, c} w_int   (exact int32)
//
// The shift by zp makes every activation code unsigned, which is what the u8 x s8 dot products
// (vpdpbusd) need; padding is filled with zp, i.e. with the code of x_int = 0, so the
// correction zp * sum(w) is one constant per output channel, whatever the border.
//
// The codes are shifted by zp = -lo, lo the smallest input integer possible in this call (the
// grid's for a float input, 0 for uint8, -128 for int8 unless the AVX2 path measured the
// input), so a 4-bit signed grid gives codes 0..15, which the AVX2 range choice relies on.
//
// Code paths (cpu/isa.h picks one at run time; the cap makes tests run each):
//   avx512 + VNNI  tile of 6 output pixels x 64 output channels in 24 zmm accumulators; each
//                  step broadcasts 4 input channels of a pixel (one int32) and runs vpdpbusd
//                  against 16 channels x 4 weights. int4 weights are widened to int8 once per
//                  call, when the weights are laid out for the kernel (tens of KB, reused by
//                  every output pixel), so int4 runs the int8 inner loop: unpacking them in
//                  registers (two vpshufb per 4 bytes of weights) measured 1.2x the int8 time.
//   avx2           chosen per call from the code range of the input and the weight range of
//                  the layer (see "avx2 paths" below): vpmaddubsw with int16 sums where that
//                  is exact (W4A8, W8A4, W4A4), vpmaddwd on 16-bit codes where it is not
//                  (W8A8 with codes past 128), VEX vpdpbusd on CPUs with AVX-VNNI. Also used
//                  by AVX-512 CPUs without VNNI.
//   scalar         plain loops.
// The epilogue (rescale, bias, folded BatchNorm, activation, fp32 store or requantization to
// the next layer's grid) uses the same fp32 operations in the same order on every path, with
// no FMA contraction, so all paths and the reference agree bit for bit.
#include <immintrin.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu/alloc.h"
#include "cpu/isa.h"
#include "packed_conv3d.h"

// The epilogue must round like the reference (a multiply, then an add); g++ would otherwise
// contract them into FMAs, also across intrinsics.
#pragma GCC optimize("fp-contract=off")

namespace qgait {
namespace {

struct Epi {
  const int32_t* comp;  // zp * sum(w_int) per output channel
  const float* m1;      // x_scale * w_scale[co]
  const float* bias;    // bias (zeros when absent)
  const float* g;       // folded BatchNorm scale, or nullptr
  const float* beta;    // folded BatchNorm shift
  int64_t act;
  float slope;
  int64_t mode;
  float r_out, qn, qp;  // requantization: q = rint(clamp(y * r_out, qn, qp))
};

// Work description shared by the paths.
struct Ctx {
  ConvGeom g;
  int64_t Tp, Hp, Wp, Cp;  // padded input buffer [N, Tp, Hp, Wp, Cp] (uint8 codes)
  int64_t kc;              // bytes of the reduction per tap: Cp, or 4 with the W taps folded
  const uint8_t* xp;
  std::vector<int64_t> toff;  // byte offset of each tap relative to the window's corner
  int64_t Coutp;              // output channels rounded up to 16
  void* y;                    // output [N, To, Ho, Wo, Co]
  Epi E;

  const uint8_t* row_base(int64_t n, int64_t t, int64_t h) const {
    return xp + (((n * Tp + t * g.sT) * Hp + h * g.sH) * Wp) * Cp;
  }
  int64_t out_pixel(int64_t n, int64_t t, int64_t h, int64_t w) const {
    return ((n * g.To + t) * g.Ho + h) * g.Wo + w;
  }
};

// ---- epilogue, scalar (used by the avx2 and scalar paths) ---------------------------------
inline void epi_one(const Epi& E, int64_t co, int32_t a, void* y, int64_t idx) {
  a -= E.comp[co];
  if (E.mode == kOutAcc) {
    static_cast<int32_t*>(y)[idx] = a;
    return;
  }
  float z = static_cast<float>(a) * E.m1[co];
  z = z + E.bias[co];
  if (E.g) {
    z = z * E.g[co];
    z = z + E.beta[co];
  }
  if (E.act == kActRelu) z = z < 0.f ? 0.f : z;
  else if (E.act == kActLeaky) z = z < 0.f ? z * E.slope : z;
  if (E.mode == kOutFloat) {
    static_cast<float*>(y)[idx] = z;
    return;
  }
  float v = z * E.r_out;
  v = std::min(std::max(v, E.qn), E.qp);
  const int q = static_cast<int>(std::nearbyint(v));
  if (E.qn < 0.f) static_cast<int8_t*>(y)[idx] = static_cast<int8_t>(q);
  else static_cast<uint8_t*>(y)[idx] = static_cast<uint8_t>(q);
}

// ---- input quantization: codes u = rint(clamp(x * r, qn, qp)) + zp --------------------------
// A NaN maps to qn (the comparisons below are false for NaN), like vmaxps in the AVX-512 row.
using QuantRowFn = void (*)(const float*, int64_t, uint8_t*, float, float, float, int);
void quant_row_scalar(const float* x, int64_t n, uint8_t* u, float r, float qn, float qp, int zp) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] * r;
    v = v > qn ? v : qn;
    v = v < qp ? v : qp;
    u[i] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(v)) + zp);
  }
}

// ---- scalar path ----------------------------------------------------------------------------
// ws: int16 weights [Co][ktaps][kc] (int4 already unpacked).
void rows_scalar(const Ctx& c, const int16_t* ws, int64_t r0, int64_t r1) {
  const ConvGeom& g = c.g;
  const int64_t ntaps = static_cast<int64_t>(c.toff.size());
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t h = r % g.Ho, t = (r / g.Ho) % g.To, n = r / (g.Ho * g.To);
    const uint8_t* base = c.row_base(n, t, h);
    for (int64_t w = 0; w < g.Wo; ++w) {
      const uint8_t* a = base + w * g.sW * c.Cp;
      const int64_t pix = c.out_pixel(n, t, h, w);
      for (int64_t co = 0; co < g.Co; ++co) {
        int32_t acc = 0;
        for (int64_t k = 0; k < ntaps; ++k) {
          const uint8_t* ap = a + c.toff[k];
          const int16_t* wp = ws + (co * ntaps + k) * c.kc;
          for (int64_t ch = 0; ch < c.kc; ++ch) acc += static_cast<int32_t>(ap[ch]) * wp[ch];
        }
        epi_one(c.E, co, acc, c.y, pix * g.Co + co);
      }
    }
  }
}

}  // namespace
}  // namespace qgait

// ---- avx2 paths -----------------------------------------------------------------------------
// Weights and codes are the same as the VNNI path's; what differs is the multiply:
//   maddubs   vpmaddubsw (u8 x s8 pairs summed into int16, saturating) then vpaddw: L steps of
//             int16 partial sums per lane, widened (vpmaddwd by ones) into int32 once per L
//             steps. Exact when no int16 sum can leave [-32768, 32767], i.e. when
//             L * 2 * a_max * |w|_max fits (a_max: the largest code of this call, |w|_max: the
//             largest weight magnitude of this layer; chosen per call, see avx2_chunk).
//             W4A8: 2 * 255 * 8 = 4,080 -> L = 8; W8A4: 2 * 15 * 128 = 3,840 -> L = 8;
//             W4A4: 2 * 15 * 8 = 240 -> L = 136. Per 32 multiply-adds that is one vpmaddubsw
//             and one vpaddw, against two vpmaddwd + two vpaddd for 16-bit operands, and
//             against the vpmaddubsw + vpmaddwd + vpaddd of an int8 GEMM without VNNI (two
//             uops on the multiplier ports).
//   maddubs1  L = 1 (e.g. 8-bit weights with codes <= 128): vpmaddubsw, vpmaddwd by ones,
//             vpaddd per step (the sequence of an int8 GEMM without VNNI, exact here because
//             the range check says no single pair sum can saturate).
//   madd16    W8A8 with codes past that (L = 0): vpmaddwd on 16-bit codes. The code rows of
//             one output row are widened once into a small per-thread buffer, so each step
//             broadcasts two channels with one vpbroadcastd from memory (no shuffles).
//   avx_vnni  VEX vpdpbusd on ymm (CPUs reporting avx_vnni): the VNNI path's arithmetic with 8
//             lanes, exact for every range.
// All three: tiles of up to 4 output pixels x 16 output channels (8 ymm accumulators),
// weights of one step in two ymm, one broadcast per pixel and step.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace qgait {
namespace {

// Output pixels per AVX2 tile: 4 x 2 accumulators, 2 weight vectors and 4 broadcasts fill the
// 16 ymm registers (g++ loads all broadcasts of a step first; with 6 pixels it kept 8 of the
// 12 accumulators on the stack, a store and a load per step each).
constexpr int kMA = 4;

// The tiles below walk their K steps in one asm loop each, the accumulators of the P pixels x
// 16 channels in ymm0-7 (pixel m: ymm 2m and 2m + 1) for the whole walk. Intrinsics, or an
// asm statement per step, let g++ 12 keep them in memory: the madd16 loop stored all 8 to the
// stack at every step (8 stores per 8 multiplies), the maddubs loop moved them between
// registers and the stack at every chunk of L steps. ymm14 / 15: the step's weights for
// channels 0-7 / 8-15; ymm13: a pixel's broadcast codes (4 of them; 2 16-bit codes for
// madd16); ymm12: a product; ymm11: int16 ones (widening); rdx: the step's input offset.
#define QA_R(r) "%%ymm" #r
#define QA_PIX(MUL, ADD, SC, pm, a0, a1)                                   \
  "vpbroadcastd (%[" pm "],%%rdx," SC "), %%ymm13\n\t"                     \
  MUL " %%ymm14, %%ymm13, %%ymm12\n\t" ADD " %%ymm12, " QA_R(a0) ", " QA_R(a0) "\n\t" \
  MUL " %%ymm15, %%ymm13, %%ymm13\n\t" ADD " %%ymm13, " QA_R(a1) ", " QA_R(a1) "\n\t"
// L = 1: each vpmaddubsw result widened at once (vpmaddwd by ones) into int32.
#define QA_PIX1(MUL, ADD, SC, pm, a0, a1)                                  \
  "vpbroadcastd (%[" pm "],%%rdx,1), %%ymm13\n\t"                          \
  "vpmaddubsw %%ymm14, %%ymm13, %%ymm12\n\t" "vpmaddwd %%ymm11, %%ymm12, %%ymm12\n\t"     \
  "vpaddd %%ymm12, " QA_R(a0) ", " QA_R(a0) "\n\t"                         \
  "vpmaddubsw %%ymm15, %%ymm13, %%ymm13\n\t" "vpmaddwd %%ymm11, %%ymm13, %%ymm13\n\t"     \
  "vpaddd %%ymm13, " QA_R(a1) ", " QA_R(a1) "\n\t"
#define QA_ROWS2(PIX, MUL, ADD, SC) PIX(MUL, ADD, SC, "p0", 0, 1) PIX(MUL, ADD, SC, "p1", 2, 3)
#define QA_ROWS4(PIX, MUL, ADD, SC) \
  QA_ROWS2(PIX, MUL, ADD, SC) PIX(MUL, ADD, SC, "p2", 4, 5) PIX(MUL, ADD, SC, "p3", 6, 7)
#define QA_WALK(ROWS)                                                      \
  "1:\n\t"                                                                 \
  "mov (%[ao]), %%rdx\n\t"                                                 \
  "vmovdqu (%[wk]), %%ymm14\n\t"                                           \
  "vmovdqu 32(%[wk]), %%ymm15\n\t"                                         \
  ROWS                                                                     \
  "add $8, %[ao]\n\t"                                                      \
  "add %[ws], %[wk]\n\t"                                                   \
  "dec %[n]\n\t"                                                           \
  "jnz 1b\n\t"
#define QA_ONES "mov $0x10001, %%eax\n\t" "vmovd %%eax, %%xmm11\n\t" "vpbroadcastd %%xmm11, %%ymm11\n\t"
#define QA_Z(r) "vpxor " QA_R(r) ", " QA_R(r) ", " QA_R(r) "\n\t"
#define QA_Z2 QA_Z(0) QA_Z(1) QA_Z(2) QA_Z(3)
#define QA_Z4 QA_Z2 QA_Z(4) QA_Z(5) QA_Z(6) QA_Z(7)
#define QA_ST(r) "vmovdqu " QA_R(r) ", 32*" #r "(%[out])\n\t"
#define QA_ST2 QA_ST(0) QA_ST(1) QA_ST(2) QA_ST(3)
#define QA_ST4 QA_ST2 QA_ST(4) QA_ST(5) QA_ST(6) QA_ST(7)
// out[r] += the int16 sums in ymm r, widened (vpmaddwd by ones)
#define QA_ADD(r) "vpmaddwd %%ymm11, " QA_R(r) ", " QA_R(r) "\n\t" \
  "vpaddd 32*" #r "(%[out]), " QA_R(r) ", " QA_R(r) "\n\t" QA_ST(r)
#define QA_ADD2 QA_ADD(0) QA_ADD(1) QA_ADD(2) QA_ADD(3)
#define QA_ADD4 QA_ADD2 QA_ADD(4) QA_ADD(5) QA_ADD(6) QA_ADD(7)
// out[r] = the int16 sums in ymm r, widened (the first chunk: out is not read)
#define QA_SET(r) "vpmaddwd %%ymm11, " QA_R(r) ", " QA_R(r) "\n\t" QA_ST(r)
#define QA_SET2 QA_SET(0) QA_SET(1) QA_SET(2) QA_SET(3)
#define QA_SET4 QA_SET2 QA_SET(4) QA_SET(5) QA_SET(6) QA_SET(7)
#define QA_ASM(CODE)                                                                       \
  asm volatile(CODE "vzeroupper\n\t"                                                       \
               : [ao] "+r"(ao), [wk] "+r"(wk), [n] "+r"(n)                                 \
               : [p0] "r"(p[0]), [p1] "r"(p[1]), [p2] "r"(p[P > 2 ? 2 : 0]),                \
                 [p3] "r"(p[P > 2 ? 3 : 0]), [ws] "r"(ws), [out] "r"(out)                  \
               : "rax", "rdx", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",       \
                 "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",        \
                 "xmm15", "cc", "memory")

// The tiles are 4 pixels wide (P = 4), or 2 for a row's last 1-2 pixels (with 44 or 22 output
// pixels per row, 4-wide tiles alone computed 24 for 22). p[m]: window corner of pixel m (a
// tile narrower than P repeats its last pixel; those rows of out are not read). w: int8
// [K][16][4] (this tile's 16 channels), steps of 4 channels; aoff[s]: byte offset of step s.
// out: [P][16] int32. K >= 1.
template <int P>
void tile_maddubs(const uint8_t* const* p, const int64_t* aoff, int64_t K, int64_t L,
                  const int8_t* w, int64_t wstride, int32_t* out) {
  const int64_t ws = wstride;
  // chunks of L steps, int16 sums in ymm0-7 (wrapping vpaddw: the bound on L keeps every
  // true partial sum inside int16), widened into out at the end of each: stored by the
  // first, added by the others (the memset of out this replaces drew 3% of the tile's perf
  // samples; whole-model time unchanged within the noise of a loaded machine)
  for (int64_t s0 = 0; s0 < K; s0 += L) {
    const int64_t* ao = aoff + s0;
    const int8_t* wk = w + s0 * wstride;
    int64_t n = std::min(K - s0, L);
    if constexpr (P == 4) {
      if (s0 == 0)
        QA_ASM(QA_ONES QA_Z4 QA_WALK(QA_ROWS4(QA_PIX, "vpmaddubsw", "vpaddw", "1")) QA_SET4);
      else
        QA_ASM(QA_ONES QA_Z4 QA_WALK(QA_ROWS4(QA_PIX, "vpmaddubsw", "vpaddw", "1")) QA_ADD4);
    } else {
      if (s0 == 0)
        QA_ASM(QA_ONES QA_Z2 QA_WALK(QA_ROWS2(QA_PIX, "vpmaddubsw", "vpaddw", "1")) QA_SET2);
      else
        QA_ASM(QA_ONES QA_Z2 QA_WALK(QA_ROWS2(QA_PIX, "vpmaddubsw", "vpaddw", "1")) QA_ADD2);
    }
  }
}

// p[m]: 16-bit codes; w: int16 [K][16][2], steps of 2 channels; aoff in 16-bit elements.
template <int P>
void tile_madd16(const uint16_t* const* p, const int64_t* aoff, int64_t K, const int16_t* w,
                 int64_t wstride, int32_t* out) {
  const int64_t* ao = aoff;
  const int16_t* wk = w;
  const int64_t ws = wstride * 2;  // bytes
  int64_t n = K;
  if constexpr (P == 4)
    QA_ASM(QA_Z4 QA_WALK(QA_ROWS4(QA_PIX, "vpmaddwd", "vpaddd", "2")) QA_ST4);
  else
    QA_ASM(QA_Z2 QA_WALK(QA_ROWS2(QA_PIX, "vpmaddwd", "vpaddd", "2")) QA_ST2);
}

template <int P>
void tile_maddubs1(const uint8_t* const* p, const int64_t* aoff, int64_t K, int64_t,
                   const int8_t* w, int64_t wstride, int32_t* out) {
  const int64_t* ao = aoff;
  const int8_t* wk = w;
  const int64_t ws = wstride;
  int64_t n = K;
  if constexpr (P == 4)
    QA_ASM(QA_ONES QA_Z4 QA_WALK(QA_ROWS4(QA_PIX1, "", "", "1")) QA_ST4);
  else
    QA_ASM(QA_ONES QA_Z2 QA_WALK(QA_ROWS2(QA_PIX1, "", "", "1")) QA_ST2);
}

// Epilogue of M pixels x nco channels from acc rows of ld (16): epi_one's fp32 operations, 8
// channels at a time (a channel tail of the last tile goes through epi_one itself).
void epi_avx2(const Epi& E, const int32_t* acc, int64_t ld, int M, int64_t co0, int64_t nco,
              int64_t Co,
              void* y, int64_t pix) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 slope = _mm256_set1_ps(E.slope), r = _mm256_set1_ps(E.r_out);
  const __m256 qn = _mm256_set1_ps(E.qn), qp = _mm256_set1_ps(E.qp);
  // byte 0 of each dword, per 128-bit lane
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, -1);
  int64_t j = 0;
  for (; j + 8 <= nco; j += 8) {
    const int64_t co = co0 + j;
    const __m256i comp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(E.comp + co));
    const __m256 m1 = _mm256_loadu_ps(E.m1 + co), bias = _mm256_loadu_ps(E.bias + co);
    __m256 g = zero, beta = zero;
    if (E.g) {
      g = _mm256_loadu_ps(E.g + co);
      beta = _mm256_loadu_ps(E.beta + co);
    }
    for (int m = 0; m < M; ++m) {
      const int64_t idx = (pix + m) * Co + co;
      const __m256i a = _mm256_sub_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + m * ld + j)), comp);
      if (E.mode == kOutAcc) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int32_t*>(y) + idx), a);
        continue;
      }
      __m256 z = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), m1), bias);
      if (E.g) z = _mm256_add_ps(_mm256_mul_ps(z, g), beta);
      if (E.act != kActNone) {
        const __m256 neg = _mm256_cmp_ps(z, zero, _CMP_LT_OQ);
        z = _mm256_blendv_ps(z, E.act == kActRelu ? zero : _mm256_mul_ps(z, slope), neg);
      }
      if (E.mode == kOutFloat) {
        _mm256_storeu_ps(static_cast<float*>(y) + idx, z);
        continue;
      }
      __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(z, r), qn), qp);
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i b = _mm256_shuffle_epi8(_mm256_cvtps_epi32(v), pick);
      const __m128i lo8 = _mm_unpacklo_epi32(_mm256_castsi256_si128(b),
                                             _mm256_extracti128_si256(b, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(y) + idx), lo8);
    }
  }
  for (; j < nco; ++j)
    for (int m = 0; m < M; ++m) epi_one(E, co0 + j, acc[m * ld + j], y, (pix + m) * Co + co0 + j);
}

// Codes of 8 floats as int32 lanes: rint(clamp(x * r, qn, qp)) + zp (max(NaN, qn) = qn).
inline __m256i quant8(__m256 x, __m256 vr, __m256 vqn, __m256 vqp, __m256i vzp) {
  __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, vr), vqn), vqp);
  v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_add_epi32(_mm256_cvtps_epi32(v), vzp);
}

void quant_row_avx2(const float* x, int64_t n, uint8_t* u, float r, float qn, float qp, int zp) {
  const __m256 vr = _mm256_set1_ps(r), vqn = _mm256_set1_ps(qn), vqp = _mm256_set1_ps(qp);
  const __m256i vzp = _mm256_set1_epi32(zp);
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, -1);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i b = _mm256_shuffle_epi8(quant8(_mm256_loadu_ps(x + i), vr, vqn, vqp, vzp), pick);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(u + i),
                     _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
  }
  quant_row_scalar(x + i, n - i, u + i, r, qn, qp, zp);
}

// quant_frame_clast_avx512's job with 8 pixels per step: the codes of 4 channels packed into
// one dword per pixel, stored pixel by pixel (AVX2 has no scatter).
void quant_frame_clast_avx2(const float* x, int64_t cstride, int64_t hstride, int64_t H,
                            int64_t W, int64_t C, int64_t Cp, uint8_t* dst, int64_t dst_hstride,
                            float r, float qn, float qp, int zp) {
  const __m256 vr = _mm256_set1_ps(r), vqn = _mm256_set1_ps(qn), vqp = _mm256_set1_ps(qp);
  const __m256i vzp = _mm256_set1_epi32(zp);
  alignas(32) int32_t lanes[8];
  for (int64_t p0 = 0; p0 < C; p0 += 4) {
    for (int64_t h = 0; h < H; ++h) {
      uint8_t* d = dst + h * dst_hstride + p0;
      int64_t w = 0;
      for (; w + 8 <= W; w += 8) {
        __m256i packed = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
          const __m256i q =
              p0 + j < C ? quant8(_mm256_loadu_ps(x + (p0 + j) * cstride + h * hstride + w), vr,
                                  vqn, vqp, vzp)
                         : vzp;
          packed = _mm256_or_si256(packed, _mm256_slli_epi32(q, 8 * j));
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), packed);
        for (int k = 0; k < 8; ++k) std::memcpy(d + (w + k) * Cp, lanes + k, 4);
      }
      for (; w < W; ++w)
        for (int64_t j = 0; j < 4 && p0 + j < C; ++j)
          quant_row_scalar(x + (p0 + j) * cstride + h * hstride + w, 1, d + w * Cp + j, r, qn,
                           qp, zp);
    }
  }
}

// 16-bit copies of the kT x kH code rows one output row reads (for madd16).
void widen_rows(const uint8_t* const* rows, int64_t nrows, int64_t len, uint16_t* dst) {
  for (int64_t k = 0; k < nrows; ++k) {
    const uint8_t* s = rows[k];
    uint16_t* d = dst + k * len;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    for (; i < len; ++i) d[i] = s[i];
  }
}

}  // namespace
}  // namespace qgait
#pragma GCC pop_options

// ---- avx_vnni path (VEX vpdpbusd on ymm) ------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")
namespace qgait {
namespace {

void tile_avxvnni(const uint8_t* const* p, const int64_t* aoff, int64_t K, int64_t,
                  const int8_t* w, int64_t wstride, int32_t* out) {
  __m256i acc[4][2];
  for (int m = 0; m < 4; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t s = 0; s < K; ++s) {
    const int8_t* wk = w + s * wstride;
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32));
    for (int m = 0; m < 4; ++m) {
      int32_t v;
      std::memcpy(&v, p[m] + aoff[s], 4);
      const __m256i av = _mm256_set1_epi32(v);
      acc[m][0] = _mm256_dpbusd_avx_epi32(acc[m][0], av, b0);
      acc[m][1] = _mm256_dpbusd_avx_epi32(acc[m][1], av, b1);
    }
  }
  for (int m = 0; m < 4; ++m) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * 16), acc[m][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * 16 + 8), acc[m][1]);
  }
}

}  // namespace
}  // namespace qgait
#pragma GCC pop_options

// ---- avx512 + VNNI path ---------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")
namespace qgait {
namespace {

constexpr int kM = 6;   // output pixels per tile
constexpr int kNB = 4;  // blocks of 16 output channels per tile

inline __m512i bcast32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// The tile's reduction is one walk over steps (taps x groups of 4 input channels): step s
// broadcasts the 4 codes at aoff[s] of each pixel's window and runs vpdpbusd against the
// tile's weights at wv + s * wstride (wv: [taps][Cp/4][Coutp][4] int8, so consecutive steps'
// weights lie wstride = Coutp * 4 bytes apart, across taps too).
//
// The common tiles (5-6 pixels x 1, 2 or 4 blocks of 16 channels) are written as asm, the
// accumulators in zmm0-23 for the whole walk: g++ 12 compiled the intrinsics loop, nested
// over taps, with the accumulators moved between registers and the stack at every tap (about
// 70 moves per tap, against 4 x 24 vpdpbusd per tap for 16 input channels), and flattened
// over the steps, at every step (an asm statement per step would need more than the 30
// operands g++ allows). zmm27: a pixel's broadcast codes; zmm28-31: the step's weights;
// r10 / r11: the window of pixels 0 and 3 (pixel m at r10 + m * astep, m < 3, else r11 +
// (m - 3) * astep).
#define QV_D(w, r) "vpdpbusd %%zmm" #w ", %%zmm27, %%zmm" #r "\n\t"
#define QV_PIX_1(m, A, r0) "vpbroadcastd " A ", %%zmm27\n\t" QV_D(28, r0)
#define QV_PIX_2(m, A, r0, r1) QV_PIX_1(m, A, r0) QV_D(29, r1)
#define QV_PIX_4(m, A, r0, r1, r2, r3) QV_PIX_2(m, A, r0, r1) QV_D(30, r2) QV_D(31, r3)
#define QV_LD(m, nb, r) "vmovdqu64 " #m "*256+" #nb "*64(%[out]), %%zmm" #r "\n\t"
#define QV_LD_1(m, A, r0) QV_LD(m, 0, r0)
#define QV_LD_2(m, A, r0, r1) QV_LD_1(m, A, r0) QV_LD(m, 1, r1)
#define QV_LD_4(m, A, r0, r1, r2, r3) QV_LD_2(m, A, r0, r1) QV_LD(m, 2, r2) QV_LD(m, 3, r3)
#define QV_ST(m, nb, r) "vmovdqu64 %%zmm" #r ", " #m "*256+" #nb "*64(%[out])\n\t"
#define QV_ST_1(m, A, r0) QV_ST(m, 0, r0)
#define QV_ST_2(m, A, r0, r1) QV_ST_1(m, A, r0) QV_ST(m, 1, r1)
#define QV_ST_4(m, A, r0, r1, r2, r3) QV_ST_2(m, A, r0, r1) QV_ST(m, 2, r2) QV_ST(m, 3, r3)
#define QV_Z(r) "vpxord %%zmm" #r ", %%zmm" #r ", %%zmm" #r "\n\t"
#define QV_Z_1(m, A, r0) QV_Z(r0)
#define QV_Z_2(m, A, r0, r1) QV_Z(r0) QV_Z(r1)
#define QV_Z_4(m, A, r0, r1, r2, r3) QV_Z(r0) QV_Z(r1) QV_Z(r2) QV_Z(r3)
#define QV_P0 "(%%r10)"
#define QV_P1 "(%%r10,%[as])"
#define QV_P2 "(%%r10,%[as],2)"
#define QV_P3 "(%%r11)"
#define QV_P4 "(%%r11,%[as])"
#define QV_P5 "(%%r11,%[as],2)"
// (pixel, its address, its accumulators) for each tile shape: NB blocks x M pixels
#define QV_T4_5(F) F(0, QV_P0, 0, 1, 2, 3) F(1, QV_P1, 4, 5, 6, 7) F(2, QV_P2, 8, 9, 10, 11) \
  F(3, QV_P3, 12, 13, 14, 15) F(4, QV_P4, 16, 17, 18, 19)
#define QV_T4_6(F) QV_T4_5(F) F(5, QV_P5, 20, 21, 22, 23)
#define QV_T2_5(F) F(0, QV_P0, 0, 1) F(1, QV_P1, 2, 3) F(2, QV_P2, 4, 5) F(3, QV_P3, 6, 7) \
  F(4, QV_P4, 8, 9)
#define QV_T2_6(F) QV_T2_5(F) F(5, QV_P5, 10, 11)
#define QV_T1_5(F) F(0, QV_P0, 0) F(1, QV_P1, 1) F(2, QV_P2, 2) F(3, QV_P3, 3) F(4, QV_P4, 4)
#define QV_T1_6(F) QV_T1_5(F) F(5, QV_P5, 5)
#define QV_W_1 "vmovdqu64 (%[wk]), %%zmm28\n\t"
#define QV_W_2 QV_W_1 "vmovdqu64 64(%[wk]), %%zmm29\n\t"
#define QV_W_4 QV_W_2 "vmovdqu64 128(%[wk]), %%zmm30\n\t" "vmovdqu64 192(%[wk]), %%zmm31\n\t"
#define QV_WALK(T, NB)                                              \
  "1:\n\t"                                                          \
  "mov (%[ao]), %%r10\n\t"                                          \
  "add %[a], %%r10\n\t"                                             \
  "lea (%%r10,%[as],2), %%r11\n\t"                                  \
  "add %[as], %%r11\n\t"                                            \
  QV_W_##NB T(QV_PIX_##NB)                                          \
  "add $8, %[ao]\n\t"                                               \
  "add %[ws], %[wk]\n\t"                                            \
  "dec %[n]\n\t"                                                    \
  "jnz 1b\n\t"                                                      \
  T(QV_ST_##NB)
#define QV_CLOBBER                                                                        \
  "r10", "r11", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",   \
      "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17",     \
      "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm27", "xmm28", "xmm29",    \
      "xmm30", "xmm31", "cc", "memory"
#define QV_TILE(T, NB)                                                                    \
  if (init)                                                                               \
    asm volatile(T(QV_Z_##NB) QV_WALK(T, NB)                                              \
                 : [ao] "+r"(ao), [wk] "+r"(wk), [n] "+r"(n)                              \
                 : [a] "r"(a), [as] "r"(astep), [ws] "r"(wstride), [out] "r"(out)         \
                 : QV_CLOBBER);                                                           \
  else                                                                                    \
    asm volatile(T(QV_LD_##NB) QV_WALK(T, NB)                                             \
                 : [ao] "+r"(ao), [wk] "+r"(wk), [n] "+r"(n)                              \
                 : [a] "r"(a), [as] "r"(astep), [ws] "r"(wstride), [out] "r"(out)         \
                 : QV_CLOBBER)

// out: [M][64] partial sums of this tile (rows of the row accumulator), read unless init.
// nsteps >= 1 (every tile has a tap and a group of channels).
template <int NB, int M>
void tile_vnni(const uint8_t* a, int64_t astep, const int64_t* aoff, int64_t nsteps,
               const uint8_t* wv, int64_t wstride, int32_t* out, bool init) {
  const int64_t* ao = aoff;
  const uint8_t* wk = wv;
  int64_t n = nsteps;
  if constexpr (NB == 4 && M == 6) {
    QV_TILE(QV_T4_6, 4);
  } else if constexpr (NB == 4 && M == 5) {
    QV_TILE(QV_T4_5, 4);
  } else if constexpr (NB == 2 && M == 6) {
    QV_TILE(QV_T2_6, 2);
  } else if constexpr (NB == 2 && M == 5) {
    QV_TILE(QV_T2_5, 2);
  } else if constexpr (NB == 1 && M == 6) {
    QV_TILE(QV_T1_6, 1);
  } else if constexpr (NB == 1 && M == 5) {
    QV_TILE(QV_T1_5, 1);
  } else {  // the other shapes (narrow rows, 48 channels): the same walk in intrinsics
    __m512i acc[M][NB];
    for (int m = 0; m < M; ++m)
      for (int nb = 0; nb < NB; ++nb)
        acc[m][nb] = init ? _mm512_setzero_si512() : _mm512_loadu_si512(out + m * 64 + nb * 16);
    for (int64_t s = 0; s < n; ++s) {
      const uint8_t* ap = a + ao[s];
      const uint8_t* w = wk + s * wstride;
      __m512i b[NB];
      for (int nb = 0; nb < NB; ++nb) b[nb] = _mm512_loadu_si512(w + nb * 64);
      for (int m = 0; m < M; ++m) {
        const __m512i av = bcast32(ap + m * astep);
        for (int nb = 0; nb < NB; ++nb)
          acc[m][nb] = _mm512_dpbusd_epi32(acc[m][nb], av, b[nb]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int nb = 0; nb < NB; ++nb) _mm512_storeu_si512(out + m * 64 + nb * 16, acc[m][nb]);
  }
}

using VnniFn = void (*)(const uint8_t*, int64_t, const int64_t*, int64_t, const uint8_t*, int64_t,
                        int32_t*, bool);

template <int NB>
constexpr VnniFn vnni_for(int M) {
  switch (M) {
    case 1: return tile_vnni<NB, 1>;
    case 2: return tile_vnni<NB, 2>;
    case 3: return tile_vnni<NB, 3>;
    case 4: return tile_vnni<NB, 4>;
    case 5: return tile_vnni<NB, 5>;
    default: return tile_vnni<NB, 6>;
  }
}

VnniFn vnni_fn(int NB, int M) {
  switch (NB) {
    case 1: return vnni_for<1>(M);
    case 2: return vnni_for<2>(M);
    case 3: return vnni_for<3>(M);
    default: return vnni_for<4>(M);
  }
}

// Vectorized epilogue for M pixels x nco channels (acc rows of 64); the same fp32 operations as
// epi_one, 16 channels at a time.
void epi_avx512(const Epi& E, const int32_t* acc, int M, int64_t co0, int64_t nco, int64_t Co,
                void* y, int64_t pix) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 slope = _mm512_set1_ps(E.slope), r = _mm512_set1_ps(E.r_out);
  const __m512 qn = _mm512_set1_ps(E.qn), qp = _mm512_set1_ps(E.qp);
  for (int64_t j = 0; j < nco; j += 16) {
    const __mmask16 mk = nco - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nco - j)) - 1);
    const int64_t co = co0 + j;
    const __m512i comp = _mm512_maskz_loadu_epi32(mk, E.comp + co);
    const __m512 m1 = _mm512_maskz_loadu_ps(mk, E.m1 + co);
    const __m512 bias = _mm512_maskz_loadu_ps(mk, E.bias + co);
    __m512 g = zero, beta = zero;
    if (E.g) {
      g = _mm512_maskz_loadu_ps(mk, E.g + co);
      beta = _mm512_maskz_loadu_ps(mk, E.beta + co);
    }
    for (int m = 0; m < M; ++m) {
      const int64_t idx = (pix + m) * Co + co;
      const __m512i a = _mm512_sub_epi32(_mm512_loadu_si512(acc + m * 64 + j), comp);
      if (E.mode == kOutAcc) {
        _mm512_mask_storeu_epi32(static_cast<int32_t*>(y) + idx, mk, a);
        continue;
      }
      __m512 z = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), m1), bias);
      if (E.g) z = _mm512_add_ps(_mm512_mul_ps(z, g), beta);
      if (E.act != kActNone) {
        const __mmask16 neg = _mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ);
        z = E.act == kActRelu ? _mm512_mask_mov_ps(z, neg, zero)
                              : _mm512_mask_mul_ps(z, neg, z, slope);
      }
      if (E.mode == kOutFloat) {
        _mm512_mask_storeu_ps(static_cast<float*>(y) + idx, mk, z);
        continue;
      }
      __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(z, r), qn), qp);
      v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      // values are inside the 8-bit grid, so keeping the low byte is exact for int8 and uint8;
      // narrowed in a register, then stored (vpmovdb straight to memory measured a quarter of
      // the epilogue's time on Zen 5)
      _mm_mask_storeu_epi8(static_cast<uint8_t*>(y) + idx, mk,
                           _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
  }
}

// Codes of 16 floats: rint(clamp(x * r, qn, qp)) + zp as int32 lanes (max(NaN, qn) = qn).
inline __m512i quant16(__m512 x, __m512 vr, __m512 vqn, __m512 vqp, __m512i vzp) {
  __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, vr), vqn), vqp);
  v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_add_epi32(_mm512_cvtps_epi32(v), vzp);
}

void quant_row_avx512(const float* x, int64_t n, uint8_t* u, float r, float qn, float qp,
                      int zp) {
  const __m512 vr = _mm512_set1_ps(r), vqn = _mm512_set1_ps(qn), vqp = _mm512_set1_ps(qp);
  const __m512i vzp = _mm512_set1_epi32(zp);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512i q = quant16(_mm512_maskz_loadu_ps(mk, x + i), vr, vqn, vqp, vzp);
    _mm512_mask_cvtepi32_storeu_epi8(u + i, mk, q);  // 0..255 after the shift
  }
}

// One frame (n, t) of a float input whose W axis is contiguous (NCDHW and the like) straight
// into the channels-last code buffer: for every 4 channels (those past C are padding: zp) the
// codes of 16 pixels (quant16) are packed into 16 dwords and scattered to their pixels, instead
// of a byte-by-byte transpose. Rows run inside the channel groups, so each of the 4 channel
// planes is read front to back.
void quant_frame_clast_avx512(const float* x, int64_t cstride, int64_t hstride, int64_t H,
                              int64_t W, int64_t C, int64_t Cp, uint8_t* dst,
                              int64_t dst_hstride, float r, float qn, float qp, int zp) {
  const __m512 vr = _mm512_set1_ps(r), vqn = _mm512_set1_ps(qn), vqp = _mm512_set1_ps(qp);
  const __m512i vzp = _mm512_set1_epi32(zp);
  const __m512i lane = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(Cp / 4)));
  for (int64_t p0 = 0; p0 < C; p0 += 4) {
    for (int64_t h = 0; h < H; ++h) {
      int32_t* d = reinterpret_cast<int32_t*>(dst + h * dst_hstride + p0);
      for (int64_t w = 0; w < W; w += 16) {
        const __mmask16 mk = W - w >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (W - w)) - 1);
        __m512i packed = _mm512_setzero_si512();
        for (int j = 0; j < 4; ++j) {
          const float* xp = x + (p0 + j) * cstride + h * hstride + w;
          const __m512i q =
              p0 + j < C ? quant16(_mm512_maskz_loadu_ps(mk, xp), vr, vqn, vqp, vzp) : vzp;
          packed = _mm512_or_si512(packed, _mm512_slli_epi32(q, 8 * j));
        }
        _mm512_mask_i32scatter_epi32(d + w * (Cp / 4), mk, lane, packed, 4);
      }
    }
  }
}

// Width of the tile starting at output pixel w0 of a row of Wo: the row is cut into
// ceil(Wo / kM) tiles whose widths differ by at most one (44 -> 4 x 6 + 4 x 5 rather than
// 7 x 6 + 2): a narrow tile has too few accumulators to hide the vpdpbusd latency (a 2-pixel
// tail ran at half the speed of the others and took 9% of layer A's time).
inline int tile_width(int64_t Wo, int64_t w0) {
  const int64_t ntiles = (Wo + kM - 1) / kM, base = Wo / ntiles, wide = Wo % ntiles;
  // the first `wide` tiles are base + 1 wide
  return static_cast<int>(w0 < wide * (base + 1) ? base + 1 : base);
}

// Work item = (output row, group of up to 64 output channels). The taps are walked in blocks
// whose weights (taps x Cp x 64 bytes) fit in L1 next to the input rows; each block runs over
// the whole output row, whose partial sums wait in a row accumulator [Wo][64] (also in L1).
// Without the blocking every 6-pixel tile streams all weights of the layer (55-110 KB for the
// benchmark layers) from L2; on this (shared) machine the two orders measured the same.
// aoff: the input offset of each (tap, channel group) step, toff[t] + 4 k at t * kc / 4 + k.
void items_vnni(const Ctx& c, const uint8_t* wv, const int64_t* aoff, int64_t i0, int64_t i1) {
  const ConvGeom& g = c.g;
  const int64_t ngrp = (c.Coutp + 63) / 64, ntaps = static_cast<int64_t>(c.toff.size());
  const int64_t ksteps = c.kc / 4;
  const int64_t tap_bytes = ksteps * 4 * 64;  // weight bytes of one tap for 64 channels
  const int64_t tblock = std::max<int64_t>(1, std::min<int64_t>(ntaps, (24 << 10) / tap_bytes));
  const int64_t tstride = ksteps * c.Coutp * 4;
  std::vector<int32_t> rowacc(static_cast<size_t>(g.Wo * 64));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t grp = i % ngrp, r = i / ngrp;
    const int64_t h = r % g.Ho, t = (r / g.Ho) % g.To, n = r / (g.Ho * g.To);
    const int64_t co0 = grp * 64, nco = std::min<int64_t>(64, g.Co - co0);
    const int NB = static_cast<int>((nco + 15) / 16);
    const uint8_t* base = c.row_base(n, t, h);
    for (int64_t tb = 0; tb < ntaps; tb += tblock) {
      const int64_t nt = std::min(tblock, ntaps - tb);
      for (int64_t w0 = 0; w0 < g.Wo;) {
        const int M = tile_width(g.Wo, w0);
        vnni_fn(NB, M)(base + w0 * g.sW * c.Cp, g.sW * c.Cp, aoff + tb * ksteps,
                       nt * ksteps, wv + tb * tstride + co0 * 4, c.Coutp * 4,
                       rowacc.data() + w0 * 64, tb == 0);
        w0 += M;
      }
    }
    for (int64_t w0 = 0; w0 < g.Wo;) {
      const int M = tile_width(g.Wo, w0);
      epi_avx512(c.E, rowacc.data() + w0 * 64, M, co0, nco, g.Co, c.y,
                 c.out_pixel(n, t, h, w0));
      w0 += M;
    }
  }
}

}  // namespace
}  // namespace qgait
#pragma GCC pop_options

namespace qgait {
namespace {

enum class Path { Scalar, AVX2, VNNI };  // AVX2: maddubs, madd16 or avx_vnni (Avx2Kind)
enum class Avx2Kind { Maddubs, Maddubs1, Madd16, AvxVnni };

// The AVX2-class kernels' walk over the reduction: K steps (of 4 channels, 2 for madd16) whose
// input offsets are aoff[s] and whose weights lie at w + s * wstride.
struct Avx2Plan {
  Avx2Kind kind;
  std::vector<int64_t> aoff;
  int64_t K = 0, L = 0;
  const void* w = nullptr;
  int64_t wstride = 0;
};

// Longest run of vpmaddubsw steps whose int16 sums stay exact, for codes in [0, amax] and
// weights in [wlo, whi] (wlo <= 0 <= whi): one step adds a pair sum in [2 amax wlo,
// 2 amax whi]. 0 when a single pair can saturate.
int64_t avx2_chunk(int64_t amax, int64_t wlo, int64_t whi) {
  const int64_t up = 2 * amax * whi, down = -2 * amax * wlo;
  int64_t L = int64_t(1) << 40;
  if (up > 0) L = std::min(L, 32767 / up);
  if (down > 0) L = std::min(L, 32768 / down);
  return L;
}

void rows_avx2(const Ctx& c, const Avx2Plan& p, int64_t r0, int64_t r1) {
  const ConvGeom& g = c.g;
  static thread_local std::vector<uint16_t> s16;
  const int64_t rowlen = c.Wp * c.Cp, nrows = g.kT * g.kH;
  // (+4: the folded W taps read up to 3 codes past the last row, see `fold`)
  if (p.kind == Avx2Kind::Madd16 && s16.size() < static_cast<size_t>(nrows * rowlen + 4))
    s16.resize(static_cast<size_t>(nrows * rowlen + 4));
  std::vector<const uint8_t*> rows(static_cast<size_t>(nrows));
  alignas(32) int32_t out[kMA * 16];
  const int64_t astep = g.sW * c.Cp;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t h = r % g.Ho, t = (r / g.Ho) % g.To, n = r / (g.Ho * g.To);
    const uint8_t* base = c.row_base(n, t, h);
    if (p.kind == Avx2Kind::Madd16) {
      for (int64_t kt = 0; kt < g.kT; ++kt)
        for (int64_t kh = 0; kh < g.kH; ++kh)
          rows[kt * g.kH + kh] = base + (kt * g.dT * c.Hp + kh * g.dH) * rowlen;
      widen_rows(rows.data(), nrows, rowlen, s16.data());
    }
    for (int64_t co0 = 0; co0 < g.Co;) {
      const int64_t nco = std::min<int64_t>(16, g.Co - co0);
      for (int64_t w0 = 0; w0 < g.Wo;) {
        const int M = static_cast<int>(std::min<int64_t>(kMA, g.Wo - w0));
        const uint8_t* p8[kMA];
        const uint16_t* p16[kMA];
        for (int m = 0; m < kMA; ++m) {
          const int64_t off = (w0 + std::min(m, M - 1)) * astep;
          p8[m] = base + off;
          p16[m] = s16.data() + off;
        }
        const int8_t* w8 = static_cast<const int8_t*>(p.w) + co0 * p.K * 4;
        const bool wide = M > 2;  // 3-4 pixels: the 4-wide tile, 1-2: the 2-wide one
        switch (p.kind) {
          case Avx2Kind::Maddubs:
            (wide ? tile_maddubs<4> : tile_maddubs<2>)(p8, p.aoff.data(), p.K, p.L, w8,
                                                       p.wstride, out);
            break;
          case Avx2Kind::Maddubs1:
            (wide ? tile_maddubs1<4> : tile_maddubs1<2>)(p8, p.aoff.data(), p.K, p.L, w8,
                                                         p.wstride, out);
            break;
          case Avx2Kind::AvxVnni:
            tile_avxvnni(p8, p.aoff.data(), p.K, p.L, w8, p.wstride, out);
            break;
          case Avx2Kind::Madd16:
            (wide ? tile_madd16<4> : tile_madd16<2>)(
                p16, p.aoff.data(), p.K, static_cast<const int16_t*>(p.w) + co0 * p.K * 2,
                p.wstride, out);
            break;
        }
        epi_avx2(c.E, out, 16, M, co0, nco, g.Co, c.y, c.out_pixel(n, t, h, w0));
        w0 += M;
      }
      co0 += 16;
    }
  }
}

// Work items handed out in small chunks from a shared counter: on a loaded machine a thread
// that is descheduled for a while no longer holds up a fixed half of the work (a static split
// made two threads slower than one here).
template <typename F>
void parallel_dynamic(int64_t n, const F& f) {
  const int64_t nt = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(1, n / (nt * 32));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(chunk); b < n; b = next.fetch_add(chunk))
      f(b, std::min(n, b + chunk));
  });
}

Path choose_path() {
  const Isa isa = cpu_isa();
  if (isa >= Isa::AVX512 && cpu_has_vnni()) return Path::VNNI;
  if (isa >= Isa::AVX2) return Path::AVX2;
  return Path::Scalar;
}

void check_positive(const at::Tensor& t, const char* name) {
  const at::Tensor c = t.contiguous();
  const float* p = c.data_ptr<float>();
  for (int64_t i = 0; i < c.numel(); ++i)
    QGAIT_CHECK(std::isfinite(p[i]) && p[i] > 0.f, kPackedConv, name,
                " must be finite and > 0, got ", p[i], " at index ", i);
}

// The elements of x as a 1-D contiguous view when they fill one dense block of memory (any
// permutation of strides, e.g. channels-last), else x itself: for whole-tensor reductions,
// whose order does not matter. at::aminmax on a channels-last int8 map copies it first
// (480 us for [1, 64, 30, 16, 11], 1 thread, against 5 us on the flat view).
at::Tensor flat_view(const at::Tensor& x) {
  if (!x.is_non_overlapping_and_dense()) return x;
  return x.as_strided({x.numel()}, {1});
}

// Builds the padded channels-last code buffer u = x_int + zp (zp everywhere else).
// The buffer is reused across calls (grow-only, per calling thread): a fresh allocation of
// this size would page-fault on first touch at every call.
std::vector<uint8_t>& input_scratch() {
  static thread_local std::vector<uint8_t> buf;
  return buf;
}

// dst[i] = src[i] + zp (mod 256): int8 codes shifted to unsigned ones. Restrict pointers and a
// local count let g++ vectorize it; the same loop inline in build_input's lambda re-read the
// count through the captured geometry at every byte and ran one byte per cycle (13% of a
// chained layer's time under perf, 1 thread).
void shift_codes(const int8_t* __restrict src, uint8_t* __restrict dst, int64_t n, int zp) {
  const uint8_t z = static_cast<uint8_t>(zp);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint8_t>(static_cast<uint8_t>(src[i]) + z);
}

// Fills the padding of the buffer [N, Tp, Hp, Wp, Cp] with the code of zero, leaving the
// interior [pT, pT + T) x [pH, pH + H) x [pW, pW + W) to the caller, which writes all of it.
void fill_halo(uint8_t* buf, const ConvGeom& g, int64_t Tp, int64_t Hp, int64_t Wp, int64_t Cp,
               int zp) {
  const int64_t row = Wp * Cp, frame = Hp * row;
  const int64_t left = g.pW * Cp, right = (Wp - g.pW - g.W) * Cp;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t t = 0; t < Tp; ++t) {
      uint8_t* f = buf + (n * Tp + t) * frame;
      if (t < g.pT || t >= g.pT + g.T) {
        std::memset(f, zp, frame);
        continue;
      }
      std::memset(f, zp, g.pH * row);
      std::memset(f + (g.pH + g.H) * row, zp, (Hp - g.pH - g.H) * row);
      for (int64_t h = g.pH; h < g.pH + g.H; ++h) {
        uint8_t* r = f + h * row;
        if (left) std::memset(r, zp, left);
        if (right) std::memset(r + row - right, zp, right);
      }
    }
}

uint8_t* build_input(const at::Tensor& x, const ConvGeom& g, int64_t Tp, int64_t Hp, int64_t Wp,
                     int64_t Cp, int zp, float r, float qn, float qp) {
  std::vector<uint8_t>& buf = input_scratch();
  const size_t total = static_cast<size_t>(g.N * Tp * Hp * Wp * Cp);
  // 4 bytes of slack: with the W taps folded (Cp = 1) the last window's 4-byte read passes
  // the end by up to 3 bytes (which meet zero weights)
  if (buf.size() < total + 4) buf.resize(total + 4);
  std::memset(buf.data() + total, zp, 4);
  const auto st = x.strides();
  const auto dt = x.scalar_type();
  const bool flt = dt == at::kFloat;
  const void* xv = x.const_data_ptr();
  const Isa isa = cpu_isa();
  const QuantRowFn qrow = isa >= Isa::AVX512 ? quant_row_avx512
                          : isa >= Isa::AVX2 ? quant_row_avx2
                                             : quant_row_scalar;
  // rows of channels (channels-last) or rows of W (any other order with unit W stride)
  const bool clast = st[1] == 1 && g.C > 1;
  const bool wrows = !clast && st[4] == 1;
  // integer codes in dense channels-last rows as wide as the buffer's: one pass per row (a copy
  // for uint8 / bool; int8 adds zp in shift_codes): the int8 codes a chained packed layer
  // writes after a LeakyReLU took the per-pixel path, and the chain no gain
  const bool code_rows = clast && !flt && st[4] == g.C && Cp == g.C;
  // padding (and the channel tail) holds the code of zero; interiors are overwritten below
  // (dense code rows write every interior byte, so then only the halo is filled). One thread:
  // a memset is memory-bound (0.2 ms for layer A's warm 23 MB), and every parallel region is a
  // point where a busy machine can stall the call until all threads are scheduled again.
  if (code_rows) fill_halo(buf.data(), g, Tp, Hp, Wp, Cp, zp);
  else std::memset(buf.data(), zp, total);
  if (flt && wrows && isa >= Isa::AVX2 && Cp % 4 == 0) {
    const auto frame = isa >= Isa::AVX512 ? quant_frame_clast_avx512 : quant_frame_clast_avx2;
    at::parallel_for(0, g.N * g.T, 1, [&](int64_t b, int64_t e) {
      for (int64_t nt = b; nt < e; ++nt) {
        const int64_t n = nt / g.T, t = nt % g.T;
        frame(static_cast<const float*>(xv) + n * st[0] + t * st[2], st[1],
                                 st[3], g.H, g.W, g.C, Cp,
                                 buf.data() + (((n * Tp + t + g.pT) * Hp + g.pH) * Wp + g.pW) * Cp,
                                 Wp * Cp, r, qn, qp, zp);
      }
    });
    return buf.data();
  }
  at::parallel_for(0, g.N * g.T * g.H, 16, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> tmp(g.C * g.W);
    for (int64_t row = b; row < e; ++row) {
      const int64_t h = row % g.H, t = (row / g.H) % g.T, n = row / (g.H * g.T);
      uint8_t* dst = buf.data() + (((n * Tp + t + g.pT) * Hp + h + g.pH) * Wp + g.pW) * Cp;
      const int64_t off = n * st[0] + t * st[2] + h * st[3];
      if (Cp == 1 && wrows) {  // one channel, unpadded: the row itself
        const int64_t o = off;
        if (flt) qrow(static_cast<const float*>(xv) + o, g.W, dst, r, qn, qp, zp);
        else if (dt == at::kChar) shift_codes(static_cast<const int8_t*>(xv) + o, dst, g.W, zp);
        else std::memcpy(dst, static_cast<const uint8_t*>(xv) + o, g.W);  // uint8 / bool
        continue;
      }
      if (code_rows) {
        if (dt == at::kChar) {
          shift_codes(static_cast<const int8_t*>(xv) + off, dst, g.W * g.C, zp);
        } else {
          std::memcpy(dst, static_cast<const uint8_t*>(xv) + off, g.W * g.C);
        }
        continue;
      }
      if (clast) {
        // one pixel's channels are contiguous
        for (int64_t w = 0; w < g.W; ++w) {
          const int64_t o = off + w * st[4];
          uint8_t* d = dst + w * Cp;
          if (flt) {
            qrow(static_cast<const float*>(xv) + o, g.C, tmp.data(), r, qn, qp, zp);
          } else if (dt == at::kChar) {
            const int8_t* src = static_cast<const int8_t*>(xv) + o;
            for (int64_t ch = 0; ch < g.C; ++ch) tmp[ch] = static_cast<uint8_t>(src[ch] + zp);
          } else {  // uint8 / bool (zp = 0): the codes themselves
            std::memcpy(tmp.data(), static_cast<const uint8_t*>(xv) + o, g.C);
          }
          std::memcpy(d, tmp.data(), g.C);
        }
        continue;
      }
      // channel rows into tmp [C][W], then transposed into the channels-last buffer
      for (int64_t ch = 0; ch < g.C; ++ch) {
        const int64_t o = off + ch * st[1];
        uint8_t* tr = tmp.data() + ch * g.W;
        if (flt && wrows) {
          qrow(static_cast<const float*>(xv) + o, g.W, tr, r, qn, qp, zp);
          continue;
        }
        for (int64_t w = 0; w < g.W; ++w) {
          const int64_t i = o + w * st[4];
          if (flt) quant_row_scalar(static_cast<const float*>(xv) + i, 1, tr + w, r, qn, qp, zp);
          else if (dt == at::kChar) tr[w] = static_cast<uint8_t>(static_cast<const int8_t*>(xv)[i] + zp);
          else tr[w] = static_cast<const uint8_t*>(xv)[i];  // uint8 / bool
        }
      }
      for (int64_t w = 0; w < g.W; ++w)
        for (int64_t ch = 0; ch < g.C; ++ch) dst[w * Cp + ch] = tmp[ch * g.W + w];
    }
  });
  return buf.data();
}

// Integer weights wi[co][tap][ch] (int4 widened) from the public packed tensor
// [Co, kT, kH, kW, Cb], with each output channel's sum (for the zero-point correction) and the
// range of all (for the AVX2 choice). Plain loops over bytes: with the former per-element
// accessor the whole op took 133 us (then 56 us) for a 64 -> 128 1x3x3 layer on a 2 x 2 input,
// i.e. mostly this preparation, which ran on every call (now once per weights, `weight_prep`).
std::vector<int8_t> unpack_weights(const uint8_t* wraw, int64_t w_bits, int64_t cb, int64_t ntaps,
                                   int64_t C, int64_t Co, int32_t* wsum, int64_t& wlo,
                                   int64_t& whi) {
  const int64_t per = ntaps * C;
  std::vector<int8_t> wi(static_cast<size_t>(Co * per));
  for (int64_t r = 0; r < Co * ntaps; ++r) {
    const uint8_t* src = wraw + r * cb;
    int8_t* dst = wi.data() + r * C;
    if (w_bits == 8) {
      std::memcpy(dst, src, C);
      continue;
    }
    for (int64_t ch = 0; ch < C; ++ch) {
      const int nib = (ch & 1) ? (src[ch >> 1] >> 4) : (src[ch >> 1] & 0x0F);
      dst[ch] = static_cast<int8_t>((nib ^ 8) - 8);
    }
  }
  int lo = 0, hi = 0;
  for (int64_t co = 0; co < Co; ++co) {
    const int8_t* w = wi.data() + co * per;
    int32_t sum = 0;
    int l = 0, h = 0;
    for (int64_t i = 0; i < per; ++i) {
      sum += w[i];
      l = std::min<int>(l, w[i]);
      h = std::max<int>(h, w[i]);
    }
    wsum[co] = sum;
    lo = std::min(lo, l);
    hi = std::max(hi, h);
  }
  wlo = lo, whi = hi;
  return wi;
}

// The reduction as the kernels walk it: ktaps steps of kc bytes each, wk[co][k][j] for
// j < kc, from wi viewed as [Co][ktaps][per] (per = C_in, or kW when the W taps are folded
// into the channels, see `fold` below), zero past per.
std::vector<int8_t> reduction_weights(const std::vector<int8_t>& wi, int64_t Co, int64_t ktaps,
                                      int64_t per, int64_t kc) {
  std::vector<int8_t> wk(static_cast<size_t>(Co * ktaps * kc), 0);
  for (int64_t r = 0; r < Co * ktaps; ++r)
    std::memcpy(wk.data() + r * kc, wi.data() + r * per, per);
  return wk;
}

// Weights as [Coutp/B][ktaps][kc/G][B][G] of T, zero past C_out: lane co of a vector then holds
// G consecutive reduction bytes of output channel co, and the B channels one tile reads are
// contiguous from step to step. (B = Coutp: [ktaps][kc/G][Coutp][G].) The AVX2 tiles read
// B = 16 channels: with the full Coutp between steps (512 bytes for 128 channels) their weights
// fell into an eighth of L1's sets and came from L2, at a third of the speed.
template <typename T, int G>
std::vector<T> interleave_weights(const std::vector<int8_t>& wk, int64_t Co, int64_t ktaps,
                                  int64_t kc, int64_t Coutp, int64_t B = 0) {
  if (B == 0) B = Coutp;
  std::vector<T> out(static_cast<size_t>(ktaps * kc * Coutp), 0);
  const int64_t K = ktaps * (kc / G), n = ktaps * kc;
  for (int64_t co = 0; co < Co; ++co) {
    T* o = out.data() + (co / B) * K * B * G + (co % B) * G;
    const int8_t* w = wk.data() + co * n;
    for (int64_t s = 0; s < K; ++s, o += B * G, w += G)  // one lane's G values per step
      for (int j = 0; j < G; ++j) o[j] = static_cast<T>(w[j]);
  }
  return out;
}

// ---- prepared weights, kept across calls ----------------------------------------------------
// Unpacking, summing and laying out a layer's weights for the kernel ran on every call, serial
// before the parallel part (56 us for GaitLite3D's 64 -> 128 layer). Entries are looked up by
// the weights' bytes, of which each holds a copy: a hit needs a key of the same shapes and
// layout and equal bytes (memcmp), so weights changed in place, or other weights at a reused
// address, build a new entry, and layers with equal weights share one. Entries are immutable
// and handed out as shared_ptr (eviction cannot free one in use); the list is bounded by entry
// count and bytes, least recently used first out.
enum class WLayout : int64_t { Base, Vnni, Avx2U8, Avx2I16 };
using PrepKey = std::array<int64_t, 9>;  // w_bits, Co, C, ntaps, ktaps, kc, Coutp, fold, layout

struct WeightPrep {
  PrepKey key{};
  std::vector<uint8_t> bytes;   // the packed weights this entry was built from
  std::vector<int32_t> wsum;    // Base: each output channel's sum (Coutp entries)
  int64_t wlo = 0, whi = 0;     // Base: the range of all weights
  std::vector<int8_t> wk;       // Base: the reduction weights [Co][ktaps][kc]
  std::vector<uint8_t> w8;      // Vnni / Avx2U8 layouts
  std::vector<int16_t> w16;     // Avx2I16 layout
  size_t size() const {
    return bytes.size() + wsum.size() * 4 + wk.size() + w8.size() + w16.size() * 2;
  }
};

constexpr size_t kPrepEntries = 64, kPrepBytes = size_t(64) << 20;

template <typename Build>
std::shared_ptr<const WeightPrep> weight_prep(const at::Tensor& wpk, const PrepKey& key,
                                              Build&& build) {
  static std::mutex mu;
  static std::list<std::shared_ptr<const WeightPrep>> lru;
  static size_t total = 0;
  const auto* raw = static_cast<const uint8_t*>(wpk.const_data_ptr());
  const size_t n = static_cast<size_t>(wpk.numel());
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = lru.begin(); it != lru.end(); ++it) {
      if ((*it)->key == key && (*it)->bytes.size() == n &&
          std::memcmp((*it)->bytes.data(), raw, n) == 0) {
        lru.splice(lru.begin(), lru, it);
        return lru.front();
      }
    }
  }
  auto e = std::make_shared<WeightPrep>();
  e->key = key;
  e->bytes.assign(raw, raw + n);
  build(*e);
  const size_t sz = e->size();
  if (sz > kPrepBytes / 4) return e;  // a very large layer: built, not kept
  std::lock_guard<std::mutex> lock(mu);
  lru.push_front(e);
  total += sz;
  while (lru.size() > kPrepEntries || total > kPrepBytes) {
    total -= lru.back()->size();
    lru.pop_back();
  }
  return e;
}

at::Tensor packed_conv3d_cpu(const at::Tensor& x, const at::Tensor& x_scale, int64_t in_qn,
                             int64_t in_qp, const at::Tensor& w_packed, const at::Tensor& w_scale,
                             int64_t w_bits, int64_t c_in, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& bn_scale,
                             const std::optional<at::Tensor>& bn_shift, int64_t act,
                             double neg_slope, int64_t out_mode,
                             const std::optional<at::Tensor>& out_scale, int64_t out_qn,
                             int64_t out_qp) {
  const ConvGeom g = check_packed_conv3d_args(x, x_scale, in_qn, in_qp, w_packed, w_scale, w_bits,
                                              c_in, stride, padding, dilation, bias, bn_scale,
                                              bn_shift, act, out_mode, out_scale, out_qn, out_qp);
  check_positive(x_scale, "x_scale");
  check_positive(w_scale, "w_scale");
  if (out_mode == kOutRequant) check_positive(*out_scale, "out_scale");
  at::Tensor y = packed_conv3d_output(x, g, out_mode, out_qn);
  cpu::advise_huge(y);  // cpu/alloc.h: no 4 KiB faults per call on a fresh output
  if (x.numel() == 0 || y.numel() == 0) return y;

  const Path path = choose_path();
  Ctx c;
  c.g = g;
  c.Tp = g.T + 2 * g.pT;
  c.Hp = g.H + 2 * g.pH;
  c.Wp = g.W + 2 * g.pW;
  // One input channel (the silhouette stem): instead of padding C_in to 4 (3/4 of every
  // multiply-add on zeros), the kW taps of a window row, consecutive bytes of a 1-channel
  // buffer, take the 4 byte slots of a step (a zero weight in the slots past kW; the read past
  // a row's end lands in the next row or the buffer's slack and is multiplied by it). A
  // 3 x 3 x 3 stem then runs 9 steps of 4 bytes per output pixel instead of 27.
  const bool fold = g.C == 1 && g.kW <= 4 && g.dW == 1;
  c.Cp = fold ? 1 : (g.C + 3) / 4 * 4;
  c.kc = fold ? 4 : c.Cp;
  c.Coutp = (g.Co + 15) / 16 * 16;
  for (int64_t kt = 0; kt < g.kT; ++kt)
    for (int64_t kh = 0; kh < g.kH; ++kh)
      for (int64_t kw = 0; kw < (fold ? 1 : g.kW); ++kw)
        c.toff.push_back(((kt * g.dT * c.Hp + kh * g.dH) * c.Wp + kw * g.dW) * c.Cp);
  const int64_t ktaps = static_cast<int64_t>(c.toff.size());
  const int64_t ntaps = g.kT * g.kH * g.kW;

  const at::Tensor wpk = w_packed.contiguous();
  const auto key = [&](WLayout l) {
    return PrepKey{w_bits, g.Co, g.C, ntaps, ktaps, c.kc, c.Coutp, fold, static_cast<int64_t>(l)};
  };
  const auto base = weight_prep(wpk, key(WLayout::Base), [&](WeightPrep& e) {
    e.wsum.assign(c.Coutp, 0);
    e.wk = reduction_weights(
        unpack_weights(e.bytes.data(), w_bits, w_packed.size(4), ntaps, g.C, g.Co,
                       e.wsum.data(), e.wlo, e.whi),
        g.Co, ktaps, fold ? g.kW : g.C, c.kc);
  });
  const std::vector<int32_t>& wsum = base->wsum;
  const std::vector<int8_t>& wk = base->wk;
  const int64_t wlo = base->wlo, whi = base->whi;

  // Range of the input integers [lo, hi] (lo <= 0 <= hi); the codes are u = x_int - lo, in
  // [0, hi - lo], and the padding holds -lo, the code of zero. A float input is clamped to its
  // grid; integer codes are used as they are (like the reference), so where the AVX2 choice
  // depends on their range it is measured (one pass over the input).
  int64_t lo = in_qn, hi = in_qp;
  const at::Tensor x_flat = flat_view(x);
  const bool avx2_small = path == Path::AVX2 && !cpu_has_avx_vnni() &&
                          avx2_chunk(255, wlo, whi) < 136;
  if (x.scalar_type() == at::kBool) {
    lo = 0, hi = 1;
  } else if (x.scalar_type() == at::kByte) {
    lo = 0, hi = avx2_small ? x_flat.max().item<int64_t>() : 255;
  } else if (x.scalar_type() == at::kChar) {
    lo = -128, hi = 127;
    if (avx2_small) {
      const auto mm = at::aminmax(x_flat);
      lo = std::min<int64_t>(0, std::get<0>(mm).item<int64_t>());
      hi = std::max<int64_t>(0, std::get<1>(mm).item<int64_t>());
    }
  } else if (avx2_small) {
    // the codes are monotone in x: those of min(x) and max(x) bound them all (a NaN, which
    // takes in_qn, makes aminmax NaN: then the grid stays the range)
    const auto mm = at::aminmax(x_flat);
    const float mn = std::get<0>(mm).item<float>(), mx = std::get<1>(mm).item<float>();
    if (!std::isnan(mn) && !std::isnan(mx)) {
      const float r = 1.0f / x_scale.item<float>();
      uint8_t cmn, cmx;
      quant_row_scalar(&mn, 1, &cmn, r, static_cast<float>(in_qn), static_cast<float>(in_qp),
                       static_cast<int>(-in_qn));
      quant_row_scalar(&mx, 1, &cmx, r, static_cast<float>(in_qn), static_cast<float>(in_qp),
                       static_cast<int>(-in_qn));
      lo = std::min<int64_t>(0, int64_t(cmn) + in_qn);
      hi = std::max<int64_t>(0, int64_t(cmx) + in_qn);
    }
  }
  const int zp = static_cast<int>(-lo);
  const float xs = x_scale.item<float>();
  c.xp = build_input(x, g, c.Tp, c.Hp, c.Wp, c.Cp, zp, 1.0f / xs,
                     static_cast<float>(in_qn), static_cast<float>(in_qp));

  // Per-channel epilogue constants, all fp32 (the same products the reference forms).
  const at::Tensor wsc = w_scale.contiguous();
  std::vector<float> m1(c.Coutp, 0.f), bz(c.Coutp, 0.f), bg, bb;
  std::vector<int32_t> comp(c.Coutp, 0);
  for (int64_t co = 0; co < g.Co; ++co) {
    m1[co] = xs * wsc.const_data_ptr<float>()[co];
    comp[co] = zp * wsum[co];
  }
  if (bias) {
    const at::Tensor b = bias->contiguous();
    std::copy(b.const_data_ptr<float>(), b.const_data_ptr<float>() + g.Co, bz.begin());
  }
  if (bn_scale) {
    const at::Tensor s = bn_scale->contiguous(), sh = bn_shift->contiguous();
    bg.assign(c.Coutp, 0.f);
    bb.assign(c.Coutp, 0.f);
    std::copy(s.const_data_ptr<float>(), s.const_data_ptr<float>() + g.Co, bg.begin());
    std::copy(sh.const_data_ptr<float>(), sh.const_data_ptr<float>() + g.Co, bb.begin());
  }
  c.E = Epi{comp.data(), m1.data(), bz.data(), bn_scale ? bg.data() : nullptr,
            bn_scale ? bb.data() : nullptr, act, static_cast<float>(neg_slope), out_mode,
            out_mode == kOutRequant ? 1.0f / out_scale->item<float>() : 1.f,
            static_cast<float>(out_qn), static_cast<float>(out_qp)};
  c.y = y.data_ptr();
  const int64_t rows = g.N * g.To * g.Ho;

  if (path == Path::VNNI) {
    const auto lay = weight_prep(wpk, key(WLayout::Vnni), [&](WeightPrep& e) {
      e.w8 = interleave_weights<uint8_t, 4>(wk, g.Co, ktaps, c.kc, c.Coutp);
    });
    const int64_t ksteps = c.kc / 4;
    std::vector<int64_t> aoff(static_cast<size_t>(ktaps * ksteps));
    for (int64_t t = 0; t < ktaps; ++t)
      for (int64_t k = 0; k < ksteps; ++k) aoff[t * ksteps + k] = c.toff[t] + 4 * k;
    const int64_t items = rows * ((c.Coutp + 63) / 64);
    parallel_dynamic(items, [&](int64_t b, int64_t e) {
      items_vnni(c, lay->w8.data(), aoff.data(), b, e);
    });
  } else if (path == Path::AVX2) {
    Avx2Plan p;
    const int64_t L = avx2_chunk(hi - lo, wlo, whi);
    p.kind = cpu_has_avx_vnni() ? Avx2Kind::AvxVnni
             : L >= 2           ? Avx2Kind::Maddubs
             : L == 1           ? Avx2Kind::Maddubs1
                                : Avx2Kind::Madd16;
    const int64_t G = p.kind == Avx2Kind::Madd16 ? 2 : 4;  // bytes per step
    const int64_t per_tap = c.kc / G;
    p.K = ktaps * per_tap;
    p.L = std::max<int64_t>(1, std::min(L, p.K));
    const int64_t kws = fold ? 1 : g.kW;
    for (int64_t kt = 0; kt < g.kT; ++kt)
      for (int64_t kh = 0; kh < g.kH; ++kh)
        for (int64_t kw = 0; kw < kws; ++kw) {
          // madd16 reads the 16-bit copies of the row's kT x kH input rows, laid end to end
          const int64_t tap = p.kind == Avx2Kind::Madd16
                                  ? ((kt * g.kH + kh) * c.Wp + kw * g.dW) * c.Cp
                                  : c.toff[(kt * g.kH + kh) * kws + kw];
          for (int64_t j = 0; j < per_tap; ++j) p.aoff.push_back(tap + j * G);
        }
    const bool i16 = p.kind == Avx2Kind::Madd16;
    const auto lay = weight_prep(wpk, key(i16 ? WLayout::Avx2I16 : WLayout::Avx2U8),
                                 [&](WeightPrep& e) {
      if (i16) e.w16 = interleave_weights<int16_t, 2>(wk, g.Co, ktaps, c.kc, c.Coutp, 16);
      else e.w8 = interleave_weights<uint8_t, 4>(wk, g.Co, ktaps, c.kc, c.Coutp, 16);
    });
    p.w = i16 ? static_cast<const void*>(lay->w16.data()) : lay->w8.data();
    p.wstride = 16 * G;  // elements per step of one 16-channel block
    parallel_dynamic(rows, [&](int64_t b, int64_t e) { rows_avx2(c, p, b, e); });
  } else {
    const std::vector<int16_t> ws(wk.begin(), wk.end());
    parallel_dynamic(rows, [&](int64_t b, int64_t e) { rows_scalar(c, ws.data(), b, e); });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qgait, CPU, m) { m.impl("packed_conv3d", &packed_conv3d_cpu); }

}  // namespace qgait
