// CPU temporal pooling + horizontal pyramid pooling. One work item is one (output row n',
// channel c): its frames [start, start + len) of x form one contiguous slab of len*H*W values,
// read once; the temporal max z [H, W] lives in a per-thread fp32 buffer (L1-sized for gait
// maps: 16x11 .. 64x44) and is reduced to row sums / row maxima, from which every strip of every
// pyramid level is assembled (so the pyramid costs O(H) per item, not O(levels * H * W)).
// Work items run in parallel with at::parallel_for; the frame loops are vectorised per ISA
// (AVX-512 / AVX2 / scalar, chosen at run time, cpu/isa.h). Arg-max indices (int32) are
// written only when need_idx (x requires grad); the forward without them is a pure max/sum.
//
// Ties go to the first index: the first frame (strict > while scanning t upwards), and within a
// strip the first row-major (h, w) (strict > over rows, then over columns), as torch.max(dim).
#include <immintrin.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/alloc.h"
#include "cpu/isa.h"
#include "pooling.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace qgait::pool_avx512 {
#define QGAIT_VEC 512
#include "cpu/vec.h"
#include "cpu/pooling_kernel.h"
#undef QGAIT_VEC
}  // namespace qgait::pool_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace qgait::pool_avx2 {
#define QGAIT_VEC 256
#include "cpu/vec.h"
#include "cpu/pooling_kernel.h"
#undef QGAIT_VEC
}  // namespace qgait::pool_avx2
#pragma GCC pop_options

namespace qgait::pool_scalar {
#define QGAIT_VEC 1
#include "cpu/vec.h"
#include "cpu/pooling_kernel.h"
#undef QGAIT_VEC
}  // namespace qgait::pool_scalar

namespace qgait {
namespace {

constexpr const char* kSph = "set_pool_hpp";
constexpr const char* kSphB = "set_pool_hpp_backward";
constexpr const char* kTp = "temporal_pool";
constexpr const char* kTpB = "temporal_pool_backward";

using FrameFn = void (*)(const float*, float*, float*, float, int64_t);
using SlabFn = void (*)(const float*, int64_t, int64_t, int64_t, float*, float*);
using ScatterFn = void (*)(float*, const float*, const float*, float, int64_t, bool);
using CopyFn = void (*)(float*, const float*, int64_t, bool);
using FenceFn = void (*)();

struct Fns {
  SlabFn slab;
  FrameFn frame;
  ScatterFn scatter;
  CopyFn copy;
  FenceFn fence;
};

Fns fns() {
#define QGAIT_POOL_FNS(ns) \
  Fns { ns::tp_slab, ns::tp_frame, ns::tp_scatter_frame, ns::copy_frame, ns::stream_fence }
  switch (cpu_isa()) {
    case Isa::AMX:
    case Isa::AVX512:
      return QGAIT_POOL_FNS(pool_avx512);
    case Isa::AVX2:
      return QGAIT_POOL_FNS(pool_avx2);
    default:
      return QGAIT_POOL_FNS(pool_scalar);
  }
#undef QGAIT_POOL_FNS
}

// Non-temporal stores pay off only when dx is far larger than the caches.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// Work items per parallel task: enough elements (~32K) to amortise the task overhead.
int64_t grain(int64_t elems_per_item) {
  return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, elems_per_item));
}

// Per-thread scratch, sized once per parallel task.
struct Scratch {
  std::vector<float> z, idx, frame;
  std::vector<float> rsum, rmax;
  std::vector<int32_t> rarg;
  Scratch(int64_t HW, int64_t H) : z(HW), idx(HW), frame(HW), rsum(H), rmax(H), rarg(H) {}
};

// Temporal max of `len` frames at src into s.z (fp32), and frame indices into s.idx when
// with_idx. fp32 slabs go to the register-blocked kernel; half types are widened one frame at a
// time (exact), so the math is fp32 and the results are the same either way.
template <typename T>
void temporal_max(const Fns& f, const T* src, int64_t len, int64_t HW, bool with_idx, Scratch& s) {
  float* idx = with_idx ? s.idx.data() : nullptr;
  if constexpr (std::is_same_v<T, float>) {
    f.slab(src, len, HW, HW, s.z.data(), idx);
  } else {
    auto frame = [&](int64_t t) {
      const T* p = src + t * HW;
      for (int64_t i = 0; i < HW; ++i) s.frame[i] = static_cast<float>(p[i]);
      return s.frame.data();
    };
    const float* f0 = frame(0);
    std::copy(f0, f0 + HW, s.z.begin());
    if (idx) std::fill(s.idx.begin(), s.idx.end(), 0.f);
    for (int64_t t = 1; t < len; ++t) f.frame(frame(t), s.z.data(), idx, static_cast<float>(t), HW);
  }
}

// Strips of s.z -> out[j] (and sarg[j] = flat h*W+w arg-max when sarg != nullptr).
template <typename T>
void pyramid(const std::vector<PoolStrip>& strips, int64_t mode, int64_t H, int64_t W, Scratch& s,
             T* out, int32_t* sarg) {
  const float* z = s.z.data();
  for (int64_t h = 0; h < H; ++h) {
    const float* r = z + h * W;
    float sum = 0.f, mx = r[0];
    int32_t arg = 0;
    for (int64_t w = 0; w < W; ++w) sum += r[w];
    // Branch-free (maxima of real maps are unpredictable). A NaN in the row makes the sum NaN,
    // and only then does the running maximum need torch.max's rule (cpu/vec.h), whose longer
    // dependency chain doubled the cost of the whole forward.
    auto scan = [&](auto beats) {
      for (int64_t w = 1; w < W; ++w) {
        const bool gt = beats(r[w], mx);
        arg = gt ? static_cast<int32_t>(w) : arg;
        mx = gt ? r[w] : mx;
      }
    };
    if (sum == sum) scan([](float x, float m) { return x > m; });
    else scan([](float x, float m) { return pool_scalar::beats(x, m); });
    s.rsum[h] = sum;
    s.rmax[h] = mx;
    s.rarg[h] = arg;
  }
  for (size_t j = 0; j < strips.size(); ++j) {
    const int32_t a = strips[j].row0, b = strips[j].row1;
    float sum = 0.f, mx = s.rmax[a];
    int32_t best = a;
    for (int32_t h = a; h < b; ++h) sum += s.rsum[h];
    for (int32_t h = a + 1; h < b; ++h)
      if (pool_scalar::beats(s.rmax[h], mx)) {
        mx = s.rmax[h];
        best = h;
      }
    const float mean = sum / static_cast<float>((b - a) * W);
    const float v = mode == kMeanMax ? mean + mx : (mode == kMax ? mx : mean);
    out[j] = static_cast<T>(v);
    if (sarg) sarg[j] = static_cast<int32_t>(best * W + s.rarg[best]);
  }
}

// dx slab of one work item: frame t gets dz where the temporal arg-max is t, else 0.
template <typename T>
void scatter(const Fns& f, T* dst, int64_t len, int64_t HW, const int32_t* targ, bool stream,
             Scratch& s) {
  const float* dz = s.z.data();
  if (targ != nullptr)
    for (int64_t i = 0; i < HW; ++i) s.idx[i] = static_cast<float>(targ[i]);
  for (int64_t t = 0; t < len; ++t) {
    float* o;
    if constexpr (std::is_same_v<T, float>) o = dst + t * HW; else o = s.frame.data();
    const bool st = stream && std::is_same_v<T, float>;
    if (targ == nullptr) f.copy(o, dz, HW, st);  // a single frame: dz itself
    else f.scatter(o, dz, s.idx.data(), static_cast<float>(t), HW, st);
    if constexpr (!std::is_same_v<T, float>)
      for (int64_t i = 0; i < HW; ++i) dst[t * HW + i] = static_cast<T>(o[i]);
  }
}

// The backward of both ops: for every work item (output row n', channel c) fill_dz(it, s) writes
// dL/dz of the temporal max into s.z, then scatter() writes that item's dx slab. Parallel over
// items; the streaming stores are fenced before each task ends.
template <typename T, typename FillDz>
void backward_rows(const Fns& f, T* dx, const PoolBackward& a, int64_t N, bool stream,
                   const int32_t* targ, FillDz fill_dz) {
  at::parallel_for(0, a.NO * a.C, grain(N * a.T * a.HW / a.NO), [&](int64_t b, int64_t e) {
    Scratch s(a.HW, a.H);
    for (int64_t it = b; it < e; ++it) {
      const PoolSeq q = a.seqs[it / a.C];
      const int64_t c = it % a.C;
      fill_dz(it, s);
      scatter<T>(f, dx + ((q.item * a.C + c) * a.T + q.start) * a.HW, q.len, a.HW,
                 targ ? targ + it * a.HW : nullptr, stream, s);
    }
    if (stream) f.fence();  // order the non-temporal stores before the task ends
  });
}

// dx is as large as x and written once; on a fresh allocation most of its cost was the kernel's
// 4 KiB page faults (5x the write itself on this VM): cpu/alloc.h's empty_huge.
using cpu::empty_huge;

at::Tensor empty_i32(const at::Tensor& like) { return at::empty({0}, like.options().dtype(at::kInt)); }

// Forward without indices of a channels-last fp32 x ([N, T, H, W, C] in memory, what a packed or
// channels-last conv produces), without first copying x to NCDHW (a copy ten times the cost of
// the pooling at gait sizes): a sequence's frames are one contiguous slab [len, H*W*C], whose
// temporal max z [H, W, C] is taken in one pass by the same slab kernel; the row sums and maxima,
// then the strips, are computed with the channels innermost (contiguous, vectorized), in the
// order pyramid() uses per channel, so every value is bit-identical to the NCDHW path's.
// (Gathering each channel's map out of z first read z a cache line per value: 60-80 us for
// GaitLite3D's [128, 16, 11] map, whatever the number of frames.)
void set_pool_hpp_clast(const at::Tensor& x, const std::vector<PoolSeq>& seqs,
                        const std::vector<PoolStrip>& strips, int64_t mode, at::Tensor& out) {
  const int64_t C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4), HW = H * W;
  const int64_t NO = static_cast<int64_t>(seqs.size()), B = static_cast<int64_t>(strips.size());
  const Fns f = fns();
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::vector<float> z(static_cast<size_t>(HW * C));
  constexpr int64_t kCb = 64;  // channels per task
  const int64_t blocks = (C + kCb - 1) / kCb;
  for (int64_t o = 0; o < NO; ++o) {
    const PoolSeq q = seqs[o];
    // the temporal max in parallel too, over parts of the frame (one thread read all of x:
    // 140 against 57 us for the NCDHW path on [1, 128, 30, 16, 11] at 2 threads)
    const float* src = xp + (q.item * T + q.start) * HW * C;
    constexpr int64_t kPart = 2048;  // floats of a frame per task
    const int64_t parts = (HW * C + kPart - 1) / kPart;
    at::parallel_for(0, parts, grain(q.len * kPart), [&](int64_t b, int64_t e) {
      const int64_t i0 = b * kPart, i1 = std::min(e * kPart, HW * C);
      f.slab(src + i0, q.len, i1 - i0, HW * C, z.data() + i0, nullptr);
    });
    at::parallel_for(0, blocks, grain(2 * HW * kCb), [&](int64_t b, int64_t e) {
      std::vector<float> rsum(static_cast<size_t>(H * kCb)), rmax(rsum.size());
      std::vector<float> sum(kCb), mx(kCb);
      for (int64_t blk = b; blk < e; ++blk) {
        const int64_t c0 = blk * kCb, nc = std::min(kCb, C - c0);
        for (int64_t h = 0; h < H; ++h) {
          const float* r = z.data() + h * W * C + c0;
          float* rs = rsum.data() + h * kCb;
          float* rm = rmax.data() + h * kCb;
          for (int64_t c = 0; c < nc; ++c) {
            rs[c] = 0.f;
            rm[c] = r[c];
          }
          for (int64_t w = 0; w < W; ++w)
            for (int64_t c = 0; c < nc; ++c) rs[c] += r[w * C + c];
          for (int64_t w = 1; w < W; ++w)
            for (int64_t c = 0; c < nc; ++c) {
              const float v = r[w * C + c], m = rm[c];
              rm[c] = pool_scalar::beats(v, m) ? v : m;
            }
        }
        for (int64_t j = 0; j < B; ++j) {
          const int32_t a = strips[j].row0, bb = strips[j].row1;
          for (int64_t c = 0; c < nc; ++c) {
            sum[c] = 0.f;
            mx[c] = rmax[a * kCb + c];
          }
          for (int32_t h = a; h < bb; ++h)
            for (int64_t c = 0; c < nc; ++c) sum[c] += rsum[h * kCb + c];
          for (int32_t h = a + 1; h < bb; ++h)
            for (int64_t c = 0; c < nc; ++c) {
              const float v = rmax[h * kCb + c], m = mx[c];
              mx[c] = pool_scalar::beats(v, m) ? v : m;
            }
          const float n = static_cast<float>((bb - a) * W);
          float* dst = op + (o * C + c0) * B + j;
          for (int64_t c = 0; c < nc; ++c) {
            const float mean = sum[c] / n;
            dst[c * B] = mode == kMeanMax ? mean + mx[c] : (mode == kMax ? mx[c] : mean);
          }
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> set_pool_hpp_cpu(const at::Tensor& x,
                                                                 at::IntArrayRef seqL,
                                                                 at::IntArrayRef bins,
                                                                 int64_t mode, bool need_idx) {
  const auto seqs = pool_sequences(kSph, x, seqL);
  const int64_t C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4), HW = H * W;
  const auto strips = pool_strips(kSph, H, bins, mode);
  const int64_t NO = static_cast<int64_t>(seqs.size()), B = static_cast<int64_t>(strips.size());
  at::Tensor out = at::empty({NO, C, B}, x.options());
  const bool with_t = need_idx && T > 1, with_s = need_idx && mode != kMean;
  if (!need_idx && x.scalar_type() == at::kFloat && !x.is_contiguous() &&
      x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    set_pool_hpp_clast(x, seqs, strips, mode, out);
    return {out, empty_i32(x), empty_i32(x)};
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor targ = with_t ? at::empty({NO, C, H, W}, x.options().dtype(at::kInt)) : empty_i32(x);
  at::Tensor sarg = with_s ? at::empty({NO, C, B}, x.options().dtype(at::kInt)) : empty_i32(x);
  const Fns f = fns();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "qgait_sph", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    int32_t* tp = with_t ? targ.data_ptr<int32_t>() : nullptr;
    int32_t* sp = with_s ? sarg.data_ptr<int32_t>() : nullptr;
    at::parallel_for(0, NO * C, grain(x.size(0) * T * HW / NO), [&](int64_t b, int64_t e) {
      Scratch s(HW, H);
      for (int64_t it = b; it < e; ++it) {
        const PoolSeq q = seqs[it / C];
        const int64_t c = it % C;
        const scalar_t* src = xp + ((q.item * C + c) * T + q.start) * HW;
        temporal_max<scalar_t>(f, src, q.len, HW, with_t, s);
        if (tp)
          for (int64_t i = 0; i < HW; ++i) tp[it * HW + i] = static_cast<int32_t>(s.idx[i]);
        pyramid<scalar_t>(strips, mode, H, W, s, op + it * B, sp ? sp + it * B : nullptr);
      }
    });
  });
  return {out, targ, sarg};
}

at::Tensor set_pool_hpp_backward_cpu(const at::Tensor& grad, const at::Tensor& targ,
                                     const at::Tensor& sarg, at::IntArrayRef x_shape,
                                     at::IntArrayRef seqL, at::IntArrayRef bins, int64_t mode) {
  const PoolBackward a = check_pool_backward(kSphB, true, grad, targ, &sarg, x_shape, seqL, bins,
                                             mode);
  const auto& strips = a.strips;
  const int64_t H = a.H, W = a.W, B = a.B;
  const bool with_t = a.with_t, with_s = a.with_s;
  const at::Tensor gc = grad.contiguous();
  const at::Tensor tc = with_t ? targ.contiguous() : targ, sc = with_s ? sarg.contiguous() : sarg;
  at::Tensor dx = empty_huge(x_shape, grad.options());
  const Fns f = fns();
  const bool stream = static_cast<int64_t>(dx.nbytes()) >= kStreamBytes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "qgait_sph_bwd", [&] {
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const int32_t* tp = with_t ? tc.data_ptr<int32_t>() : nullptr;
    const int32_t* sp = with_s ? sc.data_ptr<int32_t>() : nullptr;
    scalar_t* dp = dx.data_ptr<scalar_t>();
    backward_rows<scalar_t>(f, dp, a, x_shape[0], stream, tp, [&](int64_t it, Scratch& s) {
      const scalar_t* g = gp + it * B;
      // dL/dz: each mean term spreads g / (rows * W) over its strip (a per-row constant),
      // each max term adds g at its arg-max.
      std::fill(s.rsum.begin(), s.rsum.end(), 0.f);
      if (mode != kMax)
        for (int64_t j = 0; j < B; ++j) {
          const float v = static_cast<float>(g[j]) /
                          static_cast<float>((strips[j].row1 - strips[j].row0) * W);
          for (int32_t h = strips[j].row0; h < strips[j].row1; ++h) s.rsum[h] += v;
        }
      for (int64_t h = 0; h < H; ++h) std::fill_n(s.z.data() + h * W, W, s.rsum[h]);
      if (sp)
        for (int64_t j = 0; j < B; ++j) s.z[sp[it * B + j]] += static_cast<float>(g[j]);
    });
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor> temporal_pool_cpu(const at::Tensor& x, at::IntArrayRef seqL,
                                                     bool need_idx) {
  const auto seqs = pool_sequences(kTp, x, seqL);
  const int64_t C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4), HW = H * W;
  const int64_t NO = static_cast<int64_t>(seqs.size());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({NO, C, H, W}, x.options());
  const bool with_t = need_idx && T > 1;
  at::Tensor targ = with_t ? at::empty({NO, C, H, W}, x.options().dtype(at::kInt)) : empty_i32(x);
  const Fns f = fns();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "qgait_tp", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    int32_t* tp = with_t ? targ.data_ptr<int32_t>() : nullptr;
    at::parallel_for(0, NO * C, grain(x.size(0) * T * HW / NO), [&](int64_t b, int64_t e) {
      Scratch s(HW, H);
      for (int64_t it = b; it < e; ++it) {
        const PoolSeq q = seqs[it / C];
        const int64_t c = it % C;
        temporal_max<scalar_t>(f, xp + ((q.item * C + c) * T + q.start) * HW, q.len, HW, with_t, s);
        for (int64_t i = 0; i < HW; ++i) op[it * HW + i] = static_cast<scalar_t>(s.z[i]);
        if (tp)
          for (int64_t i = 0; i < HW; ++i) tp[it * HW + i] = static_cast<int32_t>(s.idx[i]);
      }
    });
  });
  return {out, targ};
}

at::Tensor temporal_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& targ,
                                      at::IntArrayRef x_shape, at::IntArrayRef seqL) {
  const PoolBackward a = check_pool_backward(kTpB, false, grad, targ, nullptr, x_shape, seqL, {},
                                             kMax);
  const int64_t HW = a.HW;
  const bool with_t = a.with_t;
  const at::Tensor gc = grad.contiguous(), tc = with_t ? targ.contiguous() : targ;
  at::Tensor dx = empty_huge(x_shape, grad.options());
  const Fns f = fns();
  const bool stream = static_cast<int64_t>(dx.nbytes()) >= kStreamBytes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "qgait_tp_bwd", [&] {
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const int32_t* tp = with_t ? tc.data_ptr<int32_t>() : nullptr;
    scalar_t* dp = dx.data_ptr<scalar_t>();
    backward_rows<scalar_t>(f, dp, a, x_shape[0], stream, tp, [&](int64_t it, Scratch& s) {
      for (int64_t i = 0; i < HW; ++i) s.z[i] = static_cast<float>(gp[it * HW + i]);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(qgait, CPU, m) {
  m.impl("set_pool_hpp", &set_pool_hpp_cpu);
  m.impl("set_pool_hpp_backward", &set_pool_hpp_backward_cpu);
  m.impl("temporal_pool", &temporal_pool_cpu);
  m.impl("temporal_pool_backward", &temporal_pool_backward_cpu);
}

}  // namespace qgait
