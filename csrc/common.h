// Shared helpers for the torch glue (never included by .cu files).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

// Every error names the op: QGAIT_CHECK(cond, "soft_fake_quant", "x must be floating, got ", dt)
#define QGAIT_CHECK(cond, op, ...) TORCH_CHECK((cond), "qgait::", op, ": ", __VA_ARGS__)

namespace qgait {

// Dtype codes shared with the raw-pointer CUDA launchers (which cannot see at::ScalarType).
enum DtypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return -1;
  }
}

}  // namespace qgait
