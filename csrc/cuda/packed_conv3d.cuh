// Raw-pointer launcher of the CUDA packed low-bit Conv3d (no torch types: this header is shared
// by packed_conv3d.cu, compiled by nvcc, and the torch glue packed_conv3d_bind.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace qgait {

// Input dtype codes.
enum PackedInDtype : int { kInF32 = 0, kInS8 = 1, kInU8 = 2 };

struct PackedConvParams {
  // input [N, C, T, H, W] with element strides (any memory order)
  const void* x;
  int x_dtype;
  int64_t sx[5];
  int N, C, T, H, W;
  const float* x_scale;  // [1], device; every scale is checked on the device (finite, > 0)
  int in_qn, in_qp;
  // weight: packed [Co, kT, kH, kW, C] int8 (w_bits 8) or [.., ceil(C/2)] bytes (w_bits 4)
  const uint8_t* w;
  int w_bits;
  int Co, kT, kH, kW;
  int sT, sH, sW, pT, pH, pW, dT, dH, dW;
  int To, Ho, Wo;
  // epilogue ([Co] fp32 device pointers; bias / bn may be null)
  const float* w_scale;
  const float* bias;
  const float* bn_scale;
  const float* bn_shift;
  int act;  // 0 none, 1 relu, 2 leaky relu
  float slope;
  int out_mode;            // 0 fp32, 1 requantized (int8 if out_qn < 0 else uint8), 2 int32
  const float* out_scale;  // [1], device (out_mode 1)
  int out_qn, out_qp;
  void* y;  // output [N, To, Ho, Wo, Co]
  // scratch from packed_conv3d_scratch_bytes (device memory, 16-byte aligned)
  void* scratch;
};

// Bytes of scratch the launcher needs: the padded channels-last int8 input (channels padded
// to 32 only for C_in > 16).
size_t packed_conv3d_scratch_bytes(const PackedConvParams& p);

// Enqueues the whole op on `stream`; returns the launch error, if any.
cudaError_t packed_conv3d_launch(const PackedConvParams& p, cudaStream_t stream);

}  // namespace qgait
