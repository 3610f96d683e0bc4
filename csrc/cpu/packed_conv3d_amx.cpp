// CPU packed_conv3d, AMX-INT8 (Sapphire Rapids and later): the implicit GEMM on tile registers.
// tdpbusd multiplies a 16 x 64 tile of u8 codes (16 output pixels x 64 reduction bytes) by a
// 16 x 64 tile of s8 weights (16 groups of 4 reduction bytes x 16 output channels) into 16 x 16
// int32 sums: 16,384 multiply-adds per instruction, against vpdpbusd's 64 per zmm. The sums are
// the exact int32 accumulators of the other paths, so the AVX-512 epilogue finishes them.
// The plan (segments, chunks, the virtual pixel grid): AmxPlan in packed_conv3d_kernels.h; the
// driver and the weights' layout: packed_conv3d.cpp.

#include <immintrin.h>

#include <algorithm>

#include "cpu/packed_conv3d_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")
namespace qgait {
namespace packed_cpu {
namespace {

// Tile registers: tmm0-3 the sums of 2 pixel tiles x 2 channel blocks (tmm0: tile 0 block 0,
// tmm1: tile 0 block 1, tmm2: tile 1 block 0, tmm3: tile 1 block 1), tmm4-5 the two pixel
// tiles' codes of one chunk, tmm6-7 the two channel blocks' weights of that chunk. All 16 rows
// of 64 bytes: rows past the output's pixels read codes that are computed and dropped.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // g++ 12's _tile_loadconfig tells the compiler it reads 8 bytes of the config, so the stores
  // to colsb / rows may be dropped as dead (a standalone test then died of SIGILL on tileloadd
  // with 0-row tiles): make them visible first
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

constexpr int64_t kBTile = 16 * 64;  // bytes of one weight tile
constexpr int64_t kPairs = 8;        // pairs of pixel tiles per work item (256 pixels)

// Sums of MT pixel tiles (codes at a0, a1: the window corners of their first pixels, astride
// bytes from pixel to pixel) x NT channel blocks (weights at w, block after block) over every
// reduction step (p.koff: a segment's chunk), stored to acc [MT * 16][32] int32.
// Software-pipelined: tile registers are not renamed, so a load into a tile waits until every
// tdpbusd reading it has finished; each operand of the next step is loaded right after its
// last use in this one (A0 after the second product, B0 after the third, A1 and B1 after the
// fourth), so the next step's first product waits for no load. (With all four loaded at the
// top of each step, perf put most of block_amx's samples on the weights' tileloadd; the
// reordering took a 64 -> 128 channel layer from 0.64 to 0.51-0.57 ms, near this VM's noise.)
template <int MT, int NT>
void block_amx(const uint8_t* a0, const uint8_t* a1, int64_t astride, const AmxPlan& p,
               const uint8_t* w, int64_t nblk, int32_t* acc) {
  _tile_zero(0);
  if constexpr (NT == 2) _tile_zero(1);
  if constexpr (MT == 2) {
    _tile_zero(2);
    if constexpr (NT == 2) _tile_zero(3);
  }
  const int64_t K = static_cast<int64_t>(p.koff.size()), bstep = nblk * kBTile;
  const int64_t* ko = p.koff.data();
  _tile_loadd(4, a0 + ko[0], astride);
  _tile_loadd(6, w, 64);
  if constexpr (NT == 2) _tile_loadd(7, w + kBTile, 64);
  if constexpr (MT == 2) _tile_loadd(5, a1 + ko[0], astride);
  for (int64_t k = 0; k < K; ++k) {
    const bool more = k + 1 < K;
    const uint8_t* bn = w + (k + 1) * bstep;
    _tile_dpbusd(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbusd(1, 4, 7);
    if (more) _tile_loadd(4, a0 + ko[k + 1], astride);
    if constexpr (MT == 2) {
      _tile_dpbusd(2, 5, 6);
      if (more) _tile_loadd(6, bn, 64);
      if constexpr (NT == 2) _tile_dpbusd(3, 5, 7);
      if (more) _tile_loadd(5, a1 + ko[k + 1], astride);
    } else {
      if (more) _tile_loadd(6, bn, 64);
    }
    if constexpr (NT == 2)
      if (more) _tile_loadd(7, bn + kBTile, 64);
  }
  constexpr int64_t ld = 32 * 4;  // bytes per acc row
  _tile_stored(0, acc, ld);
  if constexpr (NT == 2) _tile_stored(1, acc + 16, ld);
  if constexpr (MT == 2) {
    _tile_stored(2, acc + 16 * 32, ld);
    if constexpr (NT == 2) _tile_stored(3, acc + 16 * 32 + 16, ld);
  }
}

using BlockFn = void (*)(const uint8_t*, const uint8_t*, int64_t, const AmxPlan&, const uint8_t*,
                         int64_t, int32_t*);

BlockFn block_fn(int MT, int NT) {
  if (MT == 2) return NT == 2 ? block_amx<2, 2> : block_amx<2, 1>;
  return NT == 2 ? block_amx<1, 2> : block_amx<1, 1>;
}

}  // namespace

int64_t amx_slack(const Ctx& c) {
  // a tile's rows past its frame or row: up to 16 pixels (a row of Wp in the flat grid), and
  // the 64 bytes of the last chunk, which may start past the last segment's end
  return (c.Wp + 16 * c.g.sW + 16) * c.Cp + 128;
}

int64_t amx_items(const Ctx& c, const AmxPlan& p) {
  return c.g.N * c.g.To * (((p.tiles + 1) / 2 + kPairs - 1) / kPairs);
}

void items_amx(const Ctx& c, const AmxPlan& p, int64_t i0, int64_t i1) {
  const ConvGeom& g = c.g;
  const int64_t npairs = (p.tiles + 1) / 2, ngroups = (npairs + kPairs - 1) / kPairs;
  const int64_t nblk = c.Coutp / 16;
  const int64_t tpr = (g.Wo + 15) / 16;  // tiles per output row (not flat)
  alignas(64) int32_t acc[32 * 32];
  int64_t pix[kPairs][32];
  const uint8_t* a[kPairs][2];
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t grp = i % ngroups, t = (i / ngroups) % g.To, n = i / (ngroups * g.To);
    const int64_t k0 = grp * kPairs, np = std::min(kPairs, npairs - k0);
    const int64_t astride = p.flat ? c.Cp : g.sW * c.Cp;
    for (int64_t q = 0; q < np; ++q)
      for (int m = 0; m < 2; ++m) {
        const int64_t j = std::min(2 * (k0 + q) + m, p.tiles - 1);  // the tile's index in the frame
        if (p.flat) {  // virtual pixel v = h * Wp + w, input at the frame's corner + v * Cp
          a[q][m] = c.row_base(n, t, 0) + j * 16 * c.Cp;
          // one division per tile (two per pixel took ~1,000 cycles per pair of tiles, against
          // ~600 of tdpbusd for a 16 -> 32 channel 3 x 3 x 3 layer)
          int64_t h = j * 16 / c.Wp, w = j * 16 % c.Wp;
          for (int r = 0; r < 16; ++r) {
            pix[q][m * 16 + r] = h < g.Ho && w < g.Wo ? c.out_pixel(n, t, h, w) : -1;
            if (++w == c.Wp) w = 0, ++h;
          }
        } else {
          const int64_t h = j / tpr, w0 = (j % tpr) * 16;
          a[q][m] = c.row_base(n, t, h) + w0 * astride;
          for (int r = 0; r < 16; ++r)
            pix[q][m * 16 + r] = w0 + r < g.Wo ? c.out_pixel(n, t, h, w0 + r) : -1;
        }
      }
    // channel blocks outside, pixel tiles inside: a pair of blocks' weights (nseg x nch x 2 KB)
    // stays in L1 over the group's tiles, where walking every block per tile streamed all
    // the layer's weights from L2 per tile (72 KB for 64 -> 128 channels, 1 x 3 x 3)
    for (int64_t nb = 0; nb < nblk; nb += 2) {
      const int NT = nb + 1 < nblk ? 2 : 1;
      const int64_t co0 = nb * 16, nco = std::min<int64_t>(NT * 16, g.Co - co0);
      for (int64_t q = 0; q < np; ++q) {
        const int MT = 2 * (k0 + q) + 1 < p.tiles ? 2 : 1;
        block_fn(MT, NT)(a[q][0], a[q][1], astride, p, p.w + nb * kBTile, nblk, acc);
        if (nco > 0) epi_rows_avx512(c.E, acc, 32, pix[q], MT * 16, co0, nco, g.Co, c.y);
      }
    }
  }
}

void amx_enter() { load_tile_config(); }

void amx_leave() { _tile_release(); }

}  // namespace packed_cpu
}  // namespace qgait
#pragma GCC pop_options
