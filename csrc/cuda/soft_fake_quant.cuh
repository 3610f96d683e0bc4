// CUDA soft fake-quant launchers: raw pointers, ints and a stream, no torch types (the torch
// glue is soft_fake_quant_bind.cpp). The math is in qgait/ops/soft_quant.py.
//
// x is viewed as [outer, C, inner]: element (o, c, i) uses the step scale[c] (per tensor:
// outer = C = 1, inner = numel). Buffers are contiguous and on the device of `stream`.
//
// Step values are validated on the device (finite and > 0), so no launcher syncs the host: the
// first thread to find a bad step prints "qgait::soft_fake_quant: scale[c] = v; ..." (once per
// process) and trips a device-side assert, which surfaces as "CUDA error: device-side assert triggered" at the next
// synchronizing call (the CUDA context is then unusable, as after torch's own index asserts).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace qgait::cuda {

// Element dtypes, equal to qgait::DtypeCode (csrc/common.h; the bind static_asserts it).
constexpr int kDtypeF32 = 0, kDtypeF16 = 1, kDtypeBF16 = 2;

// Constants of one call, the plain twin of qgait::SfqParams (which sits behind torch headers).
struct SfqConsts {
  float qn, qp, k, tanh_scale, g_scale;
  bool soft, k0;
};

// y = fake_quant(x). Reads x once, writes y once.
cudaError_t sfq_forward_cuda(const void* x, void* y, const float* scale, int dtype,
                             int64_t outer, int64_t C, int64_t inner, const SfqConsts& p,
                             cudaStream_t stream);

// Floats of device workspace the step gradient of sfq_backward_cuda needs (its partials).
int64_t sfq_backward_workspace(int64_t outer, int64_t C, int64_t inner);

// One pass over (grad_y, x): writes dx (if dx != nullptr) and, if ds != nullptr, the step
// gradient ds[C] = gamma * sum of the per-element terms, through `workspace`
// (sfq_backward_workspace floats). The sum is deterministic: fixed per-block partials, then
// a fixed-order sum per step; no float atomics.
cudaError_t sfq_backward_cuda(const void* grad_y, const void* x, void* dx, float* ds,
                              float* workspace, const float* scale, int dtype, int64_t outer,
                              int64_t C, int64_t inner, const SfqConsts& p, double gamma,
                              cudaStream_t stream);

}  // namespace qgait::cuda
