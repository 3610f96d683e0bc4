// Code-domain inference ops of the packed models (CPU; qgait/ops/codes.py documents them and
// holds their pure-PyTorch references):
//   _max_pool_codes     max pooling of int8 / uint8 codes between two packed convolutions
//                       (torch's max_pool3d has no integer kernel; the strided torch.maximum
//                       passes PackedMaxPool3d used took ~0.1 ms per 30-frame sequence)
//   _part_linear_codes  the packed per-part FCs: the input quantized to codes and multiplied
//                       with the integer weights in int32, where the fp32 bmm of dequantized
//                       weights read 2 MB of weights per sequence
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/isa.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace qgait::codes_avx512 {
#include "cpu/codes_kernel.h"
}  // namespace qgait::codes_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace qgait::codes_avx2 {
#include "cpu/codes_kernel.h"
}  // namespace qgait::codes_avx2
#pragma GCC pop_options

namespace qgait::codes_scalar {
#include "cpu/codes_kernel.h"
}  // namespace qgait::codes_scalar

namespace qgait {
namespace {

constexpr const char* kPool = "_max_pool_codes";
constexpr const char* kFc = "_part_linear_codes";

template <typename T>
using PoolRowFn = void (*)(const T*, T*, int64_t, int64_t, const int64_t*, int64_t, int64_t,
                           int64_t, int64_t);

template <typename T>
PoolRowFn<T> pool_row_fn() {
  switch (cpu_isa()) {
    case Isa::AMX:
    case Isa::AVX512: return codes_avx512::pool_row<T>;
    case Isa::AVX2: return codes_avx2::pool_row<T>;
    default: return codes_scalar::pool_row<T>;
  }
}

using PartFcFn = void (*)(const int16_t*, const int8_t*, int64_t, int64_t, float, const float*,
                          float*, int64_t);

PartFcFn part_fc_fn() {
  switch (cpu_isa()) {
    case Isa::AMX:
    case Isa::AVX512: return codes_avx512::part_fc;
    case Isa::AVX2: return codes_avx2::part_fc;
    default: return codes_scalar::part_fc;
  }
}

// x: [N, C, T, H, W] int8 / uint8 (any layout; read channels-last), no padding, dilation 1,
// floor sizes. Returns [N, C, T', H', W'] codes in channels_last_3d memory order.
at::Tensor max_pool_codes_cpu(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride) {
  QGAIT_CHECK(x.scalar_type() == at::kByte || x.scalar_type() == at::kChar, kPool,
              "x must be int8 or uint8 codes, got ", x.scalar_type());
  QGAIT_CHECK(x.dim() == 5, kPool, "x must be [N, C, T, H, W], got ", x.sizes());
  QGAIT_CHECK(kernel.size() == 3 && stride.size() == 3, kPool,
              "kernel and stride must have 3 values, got ", kernel, " and ", stride);
  int64_t kk[3], st[3], out[3];
  for (int i = 0; i < 3; ++i) {
    kk[i] = kernel[i];
    st[i] = stride[i];
    QGAIT_CHECK(kk[i] >= 1 && st[i] >= 1, kPool, "kernel and stride must be >= 1, got ", kernel,
                " and ", stride);
    QGAIT_CHECK(x.size(2 + i) >= kk[i], kPool, "input ", x.sizes(), " is smaller than kernel ",
                kernel);
    out[i] = (x.size(2 + i) - kk[i]) / st[i] + 1;
  }
  const int64_t N = x.size(0), C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast3d);
  at::Tensor y = at::empty({N, C, out[0], out[1], out[2]},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  if (y.numel() == 0) return y;
  // channels-last element steps of the input
  const int64_t sw = C, sh = W * C, stt = H * W * C, sn = T * H * W * C;
  const int64_t rows = N * out[0] * out[1];
  const int64_t row_bytes = out[2] * C * kk[0] * kk[1] * kk[2];
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, row_bytes));
  auto run = [&](auto* src, auto* dst) {
    using T_ = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
    const auto fn = pool_row_fn<T_>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t oh = r % out[1], ot = (r / out[1]) % out[0], n = r / (out[1] * out[0]);
        const T_* s = src + n * sn + ot * st[0] * stt + oh * st[1] * sh;
        fn(s, dst + r * out[2] * C, out[2], C, kk, stt, sh, sw, st[2]);
      }
    });
  };
  if (x.scalar_type() == at::kByte) {
    run(xc.const_data_ptr<uint8_t>(), y.data_ptr<uint8_t>());
  } else {
    run(xc.const_data_ptr<int8_t>(), y.data_ptr<int8_t>());
  }
  return y;
}

// x: [N, C_in, P] float32 (any strides); a_scale: the input step (one float32 value, finite,
// > 0); codes on [qn, qp] (qn >= -128, qp <= 255); w: [P, C_out, C_in] int8; w_scale: [P * C_out]
// float32. Returns [N, C_out, P] float32: float(sum codes * w) * a_scale * w_scale, or NaN for
// every output of an (n, p) whose input holds a NaN (as the fp32 product gives).
at::Tensor part_linear_codes_cpu(const at::Tensor& x, const at::Tensor& a_scale, int64_t qn,
                                 int64_t qp, const at::Tensor& w, const at::Tensor& w_scale) {
  QGAIT_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3, kFc,
              "x must be float32 [N, C_in, P], got ", x.scalar_type(), " ", x.sizes());
  QGAIT_CHECK(w.scalar_type() == at::kChar && w.dim() == 3, kFc,
              "w must be int8 [P, C_out, C_in], got ", w.scalar_type(), " ", w.sizes());
  const int64_t N = x.size(0), cin = x.size(1), P = x.size(2), cout = w.size(1);
  QGAIT_CHECK(w.size(0) == P && w.size(2) == cin, kFc, "w ", w.sizes(), " does not match x ",
              x.sizes(), " (expected [", P, ", C_out, ", cin, "])");
  QGAIT_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == P * cout, kFc,
              "w_scale must be float32 with ", P * cout, " values, got ", w_scale.scalar_type(),
              " ", w_scale.sizes());
  QGAIT_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.numel() == 1, kFc,
              "a_scale must be one float32 value, got ", a_scale.scalar_type(), " ",
              a_scale.sizes());
  QGAIT_CHECK(-128 <= qn && qn < qp && qp <= 255, kFc, "the code grid [", qn, ", ", qp,
              "] must lie in [-128, 255]");
  QGAIT_CHECK(cin <= 65793, kFc, "at most 65793 input channels (int32 sums), got ", cin);
  const float s = a_scale.item<float>();
  QGAIT_CHECK(std::isfinite(s) && s > 0.f, kFc, "a_scale must be finite and > 0, got ", s);
  const float r = 1.0f / s;  // rounded once, as soft_fake_quant does
  const float lo = static_cast<float>(qn), hi = static_cast<float>(qp);
  const at::Tensor wc = w.contiguous(), wsc = w_scale.contiguous();
  at::Tensor y = at::empty({N, cout, P}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const float* xp = x.const_data_ptr<float>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int8_t* wp = wc.const_data_ptr<int8_t>();
  const float* wsp = wsc.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto fn = part_fc_fn();
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, cin * cout));
  at::parallel_for(0, N * P, grain, [&](int64_t b, int64_t e) {
    std::vector<int16_t> codes(cin);
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / P, p = item % P;
      const float* xi = xp + n * xs0 + p * xs2;
      float* yo = yp + n * cout * P + p;
      bool nan = false;
      for (int64_t i = 0; i < cin; ++i) {
        const float v = xi[i * xs1] * r;
        nan |= v != v;
        codes[i] = static_cast<int16_t>(std::nearbyint(std::min(hi, std::max(lo, v))));
      }
      if (nan) {
        for (int64_t o = 0; o < cout; ++o) yo[o * P] = std::numeric_limits<float>::quiet_NaN();
      } else {
        fn(codes.data(), wp + p * cout * cin, cin, cout, s, wsp + p * cout, yo, P);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qgait, CPU, m) {
  m.impl("_max_pool_codes", &max_pool_codes_cpu);
  m.impl("_part_linear_codes", &part_linear_codes_cpu);
}

}  // namespace qgait
