// CPU packed_conv3d, the AVX2 class: the tiles of vpmaddubsw (int16 sums where exact),
// vpmaddwd (16-bit codes) and VEX vpdpbusd (AVX-VNNI), their epilogue and input quantization.
// The driver and the arithmetic shared by every path: packed_conv3d.cpp.

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/packed_conv3d_kernels.h"

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
// All: tiles of up to 6 output pixels x 16 output channels (12 ymm accumulators; 5 pixels for
// maddubs1, whose ones take a register), weights of one step in two ymm, one
// broadcast per pixel and step. A row is cut into tiles of nearly equal width (44 -> 4 x 6 +
// 4 x 5): with 6-pixel tiles the packed GaitLite3D took 10.4-11.3 ms (W4A4, maddubs) and
// 14.9-15.7 ms (W8A8, madd16) against 11.9-12.5 and 16.5-18.2 ms with 4-pixel ones (min of 30
// calls per run, 4 alternating runs each, 1 thread, QGAIT_CPU_ISA=avx2 on Zen 4, while a
// training shared the machine).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace qgait {
namespace packed_cpu {
namespace {

// Pixels of the narrow tiles (rows of fewer than 5 output pixels; an intrinsics tile of 6
// pixels had g++ keep 8 of the 12 accumulators on the stack, a store and a load per step
// each, so the wide tiles are asm).
constexpr int kMA = 4;
constexpr int kMW = 6;  // pixels of the widest asm tiles

// The tiles below walk their K steps in one asm loop each, the accumulators of the P pixels x
// 16 channels in ymm0-11 (pixel m: ymm 2m and 2m + 1) for the whole walk. Intrinsics, or an
// asm statement per step, let g++ 12 keep them in memory: the madd16 loop stored all 8 to the
// stack at every step (8 stores per 8 multiplies), the maddubs loop moved them between
// registers and the stack at every chunk of L steps. ymm14 / 15: the step's weights for
// channels 0-7 / 8-15; ymm13: a pixel's broadcast codes (4 of them; 2 16-bit codes for
// madd16); ymm12: a product, then (maddubs) the int16 ones that widen the sums after the walk;
// ymm11: an accumulator of the 6-pixel tiles, or maddubs1's ones (whose tiles stop at 5
// pixels); rdx: the step's input offset.
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
// Pixel m's accumulators are ymm 2m and 2m + 1; QA_Wn(F) applies F to those of n pixels.
#define QA_W2(F) F(0) F(1) F(2) F(3)
#define QA_W4(F) QA_W2(F) F(4) F(5) F(6) F(7)
#define QA_W5(F) QA_W4(F) F(8) F(9)
#define QA_W6(F) QA_W5(F) F(10) F(11)
#define QA_ROWS2(PIX, MUL, ADD, SC) PIX(MUL, ADD, SC, "p0", 0, 1) PIX(MUL, ADD, SC, "p1", 2, 3)
#define QA_ROWS4(PIX, MUL, ADD, SC) \
  QA_ROWS2(PIX, MUL, ADD, SC) PIX(MUL, ADD, SC, "p2", 4, 5) PIX(MUL, ADD, SC, "p3", 6, 7)
#define QA_ROWS5(PIX, MUL, ADD, SC) QA_ROWS4(PIX, MUL, ADD, SC) PIX(MUL, ADD, SC, "p4", 8, 9)
#define QA_ROWS6(PIX, MUL, ADD, SC) QA_ROWS5(PIX, MUL, ADD, SC) PIX(MUL, ADD, SC, "p5", 10, 11)
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
// int16 ones in ymm R (for the widening vpmaddwd)
#define QA_ONES(R)                                                    \
  "mov $0x10001, %%eax\n\t" "vmovd %%eax, %%xmm" #R "\n\t"          \
  "vpbroadcastd %%xmm" #R ", %%ymm" #R "\n\t"
#define QA_Z(r) "vpxor " QA_R(r) ", " QA_R(r) ", " QA_R(r) "\n\t"
#define QA_ST(r) "vmovdqu " QA_R(r) ", 32*" #r "(%[out])\n\t"
// out[r] = (SET), or += (ADD), the int16 sums in ymm r widened by the ones in ymm12
#define QA_SET(r) "vpmaddwd %%ymm12, " QA_R(r) ", " QA_R(r) "\n\t" QA_ST(r)
#define QA_ADD(r) "vpmaddwd %%ymm12, " QA_R(r) ", " QA_R(r) "\n\t" \
  "vpaddd 32*" #r "(%[out]), " QA_R(r) ", " QA_R(r) "\n\t" QA_ST(r)
// p[m] for pixel m < P; the operands of pixels past P repeat the last (the asm never reads them)
#define QA_ASM(CODE)                                                                       \
  asm volatile(CODE "vzeroupper\n\t"                                                       \
               : [ao] "+r"(ao), [wk] "+r"(wk), [n] "+r"(n)                                 \
               : [p0] "r"(p[0]), [p1] "r"(p[1]), [p2] "r"(p[P > 2 ? 2 : 1]),                \
                 [p3] "r"(p[P > 3 ? 3 : 1]), [p4] "r"(p[P > 4 ? 4 : 1]),                    \
                 [p5] "r"(p[P > 5 ? 5 : 1]), [ws] "r"(ws), [out] "r"(out)                  \
               : "rax", "rdx", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",       \
                 "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",        \
                 "xmm15", "cc", "memory")
// M(n, ...) with the literal pixel count n = P (the macros above paste it into their names)
#define QA_FOR_P(M, ...)                 \
  if constexpr (P == 6) M(6, __VA_ARGS__); \
  else if constexpr (P == 5) M(5, __VA_ARGS__); \
  else if constexpr (P == 4) M(4, __VA_ARGS__); \
  else M(2, __VA_ARGS__)

// A row is cut into tiles of 5-6 pixels (fewer for rows narrower than 5: the 4- and 2-pixel
// tiles). p[m]: window corner of pixel m (a tile of the 4- or 2-pixel kind narrower than P
// repeats its last pixel; those rows of out are not read). w: int8 [K][16][4] (this tile's 16
// channels), steps of 4 channels; aoff[s]: byte offset of step s. out: [P][16] int32. K >= 1.
#define QA_MADDUBS(n, FIN)                                                                  \
  QA_ASM(QA_W##n(QA_Z) QA_WALK(QA_ROWS##n(QA_PIX, "vpmaddubsw", "vpaddw", "1")) QA_ONES(12) \
         QA_W##n(FIN))
template <int P>
void tile_maddubs(const uint8_t* const* p, const int64_t* aoff, int64_t K, int64_t L,
                  const int8_t* w, int64_t wstride, int32_t* out) {
  static_assert(P == 2 || P == 4 || P == 5 || P == 6);
  const int64_t ws = wstride;
  // chunks of L steps, int16 sums in the accumulators (wrapping vpaddw: the bound on L keeps
  // every true partial sum inside int16), widened into out at the end of each: stored by the
  // first, added by the others
  for (int64_t s0 = 0; s0 < K; s0 += L) {
    const int64_t* ao = aoff + s0;
    const int8_t* wk = w + s0 * wstride;
    int64_t n = std::min(K - s0, L);
    if (s0 == 0) {
      QA_FOR_P(QA_MADDUBS, QA_SET);
    } else {
      QA_FOR_P(QA_MADDUBS, QA_ADD);
    }
  }
}

// p[m]: 16-bit codes; w: int16 [K][16][2], steps of 2 channels; aoff in 16-bit elements.
#define QA_MADD16(n, _) \
  QA_ASM(QA_W##n(QA_Z) QA_WALK(QA_ROWS##n(QA_PIX, "vpmaddwd", "vpaddd", "2")) QA_W##n(QA_ST))
template <int P>
void tile_madd16(const uint16_t* const* p, const int64_t* aoff, int64_t K, const int16_t* w,
                 int64_t wstride, int32_t* out) {
  static_assert(P == 2 || P == 4 || P == 5 || P == 6);
  const int64_t* ao = aoff;
  const int16_t* wk = w;
  const int64_t ws = wstride * 2;  // bytes
  int64_t n = K;
  QA_FOR_P(QA_MADD16, 0);
}

// maddubs1 keeps its ones in ymm11 through the walk: at most 5 pixels.
#define QA_MADDUBS1(n, _) \
  QA_ASM(QA_ONES(11) QA_W##n(QA_Z) QA_WALK(QA_ROWS##n(QA_PIX1, "", "", "1")) QA_W##n(QA_ST))
template <int P>
void tile_maddubs1(const uint8_t* const* p, const int64_t* aoff, int64_t K, int64_t,
                   const int8_t* w, int64_t wstride, int32_t* out) {
  static_assert(P == 2 || P == 4 || P == 5);
  const int64_t* ao = aoff;
  const int8_t* wk = w;
  const int64_t ws = wstride;
  int64_t n = K;
  QA_FOR_P(QA_MADDUBS1, 0);
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

// The output transform of a tile row's 16 channels: mb [16][ws][16] -> y0, y1 [2 Wt][16],
// y = (A^T m A - corr) / 4 (corr: [4][Coutp] from this block's first channel).
void wino_out_avx2(const int32_t* mb, int64_t ws, int64_t Wt, const int32_t* corr,
                   int64_t Coutp, int32_t* y0, int32_t* y1) {
  for (int64_t wt = 0; wt < Wt; ++wt) {
    for (int j = 0; j < 16; j += 8) {
      const int32_t* m = mb + wt * 16 + j;
      const auto ld = [&](int xi) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + xi * ws * 16));
      };
      __m256i a[4], b[4];  // A^T m: rows 0 and 1, per column s
      for (int s = 0; s < 4; ++s) {
        const __m256i m1 = ld(4 + s), m2 = ld(8 + s);
        a[s] = _mm256_add_epi32(_mm256_add_epi32(ld(s), m1), m2);
        b[s] = _mm256_sub_epi32(_mm256_sub_epi32(m1, m2), ld(12 + s));
      }
      const auto st = [&](int32_t* dst, __m256i v, int ij) {
        const __m256i k =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + ij * Coutp + j));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                            _mm256_srai_epi32(_mm256_sub_epi32(v, k), 2));
      };
      st(y0 + 2 * wt * 16 + j, _mm256_add_epi32(_mm256_add_epi32(a[0], a[1]), a[2]), 0);
      st(y0 + (2 * wt + 1) * 16 + j, _mm256_sub_epi32(_mm256_sub_epi32(a[1], a[2]), a[3]), 1);
      st(y1 + 2 * wt * 16 + j, _mm256_add_epi32(_mm256_add_epi32(b[0], b[1]), b[2]), 2);
      st(y1 + (2 * wt + 1) * 16 + j, _mm256_sub_epi32(_mm256_sub_epi32(b[1], b[2]), b[3]), 3);
    }
  }
}

// V = B^T d B + off per tile position of one tile row (WinoRowFn), 32 (then 16) channels at a
// time in wrapping bytes (exact mod 256, see the AVX-512 kernel's wino_row_avx512); a tail of
// 4-12 channels in plain loops, also mod 256.
void wino_row_avx2(const uint8_t* row, int64_t Wq, int64_t Wt, int64_t Cp, int off,
                   uint8_t* out) {
  const int64_t xs = Wt * Cp;
  const __m256i vo = _mm256_set1_epi8(static_cast<char>(off));
  for (int64_t wt = 0; wt < Wt; ++wt) {
    const uint8_t* d = row + 2 * wt * Cp;
    uint8_t* o = out + wt * Cp;
    int64_t ch = 0;
    for (; ch + 32 <= Cp; ch += 32) {
      const auto ld = [&](int64_t i, int64_t s) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + (i * Wq + s) * Cp + ch));
      };
      __m256i a[4][4];  // B^T d
      for (int s = 0; s < 4; ++s) {
        const __m256i d0 = ld(0, s), d1 = ld(1, s), d2 = ld(2, s), d3 = ld(3, s);
        a[0][s] = _mm256_sub_epi8(d0, d2);
        a[1][s] = _mm256_add_epi8(d1, d2);
        a[2][s] = _mm256_sub_epi8(d2, d1);
        a[3][s] = _mm256_sub_epi8(d1, d3);
      }
      const auto st = [&](int xi, __m256i x, bool offset) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + xi * xs + ch),
                            offset ? _mm256_add_epi8(x, vo) : x);
      };
      for (int i = 0; i < 4; ++i) {
        st(4 * i, _mm256_sub_epi8(a[i][0], a[i][2]), true);
        st(4 * i + 1, _mm256_add_epi8(a[i][1], a[i][2]), i != 1);
        st(4 * i + 2, _mm256_sub_epi8(a[i][2], a[i][1]), true);
        st(4 * i + 3, _mm256_sub_epi8(a[i][1], a[i][3]), true);
      }
    }
    for (; ch + 16 <= Cp; ch += 16) {  // the same on 16 channels (e.g. 16-channel layers)
      const auto ld = [&](int64_t i, int64_t s) {
        return _mm_loadu_si128(reinterpret_cast<const __m128i*>(d + (i * Wq + s) * Cp + ch));
      };
      __m128i a[4][4];
      for (int s = 0; s < 4; ++s) {
        const __m128i d0 = ld(0, s), d1 = ld(1, s), d2 = ld(2, s), d3 = ld(3, s);
        a[0][s] = _mm_sub_epi8(d0, d2);
        a[1][s] = _mm_add_epi8(d1, d2);
        a[2][s] = _mm_sub_epi8(d2, d1);
        a[3][s] = _mm_sub_epi8(d1, d3);
      }
      const __m128i vo16 = _mm256_castsi256_si128(vo);
      const auto st = [&](int xi, __m128i x, bool offset) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + xi * xs + ch),
                         offset ? _mm_add_epi8(x, vo16) : x);
      };
      for (int i = 0; i < 4; ++i) {
        st(4 * i, _mm_sub_epi8(a[i][0], a[i][2]), true);
        st(4 * i + 1, _mm_add_epi8(a[i][1], a[i][2]), i != 1);
        st(4 * i + 2, _mm_sub_epi8(a[i][2], a[i][1]), true);
        st(4 * i + 3, _mm_sub_epi8(a[i][1], a[i][3]), true);
      }
    }
    for (; ch < Cp; ++ch) {
      uint8_t a[4][4];
      for (int s = 0; s < 4; ++s) {
        const uint8_t d0 = d[s * Cp + ch], d1 = d[(Wq + s) * Cp + ch];
        const uint8_t d2 = d[(2 * Wq + s) * Cp + ch], d3 = d[(3 * Wq + s) * Cp + ch];
        a[0][s] = static_cast<uint8_t>(d0 - d2);
        a[1][s] = static_cast<uint8_t>(d1 + d2);
        a[2][s] = static_cast<uint8_t>(d2 - d1);
        a[3][s] = static_cast<uint8_t>(d1 - d3);
      }
      for (int i = 0; i < 4; ++i) {
        o[4 * i * xs + ch] = static_cast<uint8_t>(a[i][0] - a[i][2] + off);
        o[(4 * i + 1) * xs + ch] = static_cast<uint8_t>(a[i][1] + a[i][2] + (i != 1 ? off : 0));
        o[(4 * i + 2) * xs + ch] = static_cast<uint8_t>(a[i][2] - a[i][1] + off);
        o[(4 * i + 3) * xs + ch] = static_cast<uint8_t>(a[i][1] - a[i][3] + off);
      }
    }
  }
}

// Codes of 8 floats as int32 lanes: rint(clamp(x * r, qn, qp)) + zp (max(NaN, qn) = qn).
inline __m256i quant8(__m256 x, __m256 vr, __m256 vqn, __m256 vqp, __m256i vzp) {
  __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, vr), vqn), vqp);
  v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_add_epi32(_mm256_cvtps_epi32(v), vzp);
}

}  // namespace

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

namespace {

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
}  // namespace packed_cpu
}  // namespace qgait
#pragma GCC pop_options

// ---- avx_vnni path (VEX vpdpbusd on ymm) ------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")
namespace qgait {
namespace packed_cpu {
namespace {

// The asm walk of the vpmaddubsw tiles with one VEX vpdpbusd per pixel and weight register
// (no int16 sums, no widening): 6 pixels x 16 channels in ymm0-11. The {vex} prefix (%{vex%}
// in asm) keeps the assembler from the EVEX form, which CPUs without AVX-512 lack. The
// intrinsics tile it replaces held 4 pixels (g++ spilled accumulators past that) and ran
// slower than vpmaddubsw: whole packed GaitLite3D width 1.0, 2 threads, Xeon capped to the
// AVX2 level, W8A8 8.61 ms against 8.18 ms, W4A4 6.24 against 5.67 ms.
#define QA_PIXV(MUL, ADD, SC, pm, a0, a1)                                  \
  "vpbroadcastd (%[" pm "],%%rdx,1), %%ymm13\n\t"                          \
  "%{vex%} vpdpbusd %%ymm14, %%ymm13, " QA_R(a0) "\n\t"                     \
  "%{vex%} vpdpbusd %%ymm15, %%ymm13, " QA_R(a1) "\n\t"
#define QA_AVXVNNI(n, _) \
  QA_ASM(QA_W##n(QA_Z) QA_WALK(QA_ROWS##n(QA_PIXV, "", "", "1")) QA_W##n(QA_ST))
template <int P>
void tile_avxvnni(const uint8_t* const* p, const int64_t* aoff, int64_t K, const int8_t* w,
                  int64_t wstride, int32_t* out) {
  static_assert(P == 2 || P == 4 || P == 5 || P == 6);
  const int64_t* ao = aoff;
  const int8_t* wk = w;
  const int64_t ws = wstride;
  int64_t n = K;
  QA_FOR_P(QA_AVXVNNI, 0);
}

}  // namespace
}  // namespace packed_cpu
}  // namespace qgait
#pragma GCC pop_options

namespace qgait {
namespace packed_cpu {

namespace {
// Width of the tile at output pixel w0 of a row of Wo: ceil(Wo / widest) tiles whose widths
// differ by at most one (44 -> 4 x 6 + 4 x 5 for widest 6), so no 1-2 pixel tail.
inline int span(int64_t Wo, int64_t w0, int widest) {
  const int64_t ntiles = (Wo + widest - 1) / widest, base = Wo / ntiles, wide = Wo % ntiles;
  return static_cast<int>(w0 < wide * (base + 1) ? base + 1 : base);
}

// Pixels of the tile at w0 of a row of Wo: nearly equal tiles of up to `widest` pixels (span),
// or, in rows narrower than 5 pixels, tiles of up to kMA.
inline int tile_pixels(int64_t Wo, int64_t w0, int widest) {
  return widest > kMA && Wo >= 5 ? span(Wo, w0, widest)
                                 : static_cast<int>(std::min<int64_t>(kMA, Wo - w0));
}

// The VEX vpdpbusd tile of M pixels.
inline void tile_vex(int M, const uint8_t* const* p8, const int64_t* aoff, int64_t K,
                     const int8_t* w8, int64_t wstride, int32_t* out) {
  (M == 6   ? tile_avxvnni<6>
   : M == 5 ? tile_avxvnni<5>
   : M > 2  ? tile_avxvnni<4>
            : tile_avxvnni<2>)(p8, aoff, K, w8, wstride, out);
}

// The vpmaddubsw tile of M pixels: maddubs (int16 sums over L steps), or maddubs1 (L = 1).
inline void tile_u8(bool one, int M, const uint8_t* const* p8, const int64_t* aoff, int64_t K,
                    int64_t L, const int8_t* w8, int64_t wstride, int32_t* out) {
  const bool wide = M > 2;  // 3-4 pixels: the 4-wide tile, 1-2: the 2-wide one
  if (one)
    (M == 5 ? tile_maddubs1<5> : wide ? tile_maddubs1<4> : tile_maddubs1<2>)(p8, aoff, K, L, w8,
                                                                              wstride, out);
  else
    (M == 6 ? tile_maddubs<6> : M == 5 ? tile_maddubs<5>
     : wide ? tile_maddubs<4> : tile_maddubs<2>)(p8, aoff, K, L, w8, wstride, out);
}
}  // namespace

// A row whose window reaches into the temporal or vertical padding walks only its valid window
// rows (runs of steps, one per valid kt), each run's sums added up here, and corrects its zero
// point with those rows' weights only (Ctx::row_comp); see items_vnni.
void rows_avx2(const Ctx& c, const Avx2Plan& p, int64_t r0, int64_t r1) {
  const ConvGeom& g = c.g;
  static thread_local avec<uint16_t> s16;
  const int64_t rowlen = c.Wp * c.Cp, nrows = g.kT * g.kH;
  // (+4: the folded W taps read up to 3 codes past the last row, see `fold`)
  if (p.kind == Avx2Kind::Madd16 && s16.size() < static_cast<size_t>(nrows * rowlen + 4))
    s16.resize(static_cast<size_t>(nrows * rowlen + 4));
  std::vector<const uint8_t*> rows(static_cast<size_t>(nrows));
  avec<int32_t> comp(static_cast<size_t>(c.Coutp));
  std::vector<std::pair<int64_t, int64_t>> runs;  // (first step, steps) of a border row
  alignas(32) int32_t out[kMW * 16];
  alignas(32) int32_t part[kMW * 16];
  const int64_t astep = g.sW * c.Cp, row_steps = p.K / nrows;
  // the widest tile of the kernel: 6 pixels (12 accumulators, every ymm register), 5 for
  // maddubs1 (whose ones take a register)
  const int widest = p.kind == Avx2Kind::Maddubs1 ? 5 : kMW;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t h = r % g.Ho, t = (r / g.Ho) % g.To, n = r / (g.Ho * g.To);
    const uint8_t* base = c.row_base(n, t, h);
    if (p.kind == Avx2Kind::Madd16) {
      for (int64_t kt = 0; kt < g.kT; ++kt)
        for (int64_t kh = 0; kh < g.kH; ++kh)
          rows[kt * g.kH + kh] = base + (kt * g.dT * c.Hp + kh * g.dH) * rowlen;
      widen_rows(rows.data(), nrows, rowlen, s16.data());
    }
    int64_t kt0, kt1, kh0, kh1;
    valid_taps(t, g.sT, g.dT, g.pT, g.T, g.kT, kt0, kt1);
    valid_taps(h, g.sH, g.dH, g.pH, g.H, g.kH, kh0, kh1);
    const bool whole = kt0 == 0 && kt1 == g.kT && kh0 == 0 && kh1 == g.kH;
    Epi E = c.E;
    if (!whole) {
      runs.clear();
      for (int64_t kt = kt0; kh1 > kh0 && kt < kt1; ++kt)
        runs.emplace_back((kt * g.kH + kh0) * row_steps, (kh1 - kh0) * row_steps);
      c.row_comp(kt0, kt1, kh0, kh1, 0, g.Co, comp.data());
      E.comp = comp.data();
    }
    for (int64_t co0 = 0; co0 < g.Co;) {
      const int64_t nco = std::min<int64_t>(16, g.Co - co0);
      for (int64_t w0 = 0; w0 < g.Wo;) {
        const int M = tile_pixels(g.Wo, w0, widest);
        const uint8_t* p8[kMW];
        const uint16_t* p16[kMW];
        for (int m = 0; m < kMW; ++m) {
          const int64_t off = (w0 + std::min(m, M - 1)) * astep;
          p8[m] = base + off;
          p16[m] = s16.data() + off;
        }
        // steps [s0, s0 + K) of this tile into dst
        const auto walk = [&](int64_t s0, int64_t K, int32_t* dst) {
          const int64_t* ao = p.aoff.data() + s0;
          const int8_t* w8 = static_cast<const int8_t*>(p.w) + co0 * p.K * 4 + s0 * p.wstride;
          switch (p.kind) {
            case Avx2Kind::Maddubs:
            case Avx2Kind::Maddubs1:
              tile_u8(p.kind == Avx2Kind::Maddubs1, M, p8, ao, K, std::min(p.L, K), w8,
                      p.wstride, dst);
              break;
            case Avx2Kind::AvxVnni:
              tile_vex(M, p8, ao, K, w8, p.wstride, dst);
              break;
            case Avx2Kind::Madd16:
              (M == 6   ? tile_madd16<6>
               : M == 5 ? tile_madd16<5>
               : M > 2  ? tile_madd16<4>
                        : tile_madd16<2>)(p16, ao, K,
                                          static_cast<const int16_t*>(p.w) + co0 * p.K * 2 +
                                              s0 * p.wstride,
                                          p.wstride, dst);
              break;
          }
        };
        if (whole) {
          walk(0, p.K, out);
        } else {
          std::fill(out, out + kMW * 16, 0);
          for (const auto& [s0, ns] : runs) {
            walk(s0, ns, part);
            for (int j = 0; j < M * 16; ++j) out[j] += part[j];
          }
        }
        epi_avx2(E, out, 16, M, co0, nco, g.Co, c.y, c.out_pixel(n, t, h, w0));
        w0 += M;
      }
      co0 += 16;
    }
  }
}

// Winograd F(2x2, 3x3) (see the driver): per output tile row (frames fastest: WinoRows), its
// kT transformed input rows, then per block of 16 channels the 16 positions' GEMMs on
// vpmaddubsw tiles, their sums kept in mb [16][Wt + 2][16] (a 4- or 2-pixel tile narrower than
// its kind writes past its pixels); then the output transform y = (A^T m A - corr) / 4 of each
// tile into two output rows [2 Wt][16] each, and their epilogue.
void wino_rows_avx2(const Ctx& c, const WinoPlan& p, int64_t r0, int64_t r1) {
  const ConvGeom& g = c.g;
  const int64_t Wt = p.Wt, ws = Wt + 2;
  static thread_local avec<int32_t> mb, yb;
  if (mb.size() < static_cast<size_t>(16 * ws * 16)) mb.resize(16 * ws * 16);
  if (yb.size() < static_cast<size_t>(4 * Wt * 16)) yb.resize(4 * Wt * 16);
  int32_t* const y0 = yb.data();
  int32_t* const y1 = yb.data() + 2 * Wt * 16;
  const bool one = !p.avx_vnni && p.L < 2;  // maddubs1: tiles of up to 5 pixels
  const int widest = one ? 5 : kMW;
  std::vector<int64_t> aoff(static_cast<size_t>(p.K));
  WinoRows rows(p);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = r % g.To, ht = (r / g.To) % p.Ht, n = r / (g.To * p.Ht);
    const uint8_t* base = rows.window(g, p, wino_row_avx2, n, t, ht, aoff.data());
    for (int64_t co0 = 0; co0 < g.Co; co0 += 16) {
      const int64_t nco = std::min<int64_t>(16, g.Co - co0);
      for (int xi = 0; xi < 16; ++xi) {
        const uint8_t* bx = base + xi * Wt * p.Cp;
        const int8_t* w8 = reinterpret_cast<const int8_t*>(p.w + xi * p.wxi) + co0 * p.K * 4;
        for (int64_t w0 = 0; w0 < Wt;) {
          const int M = tile_pixels(Wt, w0, widest);
          const uint8_t* p8[kMW];
          for (int m = 0; m < kMW; ++m) p8[m] = bx + (w0 + std::min(m, M - 1)) * p.Cp;
          int32_t* dst = mb.data() + (xi * ws + w0) * 16;
          if (p.avx_vnni) tile_vex(M, p8, aoff.data(), p.K, w8, 64, dst);
          else tile_u8(one, M, p8, aoff.data(), p.K, p.L, w8, 64, dst);
          w0 += M;
        }
      }
      wino_out_avx2(mb.data(), ws, Wt, p.corr + co0, c.Coutp, y0, y1);
      epi_avx2(c.E, y0, 16, static_cast<int>(g.Wo), co0, nco, g.Co, c.y,
               c.out_pixel(n, t, 2 * ht, 0));
      if (2 * ht + 1 < g.Ho)
        epi_avx2(c.E, y1, 16, static_cast<int>(g.Wo), co0, nco, g.Co, c.y,
                 c.out_pixel(n, t, 2 * ht + 1, 0));
    }
  }
}

}  // namespace packed_cpu
}  // namespace qgait
