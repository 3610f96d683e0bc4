// The CPU packed_conv3d op's internals, shared by its driver (packed_conv3d.cpp: argument
// checks, input codes, weight layouts kept across calls, dispatch, the scalar path) and its
// kernels per ISA (packed_conv3d_avx2.cpp: the vpmaddubsw / vpmaddwd / AVX-VNNI tiles of the
// AVX2 class; packed_conv3d_avx512.cpp: the AVX-512 VNNI tiles). Each kernel file compiles under
// its own `#pragma GCC target`; the driver, built for the baseline ISA, calls a kernel only
// where cpu/isa.h says this CPU runs it. Not a public header.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "packed_conv3d.h"

// The epilogue must round like the reference (a multiply, then an add) on every path: g++ would
// otherwise contract them into FMAs, also across intrinsics (setup.py and CMake also pass
// -ffp-contract=off; this keeps every file of the op exact when built some other way).
#pragma GCC optimize("fp-contract=off")

namespace qgait {
namespace packed_cpu {

// std::vector's storage is only 16-byte aligned (malloc's; mmap'd blocks start 16 bytes into a
// page), so a 64-byte vector load from it spans two cache lines: every zmm weight load of the
// VNNI tiles, every row of an AMX tile load, every other ymm load of the AVX2 tiles. Weight
// layouts and the kernels' buffers live in avec instead: 64-byte aligned.
template <typename T>
struct Align64 {
  using value_type = T;
  Align64() = default;
  template <typename U>
  Align64(const Align64<U>&) noexcept {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, size_t) noexcept { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const Align64<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const Align64<U>&) const noexcept { return false; }
};
template <typename T>
using avec = std::vector<T, Align64<T>>;


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
  // the code of zero (the padding's value) and the reduction weights' sums per (kt, kh)
  // window row [kT * kH][Coutp] (over kw and channels): the direct paths skip the taps of a
  // row that fall in the temporal or vertical padding, and correct its zero point with these
  int zp = 0;
  const int32_t* ktkh = nullptr;

  // zp x the sums of the window rows [kt0, kt1) x [kh0, kh1) for channels [co0, co0 + nco)
  // into comp (indexed by channel): the zero-point correction of a row that skips the others
  void row_comp(int64_t kt0, int64_t kt1, int64_t kh0, int64_t kh1, int64_t co0, int64_t nco,
                int32_t* comp) const {
    for (int64_t co = co0; co < co0 + nco; ++co) {
      int32_t sum = 0;
      for (int64_t kt = kt0; kt < kt1; ++kt)
        for (int64_t kh = kh0; kh < kh1; ++kh) sum += ktkh[(kt * g.kH + kh) * Coutp + co];
      comp[co] = zp * sum;
    }
  }

  const uint8_t* row_base(int64_t n, int64_t t, int64_t h) const {
    return xp + (((n * Tp + t * g.sT) * Hp + h * g.sH) * Wp) * Cp;
  }
  int64_t out_pixel(int64_t n, int64_t t, int64_t h, int64_t w) const {
    return ((n * g.To + t) * g.Ho + h) * g.Wo + w;
  }
};

// The window rows [lo, hi) of a kernel axis (k taps, dilation d) that read inside the input
// (extent n, padding p) for output index o with stride s: the taps whose padded index
// o s + j d lies in [p, p + n).
inline void valid_taps(int64_t o, int64_t s, int64_t d, int64_t p, int64_t n, int64_t k,
                       int64_t& lo, int64_t& hi) {
  lo = 0, hi = k;
  while (lo < k && o * s + lo * d < p) ++lo;
  while (hi > lo && o * s + (hi - 1) * d >= p + n) --hi;
}

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
inline void quant_row_scalar(const float* x, int64_t n, uint8_t* u, float r, float qn, float qp,
                             int zp) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] * r;
    v = v > qn ? v : qn;
    v = v < qp ? v : qp;
    u[i] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(v)) + zp);
  }
}

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

// ---- Winograd F(2x2, 3x3) for small codes and weights (packed_conv3d.cpp documents it) ---
// A layer of kT x 3 x 3 taps, stride 1 and padding 1 in H and W, runs as 16 GEMMs over tiles of
// 2 x 2 output pixels: one per position xi = 4 r + s of the tiles' transformed 4 x 4 inputs.
struct WinoPlan {
  int64_t Ht = 0, Wt = 0;          // tile rows and columns of the output
  const uint8_t* u = nullptr;      // the code buffer [N][Tv][Hq][Wq][Cp]
  int64_t Tv = 0, Hq = 0, Wq = 0;  // (Hq = 2 Ht + 2, Wq = 2 Wt + 2: whole tiles)
  int64_t Cp = 0;
  int off = 0;                     // the transformed codes' offset (2 x the code range)
  int64_t span = 1;                // frames one output frame reads: (kT - 1) dT + 1
  int64_t K = 0;                   // reduction steps kT * Cp / 4
  const uint8_t* w = nullptr;      // the 16 positions' weights, each laid out for the path,
  int64_t wxi = 0;                 //   wxi bytes apart
  const int32_t* corr = nullptr;   // [4][Coutp]: the offsets' share of the 4 outputs of a tile
  int64_t L = 0;                   // avx2: steps of int16 sums (see avx2_chunk)
  bool avx_vnni = false;           // avx2: the GEMMs on VEX vpdpbusd (int32 sums, any L)
};

// Transforms one tile row: the 4 code rows from u_row (rows of Wq pixels x Cp) into
// out [16][Wt][Cp], V + off per position (the ISA's kernel).
using WinoRowFn = void (*)(const uint8_t* u_row, int64_t Wq, int64_t Wt, int64_t Cp, int off,
                           uint8_t* out);

// The transformed tile rows a thread holds: one slot per frame of a window of `span` frames
// (slot f % span), tagged with the row it holds. Work items walk the output frames fastest, so
// the next frame's output row finds all but one of the rows it reads already transformed, and
// every row read is in L1 / L2 (transforming whole layers up front wrote 1-3 MB per layer,
// read back from L3: 7% of the packed W4A4 model's time). Tags start empty per chunk of work.
struct WinoRows {
  uint8_t* buf = nullptr;
  std::vector<int64_t> tag;
  int64_t rowbytes = 0;
  explicit WinoRows(const WinoPlan& p)
      : tag(static_cast<size_t>(p.span), -1), rowbytes(16 * p.Wt * p.Cp) {
    static thread_local avec<uint8_t> store;
    if (store.size() < static_cast<size_t>(p.span * rowbytes))
      store.resize(static_cast<size_t>(p.span * rowbytes));
    buf = store.data();
  }
  // transformed row ht of padded frame f of sequence n
  const uint8_t* get(const WinoPlan& p, WinoRowFn fn, int64_t n, int64_t f, int64_t ht) {
    const int64_t slot = f % p.span, key = (n * p.Tv + f) * p.Ht + ht;
    uint8_t* r = buf + slot * rowbytes;
    if (tag[slot] != key) {
      fn(p.u + ((n * p.Tv + f) * p.Hq + 2 * ht) * p.Wq * p.Cp, p.Wq, p.Wt, p.Cp, p.off, r);
      tag[slot] = key;
    }
    return r;
  }
  // The kT transformed rows output tile row (n, t, ht) reads (frames t sT + kt dT): returns
  // the first and fills aoff (p.K steps: kt, then groups of 4 channels) with each step's
  // offset from it.
  const uint8_t* window(const ConvGeom& g, const WinoPlan& p, WinoRowFn fn, int64_t n,
                        int64_t t, int64_t ht, int64_t* aoff) {
    const int64_t ks = p.Cp / 4;
    const uint8_t* base = nullptr;
    for (int64_t kt = 0; kt < g.kT; ++kt) {
      const uint8_t* r = get(p, fn, n, t * g.sT + kt * g.dT, ht);
      if (kt == 0) base = r;
      for (int64_t k = 0; k < ks; ++k) aoff[kt * ks + k] = (r - base) + 4 * k;
    }
    return base;
  }
};

// ---- packed_conv3d_avx2.cpp (CPUs with AVX2 + FMA) -----------------------------------------
// Codes of n floats (as quant_row_scalar), and of one frame of a float input whose W axis is
// contiguous, straight into the channels-last code buffer (Cp channels per pixel, Cp % 4 == 0).
void quant_row_avx2(const float* x, int64_t n, uint8_t* u, float r, float qn, float qp, int zp);
void quant_frame_clast_avx2(const float* x, int64_t cstride, int64_t hstride, int64_t H, int64_t W,
                            int64_t C, int64_t Cp, uint8_t* dst, int64_t dst_hstride, float r,
                            float qn, float qp, int zp);
// Output rows [r0, r1) of [N, To, Ho], every output channel, on the plan's AVX2 kernel.
void rows_avx2(const Ctx& c, const Avx2Plan& p, int64_t r0, int64_t r1);
// Winograd: output tile rows [r0, r1) of [N, Ht, To] (frames fastest), every output channel,
// on vpmaddubsw tiles.
void wino_rows_avx2(const Ctx& c, const WinoPlan& p, int64_t r0, int64_t r1);

// ---- packed_conv3d_avx512.cpp (CPUs with AVX-512 F/BW/VL/DQ + VNNI) --------------------------
// The same two input quantizers, 16 floats at a time.
void quant_row_avx512(const float* x, int64_t n, uint8_t* u, float r, float qn, float qp, int zp);
void quant_frame_clast_avx512(const float* x, int64_t cstride, int64_t hstride, int64_t H,
                              int64_t W, int64_t C, int64_t Cp, uint8_t* dst,
                              int64_t dst_hstride, float r, float qn, float qp, int zp);
// Work items [i0, i1) (output row x group of up to 64 output channels); wv: the weights laid
// out for the VNNI tiles, aoff: the input offset of each (tap, channel group) step.
void items_vnni(const Ctx& c, const uint8_t* wv, const int64_t* aoff, int64_t i0, int64_t i1);
// Winograd: output tile rows [i0, i1) of [N, Ht, To] (frames fastest), every output channel.
void wino_items_vnni(const Ctx& c, const WinoPlan& p, int64_t i0, int64_t i1);
// The epilogue of M accumulator rows (ld int32 apart, channels co0 .. co0 + nco) into the output
// pixels pix[m] (rows with pix[m] < 0 are skipped), 16 channels at a time.
void epi_rows_avx512(const Epi& E, const int32_t* acc, int64_t ld, const int64_t* pix, int64_t M,
                     int64_t co0, int64_t nco, int64_t Co, void* y);

// ---- packed_conv3d_amx.cpp (CPUs with AMX-INT8, on top of AVX-512 VNNI) ----------------------
// The reduction as AMX walks it: segments of contiguous input bytes (a window row's kW taps x
// Cp channels when dW = 1, else one tap's Cp channels), each cut into 64-byte chunks, the
// bytes past a segment's end meeting zero weights. Output pixels are taken 16 at a time
// (one tile's rows), over a "virtual" grid: with stride 1 in H and W a frame's pixels are
// one run over the padded width (constant input stride Cp; the columns past Wo are computed
// and dropped), otherwise each output row on its own, rounded up to 16 pixels.
struct AmxPlan {
  const uint8_t* w = nullptr;  // B tiles [steps][Coutp / 16][16 rows][64 bytes]
  std::vector<int64_t> koff;   // each reduction step's input offset from the window's corner
                               //   (step = a segment's 64-byte chunk)
  bool flat = false;           // stride 1 in H and W
  int64_t tiles = 0;           // tiles of 16 virtual pixels per output frame
};
// Bytes the tiles may read past the code buffer's end (rows past the frame, chunk tails).
int64_t amx_slack(const Ctx& c);
// Work items [i0, i1) of amx_items = [N, To, groups]: a group of up to 8 pairs of pixel tiles
// of a frame, every output channel.
int64_t amx_items(const Ctx& c, const AmxPlan& p);
// The calling thread's tile configuration (before its first items_amx) and its release (after
// the last), once per thread and call, not per chunk of work items.
void amx_enter();
void amx_leave();
void items_amx(const Ctx& c, const AmxPlan& p, int64_t i0, int64_t i1);

}  // namespace packed_cpu
}  // namespace qgait
