// CUDA packed low-bit Conv3d (the math is in qgait/ops/packed_conv3d.py). No torch headers.
//
// 1. pack_input: the input becomes a zero-padded channels-last int8 buffer
//    [N, T + 2pT, H + 2pH, W + 2pW, Cp] (Cp = C rounded up to 32) of a = x_int - zp, where
//    zp = 128 for an unsigned grid (codes 0..255 do not fit int8) and 0 for a signed one; a
//    float input is quantized here: x_int = rint(clamp(x * fp32(1/s), qn, qp)). Padding and the
//    channel tail hold a = -zp, the code of x = 0.
// 2. zero_point_sums: comp[co] = zp * sum(w_int[co]), so that acc = sum(a * w) + comp[co] is the
//    exact accumulator of the codes.
// 3. conv_igemm: implicit GEMM, rows = output pixels, columns = output channels, reduction =
//    (tap, 32-channel block). A block of 64 x 64 outputs per 256 threads (4 x 4 each); a and w
//    tiles go through shared memory as int32 words of 4 int8 and meet in __dp4a (exact int32).
//    int4 weights are read packed (two per byte, low nibble = even channel) and unpacked on
//    their way into shared memory.
// The epilogue uses __fmul_rn / __fadd_rn (never contracted into FMAs, IEEE rounding) and
// __frcp_rn for 1/s, so it rounds like the fp32 reference; denormal results flush to zero under
// --use_fast_math.
#include "cuda/launch.cuh"
#include "cuda/packed_conv3d.cuh"

namespace qgait {
namespace {

constexpr int kBM = 64, kBN = 64, kBKW = 8;  // tile rows, columns, int32 words of K per step
constexpr int kThreads = 256;
#ifndef QGAIT_EMU_SMALL_GRID
constexpr int kPackMaxBlocks = 65535 * 8;
#else  // emulation: grid-stride rounds on small tensors
constexpr int kPackMaxBlocks = 2;
#endif

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

struct Padded {
  int Tp, Hp, Wp, Cp;
};

inline Padded padded_dims(const PackedConvParams& p) {
  return {p.T + 2 * p.pT, p.H + 2 * p.pH, p.W + 2 * p.pW, round_up(p.C, 4 * kBKW)};
}

__device__ __forceinline__ int quantize(float v, float r, float qn, float qp) {
  v = __fmul_rn(v, r);
  v = fminf(fmaxf(v, qn), qp);  // fmaxf(NaN, qn) = qn
  return __float2int_rn(v);     // round half to even
}

__global__ void pack_input(PackedConvParams p, Padded d, int zp, int8_t* xb) {
  const int cw = d.Cp / 4;
  const int64_t total = int64_t(p.N) * d.Tp * d.Hp * d.Wp * cw;
  const float r = p.x_dtype == kInF32 ? __frcp_rn(*p.x_scale) : 1.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int w4 = int(i % cw);
    int64_t pix = i / cw;
    const int w = int(pix % d.Wp) - p.pW;
    pix /= d.Wp;
    const int h = int(pix % d.Hp) - p.pH;
    pix /= d.Hp;
    const int t = int(pix % d.Tp) - p.pT;
    const int n = int(pix / d.Tp);
    const bool inside = t >= 0 && t < p.T && h >= 0 && h < p.H && w >= 0 && w < p.W;
    uint32_t word = 0;
    for (int j = 0; j < 4; ++j) {
      const int c = w4 * 4 + j;
      int code = 0;
      if (inside && c < p.C) {
        const int64_t off = n * p.sx[0] + c * p.sx[1] + t * p.sx[2] + h * p.sx[3] + w * p.sx[4];
        if (p.x_dtype == kInF32)
          code = quantize(static_cast<const float*>(p.x)[off], r, float(p.in_qn), float(p.in_qp));
        else if (p.x_dtype == kInS8)
          code = static_cast<const int8_t*>(p.x)[off];
        else
          code = static_cast<const uint8_t*>(p.x)[off];
      }
      word |= uint32_t(uint8_t(int8_t(code - zp))) << (8 * j);
    }
    reinterpret_cast<uint32_t*>(xb)[i] = word;
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

__global__ void zero_point_sums(PackedConvParams p, int zp, int32_t* comp) {
  const int co = blockIdx.x * blockDim.x + threadIdx.x;
  if (co >= p.Co) return;
  const int taps = p.kT * p.kH * p.kW;
  int32_t s = 0;
  for (int tap = 0; tap < taps; ++tap)
    for (int c = 0; c < p.C; ++c) s += weight_at(p, co, tap, c, taps);
  comp[co] = zp * s;
}

__global__ void __launch_bounds__(kThreads)
conv_igemm(PackedConvParams p, Padded d, const int8_t* __restrict__ xb,
           const int32_t* __restrict__ comp) {
  __shared__ int32_t As[kBM][kBKW + 1];  // +1: no bank conflicts on the column reads
  __shared__ int32_t Bs[kBN][kBKW + 1];
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

  int acc[4][4] = {};
  for (int tap = 0; tap < taps; ++tap) {
    const int kw = tap % p.kW, kh = (tap / p.kW) % p.kH, kt = tap / (p.kW * p.kH);
    const int64_t toff = ((int64_t(kt) * p.dT * d.Hp + kh * p.dH) * d.Wp + kw * p.dW) * d.Cp;
    for (int cb = 0; cb < d.Cp; cb += 4 * kBKW) {
      for (int r = 0; r < 2; ++r)
        As[tid / kBKW + r * 32][tid % kBKW] =
            aok[r] ? *reinterpret_cast<const int32_t*>(xb + abase[r] + toff + cb + 4 * (tid % kBKW))
                   : 0;
      uint32_t lo = 0, hi = 0;
      if (bco < p.Co) {
        for (int j = 0; j < 8; ++j) {
          const int c = cb + bgrp * 8 + j;
          const int v = c < p.C ? weight_at(p, bco, tap, c, taps) : 0;
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
  }

  const float xs = p.x_scale ? *p.x_scale : 1.f;
  const float r_out = p.out_mode == 1 ? __frcp_rn(*p.out_scale) : 1.f;
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
    for (int j = 0; j < 4; ++j) {
      const int co = n0 + tx * 4 + j;
      if (co >= p.Co) continue;
      const int32_t a = acc[i][j] + comp[co];
      const int64_t idx = m * p.Co + co;
      if (p.out_mode == 2) {
        static_cast<int32_t*>(p.y)[idx] = a;
        continue;
      }
      float z = __fmul_rn(float(a), __fmul_rn(xs, p.w_scale[co]));
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
  const size_t xbytes = size_t(p.N) * d.Tp * d.Hp * d.Wp * d.Cp;
  return (xbytes + 15) / 16 * 16 + size_t(p.Co) * sizeof(int32_t);
}

cudaError_t packed_conv3d_launch(const PackedConvParams& p, cudaStream_t stream) {
  const Padded d = padded_dims(p);
  const int zp = p.in_qn >= 0 ? 128 : 0;
  const size_t xbytes = size_t(p.N) * d.Tp * d.Hp * d.Wp * d.Cp;
  int8_t* xb = static_cast<int8_t*>(p.scratch);
  int32_t* comp = reinterpret_cast<int32_t*>(static_cast<char*>(p.scratch) + (xbytes + 15) / 16 * 16);
  const int64_t words = int64_t(xbytes / 4);
  const int blocks = int((words + 255) / 256 < kPackMaxBlocks ? (words + 255) / 256 : kPackMaxBlocks);
  QGAIT_LAUNCH(blocks > 0 ? blocks : 1, 256, 0, stream, pack_input)(p, d, zp, xb);
  QGAIT_LAUNCH((p.Co + 127) / 128, 128, 0, stream, zero_point_sums)(p, zp, comp);
  const int64_t M = int64_t(p.N) * p.To * p.Ho * p.Wo;
  const dim3 grid(unsigned((M + kBM - 1) / kBM), unsigned((p.Co + kBN - 1) / kBN));
  QGAIT_LAUNCH(grid, kThreads, 0, stream, conv_igemm)(p, d, xb, comp);
  return cudaGetLastError();
}

}  // namespace qgait
