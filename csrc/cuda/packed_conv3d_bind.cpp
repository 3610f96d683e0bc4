// Torch glue of the CUDA packed Conv3d: the shared argument checks, output and scratch
// allocation, then the raw-pointer launcher of packed_conv3d.cu on the current stream.
// Scale values (finite, > 0) are checked by the kernels (a device-side assert, as the soft
// fake-quant's steps): reading them here would sync the host.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/packed_conv3d.cuh"
#include "packed_conv3d.h"

namespace qgait {
namespace {

const float* opt_ptr(const std::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->contiguous();
  return keep.data_ptr<float>();
}

at::Tensor packed_conv3d_cuda(const at::Tensor& x, const at::Tensor& x_scale, int64_t in_qn,
                              int64_t in_qp, const at::Tensor& w_packed,
                              const at::Tensor& w_scale, int64_t w_bits, int64_t c_in,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& bn_scale,
                              const std::optional<at::Tensor>& bn_shift, int64_t act,
                              double neg_slope, int64_t out_mode,
                              const std::optional<at::Tensor>& out_scale, int64_t out_qn,
                              int64_t out_qp) {
  const ConvGeom g = check_packed_conv3d_args(x, x_scale, in_qn, in_qp, w_packed, w_scale, w_bits,
                                              c_in, stride, padding, dilation, bias, bn_scale,
                                              bn_shift, act, out_mode, out_scale, out_qn, out_qp);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = packed_conv3d_output(x, g, out_mode, out_qn);
  if (x.numel() == 0 || y.numel() == 0) return y;
  at::Tensor wk = w_packed.contiguous(), wsk = w_scale.contiguous(), xsk = x_scale.contiguous();
  at::Tensor bk, gk, sk, ok;
  PackedConvParams p{};
  p.x = x.data_ptr();
  p.x_dtype = x.scalar_type() == at::kFloat ? kInF32 : x.scalar_type() == at::kChar ? kInS8 : kInU8;
  for (int i = 0; i < 5; ++i) p.sx[i] = x.stride(i);
  p.N = int(g.N); p.C = int(g.C); p.T = int(g.T); p.H = int(g.H); p.W = int(g.W);
  p.x_scale = xsk.data_ptr<float>();
  p.in_qn = int(in_qn); p.in_qp = int(in_qp);
  p.w = static_cast<const uint8_t*>(wk.data_ptr());
  p.w_bits = int(w_bits);
  p.Co = int(g.Co); p.kT = int(g.kT); p.kH = int(g.kH); p.kW = int(g.kW);
  p.sT = int(g.sT); p.sH = int(g.sH); p.sW = int(g.sW);
  p.pT = int(g.pT); p.pH = int(g.pH); p.pW = int(g.pW);
  p.dT = int(g.dT); p.dH = int(g.dH); p.dW = int(g.dW);
  p.To = int(g.To); p.Ho = int(g.Ho); p.Wo = int(g.Wo);
  p.w_scale = wsk.data_ptr<float>();
  p.bias = opt_ptr(bias, bk);
  p.bn_scale = opt_ptr(bn_scale, gk);
  p.bn_shift = opt_ptr(bn_shift, sk);
  p.act = int(act);
  p.slope = float(neg_slope);
  p.out_mode = int(out_mode);
  p.out_scale = out_mode == kOutRequant ? opt_ptr(out_scale, ok) : nullptr;
  p.out_qn = int(out_qn); p.out_qp = int(out_qp);
  p.y = y.data_ptr();
  at::Tensor scratch = at::empty({int64_t(packed_conv3d_scratch_bytes(p))},
                                 x.options().dtype(at::kByte));
  p.scratch = scratch.data_ptr();
  const cudaError_t err = packed_conv3d_launch(p, c10::cuda::getCurrentCUDAStream());
  QGAIT_CHECK(err == cudaSuccess, kPackedConv, "CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qgait, CUDA, m) { m.impl("packed_conv3d", &packed_conv3d_cuda); }

}  // namespace qgait
