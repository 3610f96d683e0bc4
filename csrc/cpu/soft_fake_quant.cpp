// CPU soft fake-quant: forward reads x once and writes y once; backward reads (grad_y, x)
// once, writes grad_x and reduces the step gradient with deterministic partials (the work is
// cut into fixed chunks whatever the thread count, each chunk owns a partial per step, and the
// partials are summed in chunk order). AVX-512 / AVX2 / scalar code paths are compiled into
// one binary and chosen at run time (cpu/isa.h). fp16/bf16 are converted to fp32 in small
// stack blocks, so the math is always fp32 and memory is still touched once.
#include <immintrin.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/alloc.h"
#include "cpu/isa.h"
#include "soft_fake_quant.h"

// ---- the kernel body, once per ISA ------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace qgait::sfq_avx512 {
#define QGAIT_VEC 512
#include "cpu/vec.h"
#include "cpu/soft_fake_quant_kernel.h"
#undef QGAIT_VEC
}  // namespace qgait::sfq_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace qgait::sfq_avx2 {
#define QGAIT_VEC 256
#include "cpu/vec.h"
#include "cpu/soft_fake_quant_kernel.h"
#undef QGAIT_VEC
}  // namespace qgait::sfq_avx2
#pragma GCC pop_options

namespace qgait::sfq_scalar {
#define QGAIT_VEC 1
#include "cpu/vec.h"
#include "cpu/soft_fake_quant_kernel.h"
#undef QGAIT_VEC
}  // namespace qgait::sfq_scalar

namespace qgait {
namespace {

constexpr const char* kFwd = "soft_fake_quant";
constexpr const char* kBwd = "soft_fake_quant_backward";

using FwdFn = void (*)(const float*, float*, int64_t, const float*, const float*,
                       const SfqParams&);
using BwdFn = float (*)(const float*, const float*, float*, int64_t, const float*, const float*,
                        float*, const SfqParams&);

FwdFn fwd_fn(bool pe) {
  switch (cpu_isa()) {
    case Isa::AMX:
    case Isa::AVX512: return pe ? sfq_avx512::sfq_fwd<true> : sfq_avx512::sfq_fwd<false>;
    case Isa::AVX2: return pe ? sfq_avx2::sfq_fwd<true> : sfq_avx2::sfq_fwd<false>;
    default: return pe ? sfq_scalar::sfq_fwd<true> : sfq_scalar::sfq_fwd<false>;
  }
}

BwdFn bwd_fn(bool pe) {
  switch (cpu_isa()) {
    case Isa::AMX:
    case Isa::AVX512: return pe ? sfq_avx512::sfq_bwd<true> : sfq_avx512::sfq_bwd<false>;
    case Isa::AVX2: return pe ? sfq_avx2::sfq_bwd<true> : sfq_avx2::sfq_bwd<false>;
    default: return pe ? sfq_scalar::sfq_bwd<true> : sfq_scalar::sfq_bwd<false>;
  }
}

// fp16/bf16 pass through fp32 stack blocks of this many elements.
constexpr int64_t kBlock = 1024;
// Fixed chunk of the backward reduction (elements); independent of the thread count.
constexpr int64_t kChunk = 1 << 16;
constexpr int64_t kGrain = 1 << 14;

// Steps and their fp32 reciprocals r = 1/s (rounded once, as torch's fake-quant ops do).
// The scale lives on the CPU here, so validating its values costs no device sync.
void load_steps(const char* op, const at::Tensor& scale, std::vector<float>& s,
                std::vector<float>& r) {
  const at::Tensor sc = scale.contiguous();
  const float* p = sc.data_ptr<float>();
  const int64_t n = sc.numel();
  s.resize(n);
  r.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    QGAIT_CHECK(std::isfinite(p[i]) && p[i] > 0.f, op,
                "scale must be finite and > 0, got ", p[i], " at index ", i);
    s[i] = p[i];
    r[i] = 1.0f / p[i];
  }
}

template <typename T>
void fwd_span(FwdFn fn, const T* x, T* y, int64_t n, const float* sp, const float* rp,
              bool pe, const SfqParams& P) {
  if constexpr (std::is_same_v<T, float>) {
    fn(x, y, n, sp, rp, P);
  } else {
    float xb[kBlock], yb[kBlock];
    for (int64_t i = 0; i < n; i += kBlock) {
      const int64_t m = std::min(kBlock, n - i);
      for (int64_t j = 0; j < m; ++j) xb[j] = static_cast<float>(x[i + j]);
      fn(xb, yb, m, pe ? sp + i : sp, pe ? rp + i : rp, P);
      for (int64_t j = 0; j < m; ++j) y[i + j] = static_cast<T>(yb[j]);
    }
  }
}

template <typename T>
float bwd_span(BwdFn fn, const T* gy, const T* x, T* dx, int64_t n, const float* sp,
               const float* rp, float* acc, bool pe, const SfqParams& P) {
  if constexpr (std::is_same_v<T, float>) {
    return fn(gy, x, dx, n, sp, rp, acc, P);
  } else {
    float gb[kBlock], xb[kBlock], db[kBlock];
    float total = 0.f;
    for (int64_t i = 0; i < n; i += kBlock) {
      const int64_t m = std::min(kBlock, n - i);
      for (int64_t j = 0; j < m; ++j) {
        gb[j] = static_cast<float>(gy[i + j]);
        xb[j] = static_cast<float>(x[i + j]);
      }
      total += fn(gb, xb, dx ? db : nullptr, m, pe ? sp + i : sp, pe ? rp + i : rp,
                  pe ? acc + i : nullptr, P);
      if (dx)
        for (int64_t j = 0; j < m; ++j) dx[i + j] = static_cast<T>(db[j]);
    }
    return total;
  }
}

at::Tensor soft_fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t axis,
                               int64_t qn, int64_t qp, double k, bool soft, double /*gamma*/) {
  check_sfq_args(kFwd, x, scale, axis, qn, qp, k);
  std::vector<float> s, r;
  load_steps(kFwd, scale, s, r);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = cpu::empty_like_huge(xc);  // cpu/alloc.h: no 4 KiB faults per call
  const int64_t N = xc.numel();
  if (N == 0) return y;
  const SfqParams P = make_sfq_params(qn, qp, k, soft);
  const SfqLayout L = sfq_layout(xc, axis);
  // Innermost quantized axis: a step per element inside rows of C (vector loads of steps).
  const bool pe = axis >= 0 && L.inner == 1;
  const FwdFn fn = fwd_fn(pe);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "qgait_sfq", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (pe) {
      at::parallel_for(0, L.outer, std::max<int64_t>(1, kGrain / L.C), [&](int64_t b, int64_t e) {
        for (int64_t o = b; o < e; ++o)
          fwd_span<scalar_t>(fn, xp + o * L.C, yp + o * L.C, L.C, s.data(), r.data(), true, P);
      });
    } else {
      at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
        // [b, e) cut at row boundaries: each row (o, c) has one step.
        for (int64_t pos = b; pos < e;) {
          const int64_t row = pos / L.inner;
          const int64_t end = std::min(e, (row + 1) * L.inner);
          const int64_t c = row % L.C;
          fwd_span<scalar_t>(fn, xp + pos, yp + pos, end - pos, &s[c], &r[c], false, P);
          pos = end;
        }
      });
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> soft_fake_quant_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, int64_t axis,
    int64_t qn, int64_t qp, double k, bool soft, double gamma, bool need_dx, bool need_ds) {
  check_sfq_backward_args(kBwd, grad_y, x, scale, axis, qn, qp, k);
  std::vector<float> s, r;
  load_steps(kBwd, scale, s, r);
  const at::Tensor xc = x.contiguous(), gc = grad_y.contiguous();
  at::Tensor dx = need_dx ? cpu::empty_like_huge(xc) : at::empty({0}, x.options());
  at::Tensor ds = need_ds ? at::zeros(scale.sizes(), scale.options()) : at::empty({0}, scale.options());
  const int64_t N = xc.numel();
  if (N == 0 || (!need_dx && !need_ds)) return {dx, ds};
  const SfqParams P = make_sfq_params(qn, qp, k, soft);
  const SfqLayout L = sfq_layout(xc, axis);
  const bool pe = axis >= 0 && L.inner == 1;
  const BwdFn fn = bwd_fn(pe);
  float* dsp = need_ds ? ds.data_ptr<float>() : nullptr;
  if (!pe && L.inner >= 256) {
    // Rows (o, c) of x viewed as [outer * C, inner], each cut into pieces of at most kChunk
    // elements: one work item and one partial per piece, so the partials cost one float per
    // piece (not per chunk and channel), and every piece is reduced in fp32 lanes over at
    // most kChunk elements.
    const int64_t R = L.outer * L.C;
    const int64_t ppr = (L.inner + kChunk - 1) / kChunk;  // pieces per row
    const int64_t items = R * ppr;
    std::vector<float> partial(need_ds ? items : 0, 0.f);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "qgait_sfq_bwd", [&] {
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      const scalar_t* gp = gc.data_ptr<scalar_t>();
      scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
      const int64_t grain = std::max<int64_t>(1, kChunk / std::min(L.inner, kChunk));
      at::parallel_for(0, items, grain, [&](int64_t b, int64_t e) {
        for (int64_t it = b; it < e; ++it) {
          const int64_t row = it / ppr, piece = it % ppr, c = row % L.C;
          const int64_t lo = row * L.inner + piece * kChunk;
          const int64_t n = std::min(kChunk, L.inner - piece * kChunk);
          const float t = bwd_span<scalar_t>(fn, gp + lo, xp + lo, dxp ? dxp + lo : nullptr, n,
                                             &s[c], &r[c], nullptr, false, P);
          if (need_ds) partial[it] = t;
        }
      });
    });
    if (need_ds) {
      // Fixed-order sum per step over its rows and pieces (fp64), scaled by gamma.
      for (int64_t c = 0; c < L.C; ++c) {
        double acc = 0.0;
        for (int64_t o = 0; o < L.outer; ++o)
          for (int64_t q = 0; q < ppr; ++q) acc += partial[(o * L.C + c) * ppr + q];
        dsp[c] = static_cast<float>(acc * gamma);
      }
    }
    return {dx, ds};
  }
  // Short rows: fixed chunks of elements, each with one partial per step (a chunk spans
  // several rows); in PE mode chunks of whole rows, whose accumulator is one [C] vector.
  const int64_t rows_per_chunk = pe ? std::max<int64_t>(1, kChunk / L.C) : 0;
  const int64_t chunk = pe ? rows_per_chunk * L.C : kChunk;
  const int64_t nchunks = (N + chunk - 1) / chunk;
  std::vector<float> partial(need_ds ? nchunks * L.C : 0, 0.f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "qgait_sfq_bwd", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      std::vector<float> scratch(pe ? L.C : 0);
      for (int64_t ch = b; ch < e; ++ch) {
        const int64_t lo = ch * chunk, hi = std::min(N, lo + chunk);
        float* part = need_ds ? partial.data() + ch * L.C : nullptr;
        if (pe) {
          // Rows of C, one accumulator per element of the row. scratch is only a sink
          // when the step gradient is not needed.
          float* acc = part ? part : scratch.data();
          for (int64_t pos = lo; pos < hi; pos += L.C)
            bwd_span<scalar_t>(fn, gp + pos, xp + pos, dxp ? dxp + pos : nullptr, L.C, s.data(),
                               r.data(), acc, true, P);
        } else {
          for (int64_t pos = lo; pos < hi;) {
            const int64_t row = pos / L.inner;
            const int64_t end = std::min(hi, (row + 1) * L.inner);
            const int64_t c = row % L.C;
            const float t = bwd_span<scalar_t>(fn, gp + pos, xp + pos, dxp ? dxp + pos : nullptr,
                                               end - pos, &s[c], &r[c], nullptr, false, P);
            if (part) part[c] += t;
            pos = end;
          }
        }
      }
    });
  });
  if (need_ds) {
    // Fixed-order sum of the chunk partials (fp64 across chunks), scaled by gamma.
    for (int64_t c = 0; c < L.C; ++c) {
      double acc = 0.0;
      for (int64_t ch = 0; ch < nchunks; ++ch) acc += partial[ch * L.C + c];
      dsp[c] = static_cast<float>(acc * gamma);
    }
  }
  return {dx, ds};
}

}  // namespace

TORCH_LIBRARY_IMPL(qgait, CPU, m) {
  m.impl("soft_fake_quant", &soft_fake_quant_cpu);
  m.impl("soft_fake_quant_backward", &soft_fake_quant_backward_cpu);
}

}  // namespace qgait
