// Shared pieces of the packed low-bit Conv3d (qgait/ops/packed_conv3d.py documents the math):
// the argument checks used by every C++ backend (so each error reads the same) and the
// geometry / epilogue parameters of one call.
#pragma once
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "common.h"

namespace qgait {

constexpr const char* kPackedConv = "packed_conv3d";

// out_mode: what the op returns.
enum PackedOutMode : int64_t { kOutFloat = 0, kOutRequant = 1, kOutAcc = 2 };
// act: the activation fused after the (bias, folded BatchNorm) affine.
enum PackedAct : int64_t { kActNone = 0, kActRelu = 1, kActLeaky = 2 };

// The kernel path of the calling thread's last CPU packed_conv3d call ("none" before any):
// "scalar", "vnni", "avx2-maddubs", "avx2-maddubs1", "avx2-madd16", "avx2-avxvnni", the
// Winograd ones "vnni-winograd", "avx2-maddubs-winograd", "avx2-maddubs1-winograd"
// (csrc/cpu/packed_conv3d.cpp).
std::string packed_conv3d_cpu_path();

struct ConvGeom {
  int64_t N, C, T, H, W;       // input
  int64_t Co, kT, kH, kW;      // weight
  int64_t sT, sH, sW, pT, pH, pW, dT, dH, dW;
  int64_t To, Ho, Wo;          // output
};

inline int64_t conv_out(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

inline void check_vec3(const char* name, at::IntArrayRef v, int64_t lo) {
  QGAIT_CHECK(v.size() == 3, kPackedConv, name, " must have 3 values, got ", v.size());
  for (auto e : v) QGAIT_CHECK(e >= lo, kPackedConv, name, " values must be >= ", lo, ", got ", v);
}

inline void check_channel_vec(const char* name, const std::optional<at::Tensor>& t, int64_t Co,
                              const at::Tensor& ref) {
  if (!t.has_value()) return;
  QGAIT_CHECK(t->scalar_type() == at::kFloat, kPackedConv, name, " must be float32, got ",
              t->scalar_type());
  QGAIT_CHECK(t->dim() == 1 && t->size(0) == Co, kPackedConv, name, " must have shape [", Co,
              "], got ", t->sizes());
  QGAIT_CHECK(t->device() == ref.device(), kPackedConv, name, " is on ", t->device(),
              " but x is on ", ref.device());
}

// Checks every argument (shapes, dtypes, devices, grids) and returns the geometry. Values of
// the scales (finite, > 0) are checked by the backend where that costs no device sync.
inline ConvGeom check_packed_conv3d_args(
    const at::Tensor& x, const at::Tensor& x_scale, int64_t in_qn, int64_t in_qp,
    const at::Tensor& w_packed, const at::Tensor& w_scale, int64_t w_bits, int64_t c_in,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_scale,
    const std::optional<at::Tensor>& bn_shift, int64_t act, int64_t out_mode,
    const std::optional<at::Tensor>& out_scale, int64_t out_qn, int64_t out_qp) {
  QGAIT_CHECK(w_bits == 8 || w_bits == 4, kPackedConv, "w_bits must be 8 or 4, got ", w_bits);
  const auto wdt = w_bits == 8 ? at::kChar : at::kByte;
  QGAIT_CHECK(w_packed.scalar_type() == wdt, kPackedConv, "w_bits=", w_bits,
              " needs a packed weight of dtype ", wdt, " (", w_bits == 8 ? "one int8 per value"
              : "two int4 per byte", "), got ", w_packed.scalar_type());
  QGAIT_CHECK(c_in >= 1, kPackedConv, "c_in must be >= 1, got ", c_in);
  const int64_t cb = w_bits == 8 ? c_in : (c_in + 1) / 2;
  QGAIT_CHECK(w_packed.dim() == 5 && w_packed.size(4) == cb && w_packed.size(0) >= 1 &&
                  w_packed.size(1) >= 1 && w_packed.size(2) >= 1 && w_packed.size(3) >= 1,
              kPackedConv, "packed weight must have shape [C_out, kT, kH, kW, ", cb,
              "] for c_in=", c_in, " and w_bits=", w_bits, ", got ", w_packed.sizes());
  QGAIT_CHECK(x.dim() == 5, kPackedConv, "x must be 5-D [N, C_in, T, H, W], got ", x.sizes());
  QGAIT_CHECK(x.size(1) == c_in, kPackedConv, "x has ", x.size(1),
              " input channels but the weight expects ", c_in);
  const auto xdt = x.scalar_type();
  QGAIT_CHECK(xdt == at::kFloat || xdt == at::kChar || xdt == at::kByte || xdt == at::kBool,
              kPackedConv, "x must be float32 (quantized on the fly), int8 / uint8 (already "
              "quantized) or bool (binary), got ", xdt);
  QGAIT_CHECK(in_qn < in_qp && in_qn >= -128 && in_qp <= 255 && (in_qn >= 0 || in_qp <= 127),
              kPackedConv, "input grid [", in_qn, ", ", in_qp, "] is not an 8-bit grid");
  QGAIT_CHECK(xdt != at::kChar || in_qn < 0, kPackedConv,
              "an int8 x needs a signed input grid, got [", in_qn, ", ", in_qp, "]");
  QGAIT_CHECK((xdt != at::kByte && xdt != at::kBool) || in_qn >= 0, kPackedConv,
              "a uint8 / bool x needs an unsigned input grid, got [", in_qn, ", ", in_qp, "]");
  QGAIT_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.numel() == 1, kPackedConv,
              "x_scale must be a float32 tensor with one element, got ", x_scale.scalar_type(),
              " ", x_scale.sizes());
  const int64_t Co = w_packed.size(0);
  QGAIT_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 &&
                  w_scale.size(0) == Co,
              kPackedConv, "w_scale must be float32 of shape [", Co, "], got ",
              w_scale.scalar_type(), " ", w_scale.sizes());
  for (const at::Tensor* t : {&x_scale, &w_packed, &w_scale})
    QGAIT_CHECK(t->device() == x.device(), kPackedConv, "all tensors must be on ", x.device(),
                ", got one on ", t->device());
  check_channel_vec("bias", bias, Co, x);
  check_channel_vec("bn_scale", bn_scale, Co, x);
  check_channel_vec("bn_shift", bn_shift, Co, x);
  QGAIT_CHECK(bn_scale.has_value() == bn_shift.has_value(), kPackedConv,
              "bn_scale and bn_shift must be given together");
  check_vec3("stride", stride, 1);
  check_vec3("padding", padding, 0);
  check_vec3("dilation", dilation, 1);
  QGAIT_CHECK(act == kActNone || act == kActRelu || act == kActLeaky, kPackedConv,
              "act must be 0 (none), 1 (relu) or 2 (leaky relu), got ", act);
  QGAIT_CHECK(out_mode == kOutFloat || out_mode == kOutRequant || out_mode == kOutAcc,
              kPackedConv, "out_mode must be 0 (float), 1 (requantized) or 2 (int32 "
              "accumulators), got ", out_mode);
  if (out_mode == kOutRequant) {
    QGAIT_CHECK(out_scale.has_value() && out_scale->scalar_type() == at::kFloat &&
                    out_scale->numel() == 1 && out_scale->device() == x.device(),
                kPackedConv, "requantized output needs a float32 out_scale with one element on ",
                x.device());
    QGAIT_CHECK(out_qn < out_qp && out_qn >= -128 && out_qp <= 255 &&
                    (out_qn >= 0 || out_qp <= 127),
                kPackedConv, "output grid [", out_qn, ", ", out_qp, "] is not an 8-bit grid");
  }
  ConvGeom g{};
  g.N = x.size(0); g.C = c_in; g.T = x.size(2); g.H = x.size(3); g.W = x.size(4);
  g.Co = Co; g.kT = w_packed.size(1); g.kH = w_packed.size(2); g.kW = w_packed.size(3);
  g.sT = stride[0]; g.sH = stride[1]; g.sW = stride[2];
  g.pT = padding[0]; g.pH = padding[1]; g.pW = padding[2];
  g.dT = dilation[0]; g.dH = dilation[1]; g.dW = dilation[2];
  g.To = conv_out(g.T, g.kT, g.sT, g.pT, g.dT);
  g.Ho = conv_out(g.H, g.kH, g.sH, g.pH, g.dH);
  g.Wo = conv_out(g.W, g.kW, g.sW, g.pW, g.dW);
  QGAIT_CHECK(g.To >= 1 && g.Ho >= 1 && g.Wo >= 1, kPackedConv, "input ", x.sizes(),
              " is too small for kernel [", g.kT, ", ", g.kH, ", ", g.kW, "] with padding ",
              padding, " and dilation ", dilation);
  return g;
}

// Output tensor of the op: [N, C_out, T', H', W'] in channels_last_3d memory order (the
// kernels write [N, T', H', W', C_out]), so that a requantized output feeds the next packed
// layer without a layout change.
inline at::Tensor packed_conv3d_output(const at::Tensor& x, const ConvGeom& g, int64_t out_mode,
                                       int64_t out_qn) {
  const auto dt = out_mode == kOutFloat ? at::kFloat
                  : out_mode == kOutAcc ? at::kInt
                  : (out_qn < 0 ? at::kChar : at::kByte);
  return at::empty({g.N, g.Co, g.To, g.Ho, g.Wo},
                   x.options().dtype(dt).memory_format(at::MemoryFormat::ChannelsLast3d));
}

}  // namespace qgait
