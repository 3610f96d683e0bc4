// Torch glue of the CUDA pooling kernels (csrc/cuda/pooling.cu): the same checks as the CPU
// backend (pooling.h), then the launches on the current stream, with no host-to-device copy
// and no host sync. Built only when torch has CUDA (setup.py).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/pooling.cuh"
#include "pooling.h"

namespace qgait {
namespace {

constexpr const char* kSph = "set_pool_hpp";
constexpr const char* kSphB = "set_pool_hpp_backward";
constexpr const char* kTp = "temporal_pool";
constexpr const char* kTpB = "temporal_pool_backward";

// The call as the raw-pointer launchers take it: shape, the packed sequence lengths and the
// pyramid levels stay in host memory and reach the kernels by value in their arguments (no
// device tables: no host-to-device copy, no host sync, capturable in a CUDA graph).
cuda::PoolCall make_call(at::IntArrayRef x_shape, at::IntArrayRef seqL, at::IntArrayRef bins,
                         int64_t mode, bool hpp) {
  cuda::PoolCall c{};
  c.N = x_shape[0], c.C = x_shape[1], c.T = x_shape[2], c.H = x_shape[3], c.W = x_shape[4];
  c.seqL = seqL.empty() ? nullptr : seqL.data();
  c.nseq = static_cast<int64_t>(seqL.size());
  c.bins = hpp ? bins.data() : nullptr;
  c.nbins = hpp ? static_cast<int64_t>(bins.size()) : 0;
  c.mode = static_cast<int>(mode);
  c.hpp = hpp;
  return c;
}

// The shape limits of the CUDA kernels on this device (the Python backend checks the same
// ones first and falls back to another backend; this is for direct calls of the op).
void check_limits(const char* op, const cuda::PoolCall& c, const at::Device& dev) {
  int optin = 0;  // a property query: no sync
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        dev.index()));
  const char* why = cuda::pool_cuda_limit(c, optin);
  QGAIT_CHECK(why == nullptr, op, "the CUDA kernels cannot take x of shape [", c.N, ", ", c.C,
              ", ", c.T, ", ", c.H, ", ", c.W, "] on this GPU: ", why, " (",
              cuda::pool_smem_bytes(c, false), " / ", cuda::pool_smem_bytes(c, true),
              " bytes needed, ", optin, " available); use another backend");
}

void check_launch(const char* op, cudaError_t err) {
  QGAIT_CHECK(err == cudaSuccess, op, "CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor empty_i32(const at::Tensor& like) { return at::empty({0}, like.options().dtype(at::kInt)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> set_pool_hpp_cuda(const at::Tensor& x,
                                                                  at::IntArrayRef seqL,
                                                                  at::IntArrayRef bins,
                                                                  int64_t mode, bool need_idx) {
  const auto seqs = pool_sequences(kSph, x, seqL);
  const int64_t C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const auto strips = pool_strips(kSph, H, bins, mode);
  const int64_t NO = static_cast<int64_t>(seqs.size()), B = static_cast<int64_t>(strips.size());
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({NO, C, B}, x.options());
  const bool with_t = need_idx && T > 1, with_s = need_idx && mode != kMean;
  at::Tensor targ = with_t ? at::empty({NO, C, H, W}, x.options().dtype(at::kInt)) : empty_i32(x);
  at::Tensor sarg = with_s ? at::empty({NO, C, B}, x.options().dtype(at::kInt)) : empty_i32(x);
  const cuda::PoolCall call = make_call(x.sizes(), seqL, bins, mode, true);
  check_limits(kSph, call, x.device());
  check_launch(kSph, cuda::pool_forward(xc.data_ptr(), out.data_ptr(),
                                        with_t ? targ.data_ptr<int32_t>() : nullptr,
                                        with_s ? sarg.data_ptr<int32_t>() : nullptr, call,
                                        dtype_code(x.scalar_type()),
                                        c10::cuda::getCurrentCUDAStream()));
  return {out, targ, sarg};
}

at::Tensor set_pool_hpp_backward_cuda(const at::Tensor& grad, const at::Tensor& targ,
                                      const at::Tensor& sarg, at::IntArrayRef x_shape,
                                      at::IntArrayRef seqL, at::IntArrayRef bins, int64_t mode) {
  const PoolBackward a = check_pool_backward(kSphB, true, grad, targ, &sarg, x_shape, seqL, bins,
                                             mode);
  const bool with_t = a.with_t, with_s = a.with_s;
  c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor tc = with_t ? targ.contiguous() : targ, sc = with_s ? sarg.contiguous() : sarg;
  at::Tensor dx = at::empty(x_shape, grad.options());
  const cuda::PoolCall call = make_call(x_shape, seqL, bins, mode, true);
  check_limits(kSphB, call, grad.device());
  check_launch(kSphB, cuda::pool_backward(gc.data_ptr(), with_t ? tc.data_ptr<int32_t>() : nullptr,
                                          with_s ? sc.data_ptr<int32_t>() : nullptr,
                                          dx.data_ptr(), call, dtype_code(grad.scalar_type()),
                                          c10::cuda::getCurrentCUDAStream()));
  return dx;
}

std::tuple<at::Tensor, at::Tensor> temporal_pool_cuda(const at::Tensor& x, at::IntArrayRef seqL,
                                                      bool need_idx) {
  const auto seqs = pool_sequences(kTp, x, seqL);
  const int64_t C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t NO = static_cast<int64_t>(seqs.size());
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({NO, C, H, W}, x.options());
  const bool with_t = need_idx && T > 1;
  at::Tensor targ = with_t ? at::empty({NO, C, H, W}, x.options().dtype(at::kInt)) : empty_i32(x);
  const cuda::PoolCall call = make_call(x.sizes(), seqL, {}, kMax, false);
  check_limits(kTp, call, x.device());
  check_launch(kTp, cuda::pool_forward(xc.data_ptr(), out.data_ptr(),
                                       with_t ? targ.data_ptr<int32_t>() : nullptr, nullptr, call,
                                       dtype_code(x.scalar_type()),
                                       c10::cuda::getCurrentCUDAStream()));
  return {out, targ};
}

at::Tensor temporal_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& targ,
                                       at::IntArrayRef x_shape, at::IntArrayRef seqL) {
  const PoolBackward a = check_pool_backward(kTpB, false, grad, targ, nullptr, x_shape, seqL, {},
                                             kMax);
  const bool with_t = a.with_t;
  c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous(), tc = with_t ? targ.contiguous() : targ;
  at::Tensor dx = at::empty(x_shape, grad.options());
  const cuda::PoolCall call = make_call(x_shape, seqL, {}, kMax, false);
  check_limits(kTpB, call, grad.device());
  check_launch(kTpB, cuda::pool_backward(gc.data_ptr(), with_t ? tc.data_ptr<int32_t>() : nullptr,
                                         nullptr, dx.data_ptr(), call,
                                         dtype_code(grad.scalar_type()),
                                         c10::cuda::getCurrentCUDAStream()));
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(qgait, CUDA, m) {
  m.impl("set_pool_hpp", &set_pool_hpp_cuda);
  m.impl("set_pool_hpp_backward", &set_pool_hpp_backward_cuda);
  m.impl("temporal_pool", &temporal_pool_cuda);
  m.impl("temporal_pool_backward", &temporal_pool_backward_cuda);
}

}  // namespace qgait
