// CPU packed_conv3d, AVX-512 + VNNI: the vpdpbusd tiles (6 output pixels x 64 output channels
// in 24 zmm accumulators), their epilogue and input quantization. The driver and the
// arithmetic shared by every path: packed_conv3d.cpp.

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/packed_conv3d_kernels.h"

// ---- avx512 + VNNI path ---------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")
namespace qgait {
namespace packed_cpu {
namespace {

constexpr int kM = 6;    // output pixels per tile of 3 or 4 channel blocks
constexpr int kMW = 12;  // output pixels per tile of 1 or 2 channel blocks (the wide tiles)

inline __m512i bcast32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// The tile's reduction is one walk over steps (taps x groups of 4 input channels): step s
// broadcasts the 4 codes at aoff[s] of each pixel's window and runs vpdpbusd against the
// tile's weights at wv + s * wstride (wv: [taps][Cp/4][gw][4] int8, so consecutive steps'
// weights lie wstride = gw * 4 bytes apart, across taps too; gw = the group's 64 channels in
// items_vnni, Coutp on the Winograd path).
//
// The common tiles (5-6 pixels x 1, 2 or 4 blocks of 16 channels) are written as asm, the
// accumulators in zmm0-23 for the whole walk: g++ 12 compiled the intrinsics loop, nested
// over taps, with the accumulators moved between registers and the stack at every tap (about
// 70 moves per tap, against 4 x 24 vpdpbusd per tap for 16 input channels), and flattened
// over the steps, at every step (an asm statement per step would need more than the 30
// operands g++ allows). zmm27: a pixel's broadcast codes; zmm28-31: the step's weights;
// r10 / r11: the window of pixels 0 and 3 (pixel m at r10 + m * astep, m < 3, else r11 +
// (m - 3) * astep); the wide tiles (7-12 pixels x 1 or 2 blocks) add r12 / r13 for pixels 6
// and 9. With 2 blocks, 6 pixels were 12 accumulators and 8 loads for 12 vpdpbusd per step:
// GaitLite3D's 32-channel layers ran at 59-67% of the vpdpbusd peak, its 64- and 128-channel
// ones at 72-77%.
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
#define QV_P6 "(%%r12)"
#define QV_P7 "(%%r12,%[as])"
#define QV_P8 "(%%r12,%[as],2)"
#define QV_P9 "(%%r13)"
#define QV_P10 "(%%r13,%[as])"
#define QV_P11 "(%%r13,%[as],2)"
// (pixel, its address, its accumulators) for each tile shape: NB blocks x M pixels
#define QV_T4_5(F) F(0, QV_P0, 0, 1, 2, 3) F(1, QV_P1, 4, 5, 6, 7) F(2, QV_P2, 8, 9, 10, 11) \
  F(3, QV_P3, 12, 13, 14, 15) F(4, QV_P4, 16, 17, 18, 19)
#define QV_T4_6(F) QV_T4_5(F) F(5, QV_P5, 20, 21, 22, 23)
#define QV_T2_5(F) F(0, QV_P0, 0, 1) F(1, QV_P1, 2, 3) F(2, QV_P2, 4, 5) F(3, QV_P3, 6, 7) \
  F(4, QV_P4, 8, 9)
#define QV_T2_6(F) QV_T2_5(F) F(5, QV_P5, 10, 11)
#define QV_T1_5(F) F(0, QV_P0, 0) F(1, QV_P1, 1) F(2, QV_P2, 2) F(3, QV_P3, 3) F(4, QV_P4, 4)
#define QV_T1_6(F) QV_T1_5(F) F(5, QV_P5, 5)
#define QV_T2_7(F) QV_T2_6(F) F(6, QV_P6, 12, 13)
#define QV_T2_8(F) QV_T2_7(F) F(7, QV_P7, 14, 15)
#define QV_T2_9(F) QV_T2_8(F) F(8, QV_P8, 16, 17)
#define QV_T2_10(F) QV_T2_9(F) F(9, QV_P9, 18, 19)
#define QV_T2_11(F) QV_T2_10(F) F(10, QV_P10, 20, 21)
#define QV_T2_12(F) QV_T2_11(F) F(11, QV_P11, 22, 23)
#define QV_T1_7(F) QV_T1_6(F) F(6, QV_P6, 6)
#define QV_T1_8(F) QV_T1_7(F) F(7, QV_P7, 7)
#define QV_T1_9(F) QV_T1_8(F) F(8, QV_P8, 8)
#define QV_T1_10(F) QV_T1_9(F) F(9, QV_P9, 9)
#define QV_T1_11(F) QV_T1_10(F) F(10, QV_P10, 10)
#define QV_T1_12(F) QV_T1_11(F) F(11, QV_P11, 11)
#define QV_W_1 "vmovdqu64 (%[wk]), %%zmm28\n\t"
#define QV_W_2 QV_W_1 "vmovdqu64 64(%[wk]), %%zmm29\n\t"
#define QV_W_4 QV_W_2 "vmovdqu64 128(%[wk]), %%zmm30\n\t" "vmovdqu64 192(%[wk]), %%zmm31\n\t"
#define QV_R11 "lea (%%r10,%[as],2), %%r11\n\t" "add %[as], %%r11\n\t"
#define QV_R13 QV_R11 "lea (%%r11,%[as],2), %%r12\n\t" "add %[as], %%r12\n\t" \
  "lea (%%r12,%[as],2), %%r13\n\t" "add %[as], %%r13\n\t"
#define QV_WALK(T, NB, R)                                           \
  "1:\n\t"                                                          \
  "mov (%[ao]), %%r10\n\t"                                          \
  "add %[a], %%r10\n\t"                                             \
  R                                                                 \
  QV_W_##NB T(QV_PIX_##NB)                                          \
  "add $8, %[ao]\n\t"                                               \
  "add %[ws], %[wk]\n\t"                                            \
  "dec %[n]\n\t"                                                    \
  "jnz 1b\n\t"                                                      \
  T(QV_ST_##NB)
#define QV_CLOBBER                                                                        \
  "r10", "r11", "r12", "r13", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",     \
      "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15",      \
      "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm27",    \
      "xmm28", "xmm29", "xmm30", "xmm31", "cc", "memory"
#define QV_TILE(T, NB) QV_TILE_R(T, NB, QV_R11)
#define QV_TILE_R(T, NB, R)                                                               \
  if (init)                                                                               \
    asm volatile(T(QV_Z_##NB) QV_WALK(T, NB, R)                                           \
                 : [ao] "+r"(ao), [wk] "+r"(wk), [n] "+r"(n)                              \
                 : [a] "r"(a), [as] "r"(astep), [ws] "r"(wstride), [out] "r"(out)         \
                 : QV_CLOBBER);                                                           \
  else                                                                                    \
    asm volatile(T(QV_LD_##NB) QV_WALK(T, NB, R)                                          \
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
  } else if constexpr (NB == 2 && M == 12) {
    QV_TILE_R(QV_T2_12, 2, QV_R13);
  } else if constexpr (NB == 2 && M == 11) {
    QV_TILE_R(QV_T2_11, 2, QV_R13);
  } else if constexpr (NB == 2 && M == 10) {
    QV_TILE_R(QV_T2_10, 2, QV_R13);
  } else if constexpr (NB == 2 && M == 9) {
    QV_TILE_R(QV_T2_9, 2, QV_R13);
  } else if constexpr (NB == 2 && M == 8) {
    QV_TILE_R(QV_T2_8, 2, QV_R13);
  } else if constexpr (NB == 2 && M == 7) {
    QV_TILE_R(QV_T2_7, 2, QV_R13);
  } else if constexpr (NB == 1 && M == 12) {
    QV_TILE_R(QV_T1_12, 1, QV_R13);
  } else if constexpr (NB == 1 && M == 11) {
    QV_TILE_R(QV_T1_11, 1, QV_R13);
  } else if constexpr (NB == 1 && M == 10) {
    QV_TILE_R(QV_T1_10, 1, QV_R13);
  } else if constexpr (NB == 1 && M == 9) {
    QV_TILE_R(QV_T1_9, 1, QV_R13);
  } else if constexpr (NB == 1 && M == 8) {
    QV_TILE_R(QV_T1_8, 1, QV_R13);
  } else if constexpr (NB == 1 && M == 7) {
    QV_TILE_R(QV_T1_7, 1, QV_R13);
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

// The tile of NB blocks and M pixels: M in 1..6, or 1..12 (the wide tiles) for NB <= 2 (the
// widest for a larger M, which tile_width never gives).
template <int NB, int... Ms>
VnniFn vnni_pick(int M, std::integer_sequence<int, Ms...>) {
  VnniFn f = tile_vnni<NB, sizeof...(Ms)>;
  ((f = M == Ms + 1 ? tile_vnni<NB, Ms + 1> : f), ...);
  return f;
}

template <int NB>
VnniFn vnni_for(int M) {
  return vnni_pick<NB>(M, std::make_integer_sequence<int, NB <= 2 ? kMW : kM>{});
}

VnniFn vnni_fn(int NB, int M) {
  switch (NB) {
    case 1: return vnni_for<1>(M);
    case 2: return vnni_for<2>(M);
    case 3: return vnni_for<3>(M);
    default: return vnni_for<4>(M);
  }
}

// The epilogue of 16 channels from co (those in mask mk): the same fp32 operations as epi_one.
// Built once per channel block, then `store` per pixel. The mode, activation and BatchNorm
// switches are copied into the struct: read through E they were reloaded at every pixel (the
// stores to y may alias E as far as g++ knows).
struct Epi16 {
  const Epi& E;
  __mmask16 mk;
  int64_t mode, act;
  bool has_g;
  __m512i comp;
  __m512 m1, bias, g, beta, zero, slope, r, qn, qp;
  Epi16(const Epi& e, int64_t co, __mmask16 mask)
      : E(e), mk(mask), mode(e.mode), act(e.act), has_g(e.g != nullptr) {
    zero = _mm512_setzero_ps();
    slope = _mm512_set1_ps(E.slope);
    r = _mm512_set1_ps(E.r_out);
    qn = _mm512_set1_ps(E.qn);
    qp = _mm512_set1_ps(E.qp);
    comp = _mm512_maskz_loadu_epi32(mk, E.comp + co);
    m1 = _mm512_maskz_loadu_ps(mk, E.m1 + co);
    bias = _mm512_maskz_loadu_ps(mk, E.bias + co);
    g = beta = zero;
    if (E.g) {
      g = _mm512_maskz_loadu_ps(mk, E.g + co);
      beta = _mm512_maskz_loadu_ps(mk, E.beta + co);
    }
  }
  // acc: the accumulators before the zero-point correction; idx: y's element of channel co
  void store(__m512i acc, void* y, int64_t idx) const {
    const __m512i a = _mm512_sub_epi32(acc, comp);
    if (mode == kOutAcc) {
      _mm512_mask_storeu_epi32(static_cast<int32_t*>(y) + idx, mk, a);
      return;
    }
    __m512 z = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), m1), bias);
    if (has_g) z = _mm512_add_ps(_mm512_mul_ps(z, g), beta);
    if (act != kActNone) {
      const __mmask16 neg = _mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ);
      z = act == kActRelu ? _mm512_mask_mov_ps(z, neg, zero)
                          : _mm512_mask_mul_ps(z, neg, z, slope);
    }
    if (mode == kOutFloat) {
      _mm512_mask_storeu_ps(static_cast<float*>(y) + idx, mk, z);
      return;
    }
    __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(z, r), qn), qp);
    // rounded to nearest even in the conversion itself (a separate vrndscaleps was one op in
    // 15); values are inside the 8-bit grid, so keeping the low byte is exact for int8 and
    // uint8. Narrowed in a register, then stored: the empty asm keeps g++ from fusing the two
    // into vpmovdb to memory (40% of the epilogue's samples on Zen 4 under perf, a quarter of
    // its time on Zen 5)
    const __m512i q = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m128i b = _mm512_cvtepi32_epi8(q);
    asm("" : "+v"(b));
    _mm_mask_storeu_epi8(static_cast<uint8_t*>(y) + idx, mk, b);
  }
};

inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// Vectorized epilogue for M pixels x nco channels (acc rows of 64), 16 channels at a time.
void epi_avx512(const Epi& E, const int32_t* acc, int64_t M, int64_t co0, int64_t nco, int64_t Co,
                void* y, int64_t pix) {
  for (int64_t j = 0; j < nco; j += 16) {
    const Epi16 e(E, co0 + j, mask16(nco - j));
    for (int64_t m = 0; m < M; ++m)
      e.store(_mm512_loadu_si512(acc + m * 64 + j), y, (pix + m) * Co + co0 + j);
  }
}

}  // namespace

void epi_rows_avx512(const Epi& E, const int32_t* acc, int64_t ld, const int64_t* pix, int64_t M,
                     int64_t co0, int64_t nco, int64_t Co, void* y) {
  for (int64_t j = 0; j < nco; j += 16) {
    const Epi16 e(E, co0 + j, mask16(nco - j));
    for (int64_t m = 0; m < M; ++m)
      if (pix[m] >= 0) e.store(_mm512_loadu_si512(acc + m * ld + j), y, pix[m] * Co + co0 + j);
  }
}

namespace {

// Codes of 16 floats: rint(clamp(x * r, qn, qp)) + zp as int32 lanes (max(NaN, qn) = qn).
inline __m512i quant16(__m512 x, __m512 vr, __m512 vqn, __m512 vqp, __m512i vzp) {
  __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, vr), vqn), vqp);
  v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_add_epi32(_mm512_cvtps_epi32(v), vzp);
}

}  // namespace

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

namespace {

// Width of the tile starting at output pixel w0 of a row of Wo: the row is cut into
// ceil(Wo / maxM) tiles whose widths differ by at most one (44 -> 4 x 6 + 4 x 5 rather than
// 7 x 6 + 2): a narrow tile has too few accumulators to hide the vpdpbusd latency (a 2-pixel
// tail ran at half the speed of the others and took 9% of layer A's time).
inline int tile_width(int64_t Wo, int64_t w0, int64_t maxM = kM) {
  const int64_t ntiles = (Wo + maxM - 1) / maxM, base = Wo / ntiles, wide = Wo % ntiles;
  // the first `wide` tiles are base + 1 wide
  return static_cast<int>(w0 < wide * (base + 1) ? base + 1 : base);
}

}  // namespace

// Work item = (group of up to 64 output channels, output row), rows fastest: a thread's chunk
// of items is a run of rows of one group, whose weights ([steps][64][4], contiguous per group:
// interleave_weights with B = 64) stay in L1 from row to row. (Rows alternating between the
// groups of a 128-channel layer, on weights laid out [steps][128][4], read each group's from L2
// at every row, through
// half of L1's sets: GaitLite3D's 64 -> 128 layer ran at 68% of the vpdpbusd peak, 1 thread.)
// The taps are walked in blocks
// whose weights (taps x Cp x 64 bytes) fit in L1 next to the input rows; each block runs over
// the whole output row, whose partial sums wait in a row accumulator [Wo][64] (also in L1).
// Without the blocking every 6-pixel tile streams all weights of the layer (55-110 KB for the
// benchmark layers) from L2; on this (shared) machine the two orders measured the same.
// aoff: the input offset of each (tap, channel group) step, toff[t] + 4 k at t * kc / 4 + k.
//
// A row whose window reaches into the temporal or vertical padding skips the taps there (for
// a 3x3x3 layer on 30 frames of 32 rows, 4% of the multiply-adds): they would only add the
// padding's code times the weights, so the row's zero-point correction leaves those weights
// out instead (zp x the sums of its valid window rows, c.ktkh). The horizontal padding stays
// in the tiles, whose pixels share one walk.
void items_vnni(const Ctx& c, const uint8_t* wv, const int64_t* aoff, int64_t i0, int64_t i1) {
  const ConvGeom& g = c.g;
  const int64_t ntaps = static_cast<int64_t>(c.toff.size());
  const int64_t kws = ntaps / (g.kT * g.kH);  // taps per window row (1 with folded kW)
  const int64_t ksteps = c.kc / 4;
  const int64_t tap_bytes = ksteps * 4 * 64;  // weight bytes of one tap for 64 channels
  const int64_t tblock = std::max<int64_t>(1, std::min<int64_t>(ntaps, (24 << 10) / tap_bytes));
  const int64_t rows = g.N * g.To * g.Ho;
  avec<int32_t> rowacc(static_cast<size_t>(g.Wo * 64));
  avec<int32_t> comp(static_cast<size_t>(c.Coutp));
  std::vector<std::pair<int64_t, int64_t>> runs;  // (first tap, taps) of a row's walk
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t grp = i / rows, r = i % rows;
    const int64_t h = r % g.Ho, t = (r / g.Ho) % g.To, n = r / (g.Ho * g.To);
    const int64_t co0 = grp * 64, nco = std::min<int64_t>(64, g.Co - co0);
    const int NB = static_cast<int>((nco + 15) / 16);
    // this group's weights: [steps][gw][4], gw its channels rounded up to 16
    const int64_t gw = std::min<int64_t>(64, c.Coutp - co0), tstride = ksteps * gw * 4;
    const uint8_t* wg = wv + co0 * ntaps * ksteps * 4;
    const int64_t maxM = NB <= 2 ? kMW : kM;
    const uint8_t* base = c.row_base(n, t, h);
    int64_t kt0, kt1, kh0, kh1;
    valid_taps(t, g.sT, g.dT, g.pT, g.T, g.kT, kt0, kt1);
    valid_taps(h, g.sH, g.dH, g.pH, g.H, g.kH, kh0, kh1);
    const bool whole = kt0 == 0 && kt1 == g.kT && kh0 == 0 && kh1 == g.kH;
    runs.clear();
    if (whole) {
      for (int64_t tb = 0; tb < ntaps; tb += tblock)
        runs.emplace_back(tb, std::min(tblock, ntaps - tb));
    } else {
      for (int64_t kt = kt0; kt < kt1; ++kt) {
        const int64_t a = (kt * g.kH + kh0) * kws, b = (kt * g.kH + kh1) * kws;
        for (int64_t tb = a; tb < b; tb += tblock)
          runs.emplace_back(tb, std::min(tblock, b - tb));
      }
    }
    bool first = true;
    for (const auto& [tb, nt] : runs) {
      for (int64_t w0 = 0; w0 < g.Wo;) {
        const int M = tile_width(g.Wo, w0, maxM);
        vnni_fn(NB, M)(base + w0 * g.sW * c.Cp, g.sW * c.Cp, aoff + tb * ksteps,
                       nt * ksteps, wg + tb * tstride, gw * 4, rowacc.data() + w0 * 64, first);
        w0 += M;
      }
      first = false;
    }
    if (first) std::fill(rowacc.begin(), rowacc.end(), 0);  // the window is all padding
    Epi e = c.E;
    if (!whole) {
      c.row_comp(kt0, kt1, kh0, kh1, co0, nco, comp.data());
      e.comp = comp.data();
    }
    // the whole row at once: each 16-channel block's constants are loaded once per row, not
    // once per tile
    epi_avx512(e, rowacc.data(), g.Wo, co0, nco, g.Co, c.y, c.out_pixel(n, t, h, 0));
  }
}

namespace {

// V = B^T d B + off per tile position of one tile row (WinoRowFn), 64 bytes at a time: 64
// channels of a tile, or with 16 or 32 channels the same channels of 4 or 2 neighbouring tiles
// (whose V lie side by side in out; a tile's own 16 or 32 channels left 3/4 or 1/2 of each
// vector empty). In bytes, wrapping: every step is an addition or a subtraction, so arithmetic
// mod 256 gives each result exactly once it lies in [0, 255], which V + off does (see the
// driver), whatever the intermediate values.
void wino_row_avx512(const uint8_t* row, int64_t Wq, int64_t Wt, int64_t Cp, int off,
                     uint8_t* out) {
  const int64_t xs = Wt * Cp;
  const __m512i vo = _mm512_set1_epi8(static_cast<char>(off));
  const int P = Cp == 16 ? 4 : Cp == 32 ? 2 : 1;  // tiles per vector
  for (int64_t wt = 0; wt < Wt; wt += P) {
    const int64_t np = std::min<int64_t>(P, Wt - wt);  // tiles in this vector
    for (int64_t ch = 0; ch < Cp; ch += 64) {
      const int64_t nb = P > 1 ? np * Cp : std::min<int64_t>(64, Cp - ch);
      const __mmask64 mk = nb >= 64 ? ~__mmask64(0) : (__mmask64(1) << nb) - 1;
      // column s of window row i for the vector's tiles (tiles past the row repeat the last;
      // the store below drops them)
      const auto ld = [&](int64_t i, int64_t s) -> __m512i {
        const uint8_t* q = row + (i * Wq + 2 * wt + s) * Cp + ch;
        if (P == 1) return _mm512_maskz_loadu_epi8(mk, q);
        const auto at = [&](int64_t k) { return q + 2 * std::min(k, np - 1) * Cp; };
        if (P == 2)
          return _mm512_inserti64x4(
              _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at(0)))),
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at(1))), 1);
        const auto l128 = [&](int64_t k) {
          return _mm_loadu_si128(reinterpret_cast<const __m128i*>(at(k)));
        };
        __m512i x = _mm512_castsi128_si512(l128(0));
        x = _mm512_inserti32x4(x, l128(1), 1);
        x = _mm512_inserti32x4(x, l128(2), 2);
        return _mm512_inserti32x4(x, l128(3), 3);
      };
      __m512i a[4][4];  // B^T d
      for (int s = 0; s < 4; ++s) {
        const __m512i d0 = ld(0, s), d1 = ld(1, s), d2 = ld(2, s), d3 = ld(3, s);
        a[0][s] = _mm512_sub_epi8(d0, d2);
        a[1][s] = _mm512_add_epi8(d1, d2);
        a[2][s] = _mm512_sub_epi8(d2, d1);
        a[3][s] = _mm512_sub_epi8(d1, d3);
      }
      uint8_t* o = out + wt * Cp + ch;
      const auto st = [&](int xi, __m512i x, bool offset) {
        _mm512_mask_storeu_epi8(o + xi * xs, mk, offset ? _mm512_add_epi8(x, vo) : x);
      };
      for (int i = 0; i < 4; ++i) {
        st(4 * i, _mm512_sub_epi8(a[i][0], a[i][2]), true);
        st(4 * i + 1, _mm512_add_epi8(a[i][1], a[i][2]), i != 1);
        st(4 * i + 2, _mm512_sub_epi8(a[i][2], a[i][1]), true);
        st(4 * i + 3, _mm512_sub_epi8(a[i][1], a[i][3]), true);
      }
    }
  }
}

}  // namespace

// Winograd F(2x2, 3x3) (see the driver): per output tile row (frames fastest: WinoRows), its
// kT transformed input rows, then per group of 64 output channels and block of up to kM tiles
// the 16 positions' GEMMs on the tiles above, their sums kept in mb [16][kM][64] (in L1), then
// the output transform y = (A^T m A - corr) / 4 of each tile, straight into the epilogue.
void wino_items_vnni(const Ctx& c, const WinoPlan& p, int64_t i0, int64_t i1) {
  const ConvGeom& g = c.g;
  const int64_t Wt = p.Wt;
  alignas(64) int32_t mb[16 * kM * 64];
  std::vector<int64_t> aoff(static_cast<size_t>(p.K));
  WinoRows rows(p);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t t = i % g.To, ht = (i / g.To) % p.Ht, n = i / (g.To * p.Ht);
    const uint8_t* base = rows.window(g, p, wino_row_avx512, n, t, ht, aoff.data());
    const int64_t pix0 = c.out_pixel(n, t, 2 * ht, 0);
    const bool row1 = 2 * ht + 1 < g.Ho;
    for (int64_t co0 = 0; co0 < g.Co; co0 += 64) {
      const int64_t nco = std::min<int64_t>(64, g.Co - co0);
      const int NB = static_cast<int>((nco + 15) / 16);
      for (int64_t w0 = 0; w0 < Wt;) {
        const int M = tile_width(Wt, w0);
        for (int xi = 0; xi < 16; ++xi)
          vnni_fn(NB, M)(base + (xi * Wt + w0) * p.Cp, p.Cp, aoff.data(), p.K,
                         p.w + xi * p.wxi + co0 * 4, c.Coutp * 4, mb + xi * kM * 64, true);
        for (int64_t j = 0; j < nco; j += 16) {
          const Epi16 e(c.E, co0 + j, mask16(nco - j));
          const int32_t* cr = p.corr + co0 + j;
          const __m512i k00 = _mm512_loadu_si512(cr), k01 = _mm512_loadu_si512(cr + c.Coutp);
          const __m512i k10 = _mm512_loadu_si512(cr + 2 * c.Coutp);
          const __m512i k11 = _mm512_loadu_si512(cr + 3 * c.Coutp);
          for (int m = 0; m < M; ++m) {
            const int32_t* mm = mb + m * 64 + j;
            const auto ld = [&](int xi) { return _mm512_load_si512(mm + xi * kM * 64); };
            __m512i a[4], b[4];  // A^T m: rows 0 and 1, per column s
            for (int s = 0; s < 4; ++s) {
              const __m512i m1 = ld(4 + s), m2 = ld(8 + s);
              a[s] = _mm512_add_epi32(_mm512_add_epi32(ld(s), m1), m2);
              b[s] = _mm512_sub_epi32(_mm512_sub_epi32(m1, m2), ld(12 + s));
            }
            const auto fin = [](__m512i v, __m512i k) {
              return _mm512_srai_epi32(_mm512_sub_epi32(v, k), 2);
            };
            const int64_t w = 2 * (w0 + m), idx = (pix0 + w) * g.Co + co0 + j;
            const bool col1 = w + 1 < g.Wo;
            e.store(fin(_mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), a[2]), k00), c.y, idx);
            if (col1)
              e.store(fin(_mm512_sub_epi32(_mm512_sub_epi32(a[1], a[2]), a[3]), k01), c.y,
                      idx + g.Co);
            if (!row1) continue;
            const int64_t idx1 = idx + g.Wo * g.Co;
            e.store(fin(_mm512_add_epi32(_mm512_add_epi32(b[0], b[1]), b[2]), k10), c.y, idx1);
            if (col1)
              e.store(fin(_mm512_sub_epi32(_mm512_sub_epi32(b[1], b[2]), b[3]), k11), c.y,
                      idx1 + g.Co);
          }
        }
        w0 += M;
      }
    }
  }
}

}  // namespace packed_cpu
}  // namespace qgait
#pragma GCC pop_options
