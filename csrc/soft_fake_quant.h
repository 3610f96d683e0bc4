// Shared pieces of the soft fake-quant op: argument checks (used by every C++ backend, so
// each error reads the same) and the precomputed constants of the math.
#pragma once
#include <cmath>
#include <cstdint>

#include "common.h"

namespace qgait {

// Constants of one call. With t = tanh(k (f - 1/2)), f = c - floor(c):
//   sigma(c) = floor(c) + 1/2 + t * tanh_scale,   tanh_scale = 1 / (2 tanh(k/2))
//   g(c)     = g_scale * (1 - t^2),               g_scale    = (k/2) / tanh(k/2)
// k = 0 is the straight-through limit (sigma(c) = c, g = 1), handled as its own case.
struct SfqParams {
  float qn, qp, k, tanh_scale, g_scale;
  bool soft, k0;
};

inline SfqParams make_sfq_params(int64_t qn, int64_t qp, double k, bool soft) {
  SfqParams p{};
  p.qn = static_cast<float>(qn);
  p.qp = static_cast<float>(qp);
  p.k = static_cast<float>(k);
  p.soft = soft;
  p.k0 = (k == 0.0);
  if (!p.k0) {
    const double th = std::tanh(k / 2.0);
    p.tanh_scale = static_cast<float>(0.5 / th);
    // (k/2)/tanh(k/2) -> 1 + k^2/12 as k -> 0; the series avoids 0/0 for tiny k.
    p.g_scale = static_cast<float>(k < 1e-3 ? 1.0 + k * k / 12.0 : (k / 2.0) / th);
  } else {
    p.tanh_scale = 0.f;
    p.g_scale = 1.f;
  }
  return p;
}

// x viewed as [outer, C, inner]: the step of element (o, c, i) is scale[c].
struct SfqLayout {
  int64_t outer, C, inner;
};

inline SfqLayout sfq_layout(const at::Tensor& x, int64_t axis) {
  if (axis < 0) return {1, 1, x.numel()};
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= x.size(d);
  for (int64_t d = axis + 1; d < x.dim(); ++d) inner *= x.size(d);
  return {outer, x.size(axis), inner};
}

inline void check_sfq_args(const char* op, const at::Tensor& x, const at::Tensor& scale,
                           int64_t axis, int64_t qn, int64_t qp, double k) {
  QGAIT_CHECK(dtype_code(x.scalar_type()) >= 0, op,
              "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  QGAIT_CHECK(scale.scalar_type() == at::kFloat, op, "scale must be float32, got ",
              scale.scalar_type());
  QGAIT_CHECK(scale.device() == x.device(), op, "x (", x.device(), ") and scale (",
              scale.device(), ") must be on the same device");
  QGAIT_CHECK(qn < qp && qn >= -128 && qp <= 255, op, "invalid grid [", qn, ", ", qp,
              "]: expected qn < qp within [-128, 255] (2..8 bits)");
  QGAIT_CHECK(std::isfinite(k) && k >= 0.0, op, "temperature k must be finite and >= 0, got ", k);
  if (axis < 0) {
    QGAIT_CHECK(axis == -1 && scale.numel() == 1, op,
                "per-tensor quantization (axis=-1) needs a scale with one element, got shape ",
                scale.sizes());
  } else {
    QGAIT_CHECK(axis < x.dim(), op, "axis ", axis, " is out of range for x with ", x.dim(),
                " dims");
    QGAIT_CHECK(scale.dim() == 1 && scale.size(0) == x.size(axis), op,
                "per-channel scale must have shape [", x.size(axis), "] (x.shape[", axis,
                "]), got ", scale.sizes());
  }
}

// The backward's checks: the forward's, plus grad_y shaped and typed like x.
inline void check_sfq_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                    const at::Tensor& scale, int64_t axis, int64_t qn, int64_t qp,
                                    double k) {
  check_sfq_args(op, x, scale, axis, qn, qp, k);
  QGAIT_CHECK(grad_y.sizes() == x.sizes(), op, "grad_y shape ", grad_y.sizes(),
              " does not match x shape ", x.sizes());
  QGAIT_CHECK(grad_y.scalar_type() == x.scalar_type(), op, "grad_y dtype ",
              grad_y.scalar_type(), " does not match x dtype ", x.scalar_type());
}

}  // namespace qgait
