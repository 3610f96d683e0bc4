// CUDA packed low-bit Conv3d (the math is in qgait/ops/packed_conv3d.py). No torch headers.
//
// 1. pack_input: the input becomes a zero-padded channels-last int8 buffer
//    [N, T + 2pT, H + 2pH, W + 2pW, Cp] of a = x_int - zp, where zp = 128 for an unsigned grid
//    (codes 0..255 do not fit int8) and 0 for a signed one; a float input is quantized here:
//    x_int = rint(clamp(x * fp32(1/s), qn, qp)). Padding (and a channel tail) hold a = -zp, the
//    code of x = 0. Threads walk the input in its own fastest dimension (W for NCDHW, channels
//    for channels-last), so that a warp's reads are coalesced.
// 2. conv_igemm: implicit GEMM, rows = output pixels, columns = output channels. A block of
//    64 x 64 outputs per 256 threads (4 x 4 each); a and w tiles go through shared memory as
//    int32 words of 4 int8 and meet in __dp4a (exact int32). int4 weights are read packed (two
//    per byte, low nibble = even channel) and unpacked on their way into shared memory.
//    The reduction runs over one of two layouts of K:
//     * wide (C > kNarrowC): (tap, 32-channel block), Cp = C rounded up to 32: each A word is
//       4 consecutive channels of one tap, one aligned 32-bit load;
//     * narrow (C <= kNarrowC, e.g. the 1-channel silhouette stem): K = taps * C flattened and
//       rounded up to 32 once, Cp = C: no per-tap channel padding, which for C = 1 would be 32x
//       the work and the scratch (~200 MB for [64, 1, 30, 64, 44]); A bytes are gathered.
//    The zero-point correction comp[co] = zp * sum(w_int[co]) (acc = sum(a * w) + comp is the
//    exact accumulator of the codes) is summed from the weights the block loads anyway.
// The epilogue uses __fmul_rn / __fadd_rn (never contracted into FMAs, IEEE rounding) and
// __frcp_rn for 1/s, so it rounds like the fp32 reference; denormal results flush to zero under
// --use_fast_math. Scales are checked on the device (finite, > 0; no host sync): the first
// thread to find a bad one reports it and trips a device-side assert.
#include <cassert>  // __assert_fail (device-side assert that survives NDEBUG)
#include <cfloat>
#include <cstdio>

#include "cuda/launch.cuh"
#include "cuda/packed_conv3d.cuh"

namespace qgait {
namespace {

constexpr int kBM = 64, kBN = 64, kBKW = 8;  // tile rows, columns, int32 words of K per step
constexpr int kBK = 4 * kBKW;                // int8 values of K per step
constexpr int kThreads = 256;
constexpr int kNarrowC = 16;  // up to here, padding C to 32 per tap costs >= 2x: narrow layout
#ifndef QGAIT_EMU_SMALL_GRID
constexpr int kPackMaxBlocks = 65535 * 8;
#else  // emulation: grid-stride rounds on small tensors
constexpr int kPackMaxBlocks = 2;
#endif

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

struct Padded {
  int Tp, Hp, Wp, Cp;
  bool narrow;
};

inline Padded padded_dims(const PackedConvParams& p) {
  const bool narrow = p.C <= kNarrowC;
  return {p.T + 2 * p.pT, p.H + 2 * p.pH, p.W + 2 * p.pW, narrow ? p.C : round_up(p.C, kBK),
          narrow};
}

// ---- scale checks ---------------------------------------------------------------------------
__device__ int g_bad_scale_reported = 0;  // one report per process (the assert ends the context)

__device__ __forceinline__ float checked_scale(const float* s, int i, const char* name) {
  const float v = s[i];
  if (!(v > 0.f && v <= FLT_MAX) && atomicCAS(&g_bad_scale_reported, 0, 1) == 0) {
    printf("qgait::packed_conv3d: %s[%d] = %g; every scale must be finite and > 0\n", name, i, v);
    __assert_fail("qgait::packed_conv3d: scales must be finite and > 0", __FILE__, __LINE__,
                  __func__);
  }
  return v;
}

__device__ __forceinline__ int quantize(float v, float r, float qn, float qp) {
  v = __fmul_rn(v, r);
  v = fminf(fmaxf(v, qn), qp);  // fmaxf(NaN, qn) = qn
  return __float2int_rn(v);     // round half to even
}

__device__ __forceinline__ int code_at(const PackedConvParams& p, int64_t off, float r) {
  if (p.x_dtype == kInF32)
    return quantize(static_cast<const float*>(p.x)[off], r, float(p.in_qn), float(p.in_qp));
  if (p.x_dtype == kInS8) return static_cast<const int8_t*>(p.x)[off];
  return static_cast<const uint8_t*>(p.x)[off];
}

// One unit u of the padded buffer: a word of 4 channels (wide) or one channel byte (narrow),
// `per` units per pixel. `w_fast`: consecutive units walk W first (an NCDHW-like input, whose
// W is contiguous), else the channel units of a pixel first (channels-last input).
__global__ void pack_input(PackedConvParams p, Padded d, int zp, bool w_fast, int8_t* xb) {
  const int per = d.narrow ? d.Cp : d.Cp / 4;
  const int64_t total = int64_t(p.N) * d.Tp * d.Hp * d.Wp * per;
  const float r = p.x_dtype == kInF32 ? __frcp_rn(checked_scale(p.x_scale, 0, "x_scale")) : 1.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int u, wp;
    int64_t rest;
    if (w_fast) {  // i = ((n, t, h), u, w)
      wp = int(i % d.Wp);
      u = int((i / d.Wp) % per);
      rest = i / (int64_t(d.Wp) * per);
    } else {  // i = ((n, t, h), w, u)
      u = int(i % per);
      wp = int((i / per) % d.Wp);
      rest = i / (int64_t(d.Wp) * per);
    }
    const int w = wp - p.pW;
    const int h = int(rest % d.Hp) - p.pH;
    rest /= d.Hp;
    const int t = int(rest % d.Tp) - p.pT;
    const int n = int(rest / d.Tp);
    const bool inside = t >= 0 && t < p.T && h >= 0 && h < p.H && w >= 0 && w < p.W;
    const int64_t pix = ((int64_t(n) * d.Tp + t + p.pT) * d.Hp + h + p.pH) * d.Wp + wp;
    const int64_t base = n * p.sx[0] + t * p.sx[2] + h * p.sx[3] + w * p.sx[4];
    if (d.narrow) {
      const int code = inside ? code_at(p, base + u * p.sx[1], r) : 0;
      xb[pix * d.Cp + u] = int8_t(code - zp);
    } else {
      uint32_t word = 0;
      for (int j = 0; j < 4; ++j) {
        const int c = u * 4 + j;
        const int code = inside && c < p.C ? code_at(p, base + c * p.sx[1], r) : 0;
        word |= uint32_t(uint8_t(int8_t(code - zp))) << (8 * j);
      }
      reinterpret_cast<uint32_t*>(xb)[pix * per + u] = word;
    }
  }
}

__device__ __forceinline__ int weight_at(const PackedConvParams& p, int co, int tap, int c,
                                         int taps) {
  if (p.w_bits == 8) return static_cast<const int8_t*>(static_cast<const void*>(p.w))[
      (int64_t(co) * taps + tap) * p.C + c];
  const int cb = (p.C + 1) / 2;
  const uint8_t byte = p.w[(int64_t(co) * taps + tap) * cb + (c >> 1)];
  const int nib = (c & 1) ? (byte >> 4) : (byte & 0xF);
  return (nib ^ 8) - 8;  // sign-extend the 4-bit two's complement
}

// Element offset of tap `tap` in the padded buffer, relative to its output pixel's corner.
__device__ __forceinline__ int64_t tap_offset(const PackedConvParams& p, const Padded& d,
                                              int tap) {
  const int kw = tap % p.kW, kh = (tap / p.kW) % p.kH, kt = tap / (p.kW * p.kH);
  return ((int64_t(kt) * p.dT * d.Hp + kh * p.dH) * d.Wp + kw * p.dW) * d.Cp;
}

template <bool NARROW>
__global__ void __launch_bounds__(kThreads)
conv_igemm(PackedConvParams p, Padded d, int zp, const int8_t* __restrict__ xb) {
  __shared__ int32_t As[kBM][kBKW + 1];  // +1: no bank conflicts on the column reads
  __shared__ int32_t Bs[kBN][kBKW + 1];
  __shared__ int32_t Wsum[kBN][4];       // per (column, channel group): sum of its weights
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t M = int64_t(p.N) * p.To * p.Ho * p.Wo;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;
  const int taps = p.kT * p.kH * p.kW;

  // rows this thread loads into As: tid / 8 and tid / 8 + 32, word tid % 8
  int64_t abase[2];
  bool aok[2];
  for (int r = 0; r < 2; ++r) {
    const int64_t m = m0 + tid / kBKW + r * 32;
    aok[r] = m < M;
    const int64_t mm = aok[r] ? m : 0;
    const int wo = int(mm % p.Wo), ho = int((mm / p.Wo) % p.Ho);
    const int to = int((mm / (int64_t(p.Wo) * p.Ho)) % p.To);
    const int n = int(mm / (int64_t(p.Wo) * p.Ho * p.To));
    abase[r] = ((((int64_t(n) * d.Tp + to * p.sT) * d.Hp + ho * p.sH) * d.Wp + wo * p.sW) * d.Cp);
  }
  // the B slot of this thread: channel group of 8 (tid % 4) of output channel n0 + tid / 4
  const int bco = n0 + tid / 4, bgrp = tid % 4;
  int wsum = 0;

  // K steps: wide, (tap, 32-channel block); narrow, 32 values of the flattened (tap, c)
  const int ksteps = NARROW ? (taps * p.C + kBK - 1) / kBK : taps * (d.Cp / kBK);
  int acc[4][4] = {};
  for (int ks = 0; ks < ksteps; ++ks) {
    int tap = 0, cb = 0;
    int64_t toff = 0;
    if (!NARROW) {
      tap = ks / (d.Cp / kBK);
      cb = (ks % (d.Cp / kBK)) * kBK;
      toff = tap_offset(p, d, tap);
    }
    for (int r = 0; r < 2; ++r) {
      int32_t word = 0;
      if (aok[r]) {
        if (!NARROW) {
          word = *reinterpret_cast<const int32_t*>(xb + abase[r] + toff + cb + 4 * (tid % kBKW));
        } else {
          uint32_t u = 0;
          for (int b = 0; b < 4; ++b) {
            const int k = ks * kBK + 4 * (tid % kBKW) + b;  // (tap, c) flattened
            if (k < taps * p.C) {
              const int kt = k / p.C;
              u |= uint32_t(uint8_t(xb[abase[r] + tap_offset(p, d, kt) + (k - kt * p.C)]))
                   << (8 * b);
            }
          }
          word = int32_t(u);
        }
      }
      As[tid / kBKW + r * 32][tid % kBKW] = word;
    }
    uint32_t lo = 0, hi = 0;
    if (bco < p.Co) {
      for (int j = 0; j < 8; ++j) {
        int v = 0;
        if (!NARROW) {
          const int c = cb + bgrp * 8 + j;
          v = c < p.C ? weight_at(p, bco, tap, c, taps) : 0;
        } else {
          const int k = ks * kBK + bgrp * 8 + j;
          if (k < taps * p.C) v = weight_at(p, bco, k / p.C, k % p.C, taps);
        }
        wsum += v;
        const uint32_t b = uint32_t(uint8_t(int8_t(v))) << (8 * (j & 3));
        if (j < 4) lo |= b;
        else hi |= b;
      }
    }
    Bs[tid / 4][bgrp * 2] = int32_t(lo);
    Bs[tid / 4][bgrp * 2 + 1] = int32_t(hi);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBKW; ++kk) {
      int a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = As[ty * 4 + i][kk];
        b[i] = Bs[tx * 4 + i][kk];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  Wsum[tid / 4][bgrp] = wsum;
  __syncthreads();

  const float xs = checked_scale(p.x_scale, 0, "x_scale");
  float ws[4];
  int comp[4];
  for (int j = 0; j < 4; ++j) {
    const int co = n0 + tx * 4 + j;
    const int c = tx * 4 + j;
    comp[j] = zp * (Wsum[c][0] + Wsum[c][1] + Wsum[c][2] + Wsum[c][3]);
    ws[j] = co < p.Co ? checked_scale(p.w_scale, co, "w_scale") : 1.f;
  }
  const float r_out = p.out_mode == 1 ? __frcp_rn(checked_scale(p.out_scale, 0, "out_scale")) : 1.f;
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
    for (int j = 0; j < 4; ++j) {
      const int co = n0 + tx * 4 + j;
      if (co >= p.Co) continue;
      const int32_t a = acc[i][j] + comp[j];
      const int64_t idx = m * p.Co + co;
      if (p.out_mode == 2) {
        static_cast<int32_t*>(p.y)[idx] = a;
        continue;
      }
      float z = __fmul_rn(float(a), __fmul_rn(xs, ws[j]));
      z = __fadd_rn(z, p.bias ? p.bias[co] : 0.f);
      if (p.bn_scale) z = __fadd_rn(__fmul_rn(z, p.bn_scale[co]), p.bn_shift[co]);
      if (p.act == 1) z = z < 0.f ? 0.f : z;
      else if (p.act == 2) z = z < 0.f ? __fmul_rn(z, p.slope) : z;
      if (p.out_mode == 0) {
        static_cast<float*>(p.y)[idx] = z;
      } else {
        const int q = quantize(z, r_out, float(p.out_qn), float(p.out_qp));
        if (p.out_qn < 0) static_cast<int8_t*>(p.y)[idx] = int8_t(q);
        else static_cast<uint8_t*>(p.y)[idx] = uint8_t(q);
      }
    }
  }
}

}  // namespace

size_t packed_conv3d_scratch_bytes(const PackedConvParams& p) {
  const Padded d = padded_dims(p);
  return size_t(p.N) * d.Tp * d.Hp * d.Wp * d.Cp;
}

cudaError_t packed_conv3d_launch(const PackedConvParams& p, cudaStream_t stream) {
  const Padded d = padded_dims(p);
  const int zp = p.in_qn >= 0 ? 128 : 0;
  int8_t* xb = static_cast<int8_t*>(p.scratch);
  const int64_t units = int64_t(packed_conv3d_scratch_bytes(p) / (d.narrow ? 1 : 4));
  const int64_t want = (units + 255) / 256;
  const int blocks = int(want < kPackMaxBlocks ? want : kPackMaxBlocks);
  // Walk W first unless the channels are the input's fastest dimension (channels-last).
  const bool w_fast = !(p.sx[1] == 1 && p.C > 1);
  QGAIT_LAUNCH(blocks > 0 ? blocks : 1, 256, 0, stream, pack_input)(p, d, zp, w_fast, xb);
  const int64_t M = int64_t(p.N) * p.To * p.Ho * p.Wo;
  const dim3 grid(unsigned((M + kBM - 1) / kBM), unsigned((p.Co + kBN - 1) / kBN));
  if (grid.y > 65535) return cudaErrorInvalidValue;  // C_out > 4 M: not a conv layer
  if (d.narrow) QGAIT_LAUNCH(grid, kThreads, 0, stream, conv_igemm<true>)(p, d, zp, xb);
  else QGAIT_LAUNCH(grid, kThreads, 0, stream, conv_igemm<false>)(p, d, zp, xb);
  return cudaGetLastError();
}

}  // namespace qgait
