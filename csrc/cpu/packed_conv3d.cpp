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
// Code paths (cpu/isa.h picks one at run time; the cap makes tests run each; the kernels of
// each ISA live in packed_conv3d_avx512.cpp and packed_conv3d_avx2.cpp, this file is the
// driver and the scalar path):
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
// On the vnni and maddubs paths, layers of kT x 3 x 3 taps with codes of up to 6 bits and
// weights of magnitude <= 14 (W4A4 and below) run exact Winograd F(2x2, 3x3) instead, 2.25x
// fewer multiply-adds ("Winograd F(2x2, 3x3)" below).
// The epilogue (rescale, bias, folded BatchNorm, activation, fp32 store or requantization to
// the next layer's grid) uses the same fp32 operations in the same order on every path, with
// no FMA contraction, so all paths and the reference agree bit for bit.
#include <immintrin.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "cpu/alloc.h"
#include "cpu/isa.h"
#include "cpu/packed_conv3d_kernels.h"

namespace qgait {
namespace packed_cpu {
namespace {

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

// AVX2: maddubs, madd16 or avx_vnni (Avx2Kind); AMX: layers that amx_wanted, else VNNI
enum class Path { Scalar, AVX2, VNNI, AMX };

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

// Work items handed out in small chunks from a shared counter: on a loaded machine a thread
// that is descheduled for a while no longer holds up a fixed half of the work (a static split
// made two threads slower than one here).
template <typename F>
void parallel_dynamic(int64_t n, const F& f) {
  parallel_dynamic(n, f, [] {}, [] {});
}

// The same, with enter() and leave() run once on each thread around its chunks (the AMX tiles'
// configuration and release).
template <typename F, typename Enter, typename Leave>
void parallel_dynamic(int64_t n, const F& f, const Enter& enter, const Leave& leave) {
  const int64_t nt = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(1, n / (nt * 32));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    enter();
    for (int64_t b = next.fetch_add(chunk); b < n; b = next.fetch_add(chunk))
      f(b, std::min(n, b + chunk));
    leave();
  });
}

Path choose_path() {
  const Isa isa = cpu_isa();
  if (isa >= Isa::AMX && cpu_has_amx_int8() && cpu_has_vnni()) return Path::AMX;
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

// Whether the first 8 KiB of the n integer codes at p, with 0, already span more than
// `limit`. Winograd needs codes within 63 of each other, which 8-bit activations rarely are:
// their first rows tell, where at::aminmax read the whole input (13 us for [1, 64, 30, 16, 11]
// codes, on each layer of a W8A8 model whose weights allowed Winograd). Codes that pass are
// measured whole, by aminmax (parallel; a serial loop here took longer).
template <typename T>
bool wider_than(const T* p, int64_t n, int64_t limit) {
  T mn = 0, mx = 0;
  for (int64_t i = 0, e = std::min<int64_t>(n, 8192); i < e; ++i) {
    mn = std::min(mn, p[i]);
    mx = std::max(mx, p[i]);
  }
  return int64_t(mx) - int64_t(mn) > limit;
}

// Builds the padded channels-last code buffer u = x_int + zp (zp everywhere else).
// The buffer is reused across calls (grow-only, per calling thread): a fresh allocation of
// this size would page-fault on first touch at every call.
avec<uint8_t>& input_scratch() {
  static thread_local avec<uint8_t> buf;
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

uint8_t* build_input(const at::Tensor& x, const ConvGeom& g, int64_t Tp, int64_t Hp, int64_t Wp,
                     int64_t Cp, int zp, float r, float qn, float qp, int64_t slack = 4) {
  avec<uint8_t>& buf = input_scratch();
  const size_t total = static_cast<size_t>(g.N * Tp * Hp * Wp * Cp);
  // slack past the end, filled with zp: with the W taps folded (Cp = 1) the last window's
  // 4-byte read passes the end by up to 3 bytes (which meet zero weights); the AMX tiles read
  // whole 16-pixel tiles and 64-byte chunks (amx_slack)
  slack = std::max<int64_t>(slack, 4);
  if (buf.size() < total + slack) buf.resize(total + slack);
  std::memset(buf.data() + total, zp, static_cast<size_t>(slack));
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
  // padding (and the channel tail) holds the code of zero.
  if (code_rows) {
    // Dense code rows: one parallel pass over the buffer's frames, each written front to back,
    // halo and rows of codes alike (filling the halo first on one thread, then the rows on
    // all, spent ~0.2 ms of a 4 ms W8A8 GaitLite3D in serial memset calls, the other core
    // waiting)
    const int64_t row = Wp * Cp, frame = Hp * row, n_in = g.W * g.C;
    const int64_t left = g.pW * Cp, right = row - left - n_in;
    at::parallel_for(0, g.N * Tp, 1, [&](int64_t b, int64_t e) {
      for (int64_t nt = b; nt < e; ++nt) {
        const int64_t n = nt / Tp, t = nt % Tp - g.pT;
        uint8_t* f = buf.data() + nt * frame;
        if (t < 0 || t >= g.T) {
          std::memset(f, zp, frame);
          continue;
        }
        // the top halo rows and the first row's left halo are one block, as are each row's
        // right halo with the next row's left one, and the last right halo with the bottom rows
        std::memset(f, zp, g.pH * row + left);
        for (int64_t h = 0; h < g.H; ++h) {
          uint8_t* dst = f + (g.pH + h) * row + left;
          const int64_t off = n * st[0] + t * st[2] + h * st[3];
          if (dt == at::kChar) shift_codes(static_cast<const int8_t*>(xv) + off, dst, n_in, zp);
          else std::memcpy(dst, static_cast<const uint8_t*>(xv) + off, n_in);
          const int64_t gap = h + 1 < g.H ? right + left : right + (Hp - g.pH - g.H) * row;
          std::memset(dst + n_in, zp, gap);
        }
      }
    });
    return buf.data();
  }
  // Other layouts: the whole buffer first, interiors overwritten below. One thread: a memset
  // is memory-bound (0.2 ms for layer A's warm 23 MB), and every parallel region is a point
  // where a busy machine can stall the call until all threads are scheduled again.
  std::memset(buf.data(), zp, total);
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
// contiguous from step to step; a last block narrower than B (Coutp not a multiple of B) has its
// own width. (B = Coutp: [ktaps][kc/G][Coutp][G].) The AVX2 tiles read B = 16 channels: with the
// full Coutp between steps (512 bytes for 128 channels) their weights fell into an eighth of L1's
// sets and came from L2, at a third of the speed; the VNNI tiles B = 64 (items_vnni).
template <typename T, int G>
avec<T> interleave_weights(const std::vector<int8_t>& wk, int64_t Co, int64_t ktaps, int64_t kc,
                           int64_t Coutp, int64_t B = 0) {
  if (B == 0) B = Coutp;
  avec<T> out(static_cast<size_t>(ktaps * kc * Coutp), 0);
  const int64_t K = ktaps * (kc / G), n = ktaps * kc;
  for (int64_t co = 0; co < Co; ++co) {
    const int64_t co0 = co / B * B, bw = std::min(B, Coutp - co0);  // this block's width
    T* o = out.data() + co0 * K * G + (co - co0) * G;
    const int8_t* w = wk.data() + co * n;
    for (int64_t s = 0; s < K; ++s, o += bw * G, w += G)  // one lane's G values per step
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
enum class WLayout : int64_t { Base, Vnni, Avx2U8, Avx2I16, WinoVnni, WinoAvx2, Amx };
using PrepKey = std::array<int64_t, 9>;  // w_bits, Co, C, ntaps, ktaps, kc, Coutp, fold, layout

struct WeightPrep {
  PrepKey key{};
  std::vector<uint8_t> bytes;   // the packed weights this entry was built from
  std::vector<int32_t> wsum;    // Base: each output channel's sum (Coutp entries); Wino*: each
                                //   position's sums [16][Coutp] of the transformed weights
  int64_t wlo = 0, whi = 0;     // Base: the range of all weights; Wino*: of the transformed ones
  std::vector<int8_t> wk;       // Base: the reduction weights [Co][ktaps][kc]
  avec<uint8_t> w8;             // Vnni / Avx2U8 / Amx layouts
  avec<int16_t> w16;            // Avx2I16 layout
  std::vector<int32_t> ktkh;    // Base: the sums per (kt, kh) window row [kT * kH][Coutp]
  size_t size() const {
    return bytes.size() + wsum.size() * 4 + wk.size() + w8.size() + w16.size() * 2 +
           ktkh.size() * 4;
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

// ---- Winograd F(2x2, 3x3) ------------------------------------------------------------------
// With 4-bit codes and weights a layer of kT x 3 x 3 taps (stride 1, padding 1 in H and W) runs
// on 2.25x fewer multiply-adds, exactly. Per tile of 2 x 2 output pixels and frame, the 4 x 4
// codes d around it and each 3 x 3 slice g of the weights are transformed,
//   V = B^T d B,   U = G' g G'^T   (G' = 2 G, integer),   y = A^T (sum over kT, C of U . V) A / 4,
// with Lavin and Gray's F(2, 3) matrices
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G' = [2 0 0; 1 1 1; 1 -1 1; 0 0 2],
//   A^T = [1 1 1 0; 0 1 -1 -1].
// Everything is integer: A^T (U . V) A = 4 y exactly, so the division by 4 is exact. What makes
// it a u8 x s8 dot product like the direct path's: for codes in [0, a] (a <= 63), V lies in
// [-2a, 2a] at the 15 positions with a difference in them and in [0, 4a] at position 5 (sums
// only), so V + off (off = 2a, or 0 at position 5) is a byte in [0, 4a]; U is a sum of at most
// 9 weights (|U| <= 9 max|w|: 72 for 4-bit weights), an int8 when |w| <= 14. The offsets come
// back out of the sums as off[xi] * sum(U[xi]) per output channel (`corr`, through A^T . A);
// the padding code zp and the zero-point correction zp * sum(w) work as on the direct path.
// Each of the 16 positions is then a GEMM of the tiles' V (kT frames x Cp channels) against
// U on the direct path's tiles (vpdpbusd; vpmaddubsw on the AVX2 class, exact because a pair
// of V + off <= 4a times |U| stays inside int16 for the L steps that avx2_chunk allows).
// Where: 3 x 3 in H and W, stride 1, dilation 1, padding 1 (any kT, temporal stride and
// dilation), at least 2 input channels, codes of range <= 63 (measured for integer inputs),
// weights of magnitude <= 14; not on the scalar path. On the AVX2 class of a CPU with AVX-VNNI
// its GEMMs run on the VEX vpdpbusd tiles (int32 sums: no bound on L; whole W4A4 GaitLite3D
// width 1.0, 2 threads, Xeon at the avx2_vnni level: 4.79 ms, against 5.61 ms for W4A8 on the
// direct tiles). When, by default: for at least 32 output channels and, with vpdpbusd, 16 input
// channels; on the AVX2 class kT x C_in >= 48 (its int16 sums of V . U must be widened every
// few steps, L = 3 for 4-bit codes and weights, against 136 on the direct path, so a short
// reduction gains little). Narrower layers lost to the direct path, e.g. GaitLite3D width 0.5,
// 1 thread, AVX2 class: 8 -> 16 channels (3x3x3) 1.06 ms against 0.61 ms direct, 32 -> 32
// (1x3x3) 0.46 against 0.40; AVX-512 VNNI: 16 -> 16 (1x3x3) 0.53 against 0.52, while 16 -> 32
// (3x3x3) took 0.40 against 0.49. QGAIT_WINOGRAD=0 turns it off, =1 on wherever it is exact
// (the tests run both).
constexpr int kWinoMid = 5;  // the one position whose input transform only adds (row 1, col 1)

// The path of this thread's last call (`torch.ops.qgait._packed_conv3d_cpu_path()`), for
// tests and for users asking which kernel a layer runs.
thread_local const char* last_path = "none";

// QGAIT_WINOGRAD: 0 off, 1 wherever exact, unset (or anything else) where it measured faster.
// A path switch from the environment: 0 or 1 when `name` starts with '0' / '1', else -1 (the
// measured default).
int env_switch(const char* name) {
  const char* e = std::getenv(name);
  return e && (e[0] == '0' || e[0] == '1') ? e[0] - '0' : -1;
}

bool winograd_wanted(const ConvGeom& g, bool vnni) {
  const int sw = env_switch("QGAIT_WINOGRAD");
  if (sw >= 0) return sw == 1;
  return g.Co >= 32 && (vnni ? g.C >= 16 : g.kT * g.C >= 48);
}

// QGAIT_AMX: 0 off, 1 wherever the tiles can run (every layer but a folded 1-channel stem),
// unset (or anything else) where they measured faster than the AVX-512 VNNI tiles: segments
// (contiguous reduction bytes) of at least 32 bytes, whose 64-byte chunks are at least half
// codes, and at least 16 output channels.
bool amx_wanted(const ConvGeom& g, int64_t seg_bytes, bool fold) {
  // The folded stem stays on vpdpbusd: its 4-byte window rows fill 1/16 of each 64-byte chunk
  // (tried, 1 -> 16 channels 3 x 3 x 3 stride 2 on [1, 1, 30, 64, 44]: 0.64 ms on the tiles
  // against 0.22 ms, 1 thread, Xeon with AMX)
  if (fold) return false;
  const int sw = env_switch("QGAIT_AMX");
  if (sw >= 0) return sw == 1;
  return seg_bytes >= 32 && g.Co >= 16;
}

bool winograd_geometry(const ConvGeom& g) {
  return g.kH == 3 && g.kW == 3 && g.sH == 1 && g.sW == 1 && g.dH == 1 && g.dW == 1 &&
         g.pH == 1 && g.pW == 1 && g.C >= 2;
}

// The 16 positions' weights U[xi][co][kt][c] (int8 when they fit, see above) from wk
// [Co][kT * 9][Cp], their sums per output channel into sums [16][Coutp] and their range.
// Empty when some U leaves int8.
std::vector<int8_t> winograd_weights(const std::vector<int8_t>& wk, int64_t Co, int64_t kT,
                                     int64_t Cp, int64_t Coutp, std::vector<int32_t>& sums,
                                     int64_t& ulo, int64_t& uhi) {
  static const int G[4][3] = {{2, 0, 0}, {1, 1, 1}, {1, -1, 1}, {0, 0, 2}};
  const int64_t per = kT * Cp;
  std::vector<int8_t> u(static_cast<size_t>(16 * Co * per));
  sums.assign(static_cast<size_t>(16 * Coutp), 0);
  ulo = 0, uhi = 0;
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t kt = 0; kt < kT; ++kt)
      for (int64_t ch = 0; ch < Cp; ++ch) {
        int gv[3][3];
        for (int kh = 0; kh < 3; ++kh)
          for (int kw = 0; kw < 3; ++kw)
            gv[kh][kw] = wk[((co * kT + kt) * 9 + kh * 3 + kw) * Cp + ch];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) {
            int v = 0;
            for (int kh = 0; kh < 3; ++kh)
              for (int kw = 0; kw < 3; ++kw) v += G[i][kh] * G[j][kw] * gv[kh][kw];
            if (v < -128 || v > 127) return {};
            ulo = std::min<int64_t>(ulo, v);
            uhi = std::max<int64_t>(uhi, v);
            u[((i * 4 + j) * Co + co) * per + kt * Cp + ch] = static_cast<int8_t>(v);
            sums[(i * 4 + j) * Coutp + co] += v;
          }
      }
  return u;
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

  Path path = choose_path();
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
  // AMX segments: a window row's kW taps are contiguous bytes when dW = 1, else one tap each
  const int64_t seg_taps = g.dW == 1 ? g.kW : 1;
  if (path == Path::AMX && !amx_wanted(g, seg_taps * c.Cp, fold)) path = Path::VNNI;

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
    const int64_t rows = g.kT * g.kH, per_row = ktaps / rows * c.kc;  // kw taps x kc
    e.ktkh.assign(static_cast<size_t>(rows * c.Coutp), 0);
    for (int64_t co = 0; co < g.Co; ++co)
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* w = e.wk.data() + co * ktaps * c.kc + r * per_row;
        int32_t sum = 0;
        for (int64_t j = 0; j < per_row; ++j) sum += w[j];
        e.ktkh[r * c.Coutp + co] = sum;
      }
  });
  c.ktkh = base->ktkh.data();
  const std::vector<int32_t>& wsum = base->wsum;
  const std::vector<int8_t>& wk = base->wk;
  const int64_t wlo = base->wlo, whi = base->whi;

  // Range of the input integers [lo, hi] (lo <= 0 <= hi); the codes are u = x_int - lo, in
  // [0, hi - lo], and the padding holds -lo, the code of zero. A float input is clamped to its
  // grid; integer codes are used as they are (like the reference), so where the AVX2 choice
  // depends on their range it is measured (one pass over the input).
  int64_t lo = in_qn, hi = in_qp;
  const at::Tensor x_flat = flat_view(x);
  // Winograd (see winograd_weights): the geometry, the path and the weights allow it here; the
  // range of the codes decides below
  // (on the AMX level Winograd runs on the VNNI tiles, and only when QGAIT_WINOGRAD=1: by
  // default the AMX tiles' direct products measured faster on every layer they take)
  const Path wpath = path == Path::AMX && env_switch("QGAIT_WINOGRAD") == 1 ? Path::VNNI : path;
  const bool wino_try = wpath != Path::Scalar && wpath != Path::AMX && !fold &&
                        winograd_geometry(g) && std::max(-wlo, whi) <= 14 &&
                        winograd_wanted(g, wpath == Path::VNNI);
  // the AVX2 kernels' chunk length depends on the whole range; Winograd only on range <= 63
  const bool avx2_range = path == Path::AVX2 && !cpu_uses_avx_vnni() &&
                          avx2_chunk(255, wlo, whi) < 136;
  const bool avx2_small = avx2_range || wino_try;
  // (only Winograd asks: the full grid unless the first codes fit)
  const bool probe = !avx2_range && x_flat.dim() == 1;
  if (x.scalar_type() == at::kBool) {
    lo = 0, hi = 1;
  } else if (x.scalar_type() == at::kByte) {
    lo = 0, hi = 255;
    if (avx2_small && !(probe && wider_than(x_flat.const_data_ptr<uint8_t>(), x.numel(), 63)))
      hi = x_flat.max().item<int64_t>();
  } else if (x.scalar_type() == at::kChar) {
    lo = -128, hi = 127;
    if (avx2_small && !(probe && wider_than(x_flat.const_data_ptr<int8_t>(), x.numel(), 63))) {
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
  c.zp = zp;
  const float xs = x_scale.item<float>();
  std::shared_ptr<const WeightPrep> wino;
  int64_t wino_L = 0;
  if (wino_try && hi - lo <= 63) {
    const WLayout l = wpath == Path::VNNI ? WLayout::WinoVnni : WLayout::WinoAvx2;
    wino = weight_prep(wpk, key(l), [&](WeightPrep& e) {
      const std::vector<int8_t> u =
          winograd_weights(wk, g.Co, g.kT, c.Cp, c.Coutp, e.wsum, e.wlo, e.whi);
      if (u.empty()) return;  // transformed weights past int8: the direct path
      const int64_t n = g.kT * c.Cp * c.Coutp;
      e.w8.resize(static_cast<size_t>(16 * n));
      for (int xi = 0; xi < 16; ++xi) {
        const std::vector<int8_t> uxi(u.begin() + xi * g.Co * g.kT * c.Cp,
                                      u.begin() + (xi + 1) * g.Co * g.kT * c.Cp);
        const avec<uint8_t> lay =
            l == WLayout::WinoVnni
                ? interleave_weights<uint8_t, 4>(uxi, g.Co, g.kT, c.Cp, c.Coutp)
                : interleave_weights<uint8_t, 4>(uxi, g.Co, g.kT, c.Cp, c.Coutp, 16);
        std::memcpy(e.w8.data() + xi * n, lay.data(), static_cast<size_t>(n));
      }
    });
    if (wino->w8.empty()) wino.reset();
    if (wino && path == Path::AVX2 && !cpu_uses_avx_vnni()) {
      wino_L = avx2_chunk(4 * (hi - lo), wino->wlo, wino->whi);
      if (wino_L < 1) wino.reset();
    }
  }
  if (wino) {  // the code buffer covers whole tiles: 2 Ht + 2 rows, 2 Wt + 2 columns
    path = wpath;
    c.Hp = 2 * ((g.Ho + 1) / 2) + 2;
    c.Wp = 2 * ((g.Wo + 1) / 2) + 2;
  }
  AmxPlan amx;
  std::shared_ptr<const WeightPrep> amx_w;
  if (path == Path::AMX) {
    const int64_t nseg = ktaps / seg_taps, sb = seg_taps * c.Cp, nblk = c.Coutp / 16;
    const int64_t nch = (sb + 63) / 64;
    for (int64_t s = 0; s < nseg; ++s)
      for (int64_t ch = 0; ch < nch; ++ch) amx.koff.push_back(c.toff[s * seg_taps] + ch * 64);
    amx.flat = g.sH == 1 && g.sW == 1;
    amx.tiles = amx.flat ? (g.Ho * c.Wp + 15) / 16 : g.Ho * ((g.Wo + 15) / 16);
    // B tiles [nseg * nch][nblk][16][64]: row kr of a tile holds reduction bytes 4 kr .. 4 kr + 3
    // of its chunk for each of its 16 channels; zero past the segment and past C_out
    amx_w = weight_prep(wpk, key(WLayout::Amx), [&](WeightPrep& e) {
      e.w8.assign(static_cast<size_t>(nseg * nch * nblk * 1024), 0);
      for (int64_t co = 0; co < g.Co; ++co)
        for (int64_t s = 0; s < nseg; ++s) {
          const int8_t* src = wk.data() + co * ktaps * c.kc + s * sb;
          for (int64_t k = 0; k < sb; ++k) {
            const int64_t ch = k / 64, kr = (k % 64) / 4;
            e.w8[static_cast<size_t>((((s * nch + ch) * nblk + co / 16) * 16 + kr) * 64 +
                                     (co % 16) * 4 + k % 4)] = static_cast<uint8_t>(src[k]);
          }
        }
    });
    amx.w = amx_w->w8.data();
  }
  c.xp = build_input(x, g, c.Tp, c.Hp, c.Wp, c.Cp, zp, 1.0f / xs, static_cast<float>(in_qn),
                     static_cast<float>(in_qp), path == Path::AMX ? amx_slack(c) : 4);

  // Per-channel epilogue constants, all fp32 (the same products the reference forms).
  const at::Tensor wsc = w_scale.contiguous();
  avec<float> m1(c.Coutp, 0.f), bz(c.Coutp, 0.f), bg, bb;
  avec<int32_t> comp(c.Coutp, 0);
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

  if (wino) {
    WinoPlan p;
    p.Ht = (g.Ho + 1) / 2;
    p.Wt = (g.Wo + 1) / 2;
    p.u = c.xp;
    p.Tv = c.Tp;
    p.Hq = c.Hp;
    p.Wq = c.Wp;
    p.Cp = c.Cp;
    p.K = g.kT * c.Cp / 4;
    p.span = (g.kT - 1) * g.dT + 1;
    const int off = static_cast<int>(2 * (hi - lo));
    p.off = off;
    p.w = wino->w8.data();
    p.wxi = g.kT * c.Cp * c.Coutp;
    // corr[ij][co] = (A^T (off . sums) A)[i][j]: what the offsets added to each output (x 4)
    static const int A[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
    avec<int32_t> corr(static_cast<size_t>(4 * c.Coutp), 0);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        for (int xi = 0; xi < 16; ++xi) {
          const int k = A[i][xi / 4] * A[j][xi % 4] * (xi == kWinoMid ? 0 : off);
          if (k == 0) continue;
          for (int64_t co = 0; co < c.Coutp; ++co)
            corr[(i * 2 + j) * c.Coutp + co] += k * wino->wsum[xi * c.Coutp + co];
        }
    p.corr = corr.data();
    const int64_t trows = g.N * g.To * p.Ht;
    if (path == Path::VNNI) {
      last_path = "vnni-winograd";
      parallel_dynamic(trows, [&](int64_t b, int64_t e) { wino_items_vnni(c, p, b, e); });
    } else {
      p.L = std::min(wino_L, p.K);
      p.avx_vnni = cpu_uses_avx_vnni();
      last_path = p.avx_vnni ? "avx2-avxvnni-winograd"
                  : p.L >= 2 ? "avx2-maddubs-winograd"
                             : "avx2-maddubs1-winograd";
      parallel_dynamic(trows, [&](int64_t b, int64_t e) { wino_rows_avx2(c, p, b, e); });
    }
    return y;
  }

  if (path == Path::AMX) {
    last_path = "amx";
    // the tiles configured once per thread, not per chunk of items: 1-2% of the whole packed
    // model at 2 threads against per chunk (100 alternating rounds, within the rounds' spread)
    parallel_dynamic(amx_items(c, amx), [&](int64_t b, int64_t e) { items_amx(c, amx, b, e); },
                     amx_enter, amx_leave);
  } else if (path == Path::VNNI) {
    const auto lay = weight_prep(wpk, key(WLayout::Vnni), [&](WeightPrep& e) {
      e.w8 = interleave_weights<uint8_t, 4>(wk, g.Co, ktaps, c.kc, c.Coutp, 64);
    });
    const int64_t ksteps = c.kc / 4;
    std::vector<int64_t> aoff(static_cast<size_t>(ktaps * ksteps));
    for (int64_t t = 0; t < ktaps; ++t)
      for (int64_t k = 0; k < ksteps; ++k) aoff[t * ksteps + k] = c.toff[t] + 4 * k;
    last_path = "vnni";
    const int64_t items = rows * ((c.Coutp + 63) / 64);
    parallel_dynamic(items, [&](int64_t b, int64_t e) {
      items_vnni(c, lay->w8.data(), aoff.data(), b, e);
    });
  } else if (path == Path::AVX2) {
    Avx2Plan p;
    const int64_t L = avx2_chunk(hi - lo, wlo, whi);
    p.kind = cpu_uses_avx_vnni() ? Avx2Kind::AvxVnni
             : L >= 2             ? Avx2Kind::Maddubs
             : L == 1             ? Avx2Kind::Maddubs1
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
    last_path = p.kind == Avx2Kind::AvxVnni    ? "avx2-avxvnni"
                : p.kind == Avx2Kind::Maddubs  ? "avx2-maddubs"
                : p.kind == Avx2Kind::Maddubs1 ? "avx2-maddubs1"
                                               : "avx2-madd16";
    p.wstride = 16 * G;  // elements per step of one 16-channel block
    parallel_dynamic(rows, [&](int64_t b, int64_t e) { rows_avx2(c, p, b, e); });
  } else {
    last_path = "scalar";
    const std::vector<int16_t> ws(wk.begin(), wk.end());
    parallel_dynamic(rows, [&](int64_t b, int64_t e) { rows_scalar(c, ws.data(), b, e); });
  }
  return y;
}

}  // namespace
}  // namespace packed_cpu

std::string packed_conv3d_cpu_path() { return packed_cpu::last_path; }

// The codes of a binary float input (the stem's 0 / 1 silhouette) as uint8, and how many of its
// values are not 0 or 1 (NaN and -0.0 included: -0.0 is 0). One pass, where the Python check
// took four (to uint8, clamp, back to float, compare: ~0.11 ms for a 30-frame 64 x 44 sequence).
std::tuple<at::Tensor, int64_t> binary_codes_cpu(const at::Tensor& x) {
  QGAIT_CHECK(x.scalar_type() == at::kFloat, kPackedConv, "binary codes need a float32 x, got ",
              x.scalar_type());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options().dtype(at::kByte));
  const float* __restrict src = xc.const_data_ptr<float>();
  uint8_t* __restrict dst = out.data_ptr<uint8_t>();
  const int64_t n = xc.numel();
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = src[i];
    const bool one = v == 1.0f;
    bad += !(one || v == 0.0f);  // NaN: both comparisons false
    dst[i] = static_cast<uint8_t>(one);
  }
  return {out, bad};
}

TORCH_LIBRARY_IMPL(qgait, CPU, m) {
  m.impl("packed_conv3d", &packed_cpu::packed_conv3d_cpu);
  m.impl("_binary_codes", &binary_codes_cpu);
}

}  // namespace qgait
