// Torch glue of the CUDA pooling kernels (csrc/cuda/pooling.cu): the same checks and tables as
// the CPU backend (pooling.h), then one launch on the current stream. Built only when torch has
// CUDA (setup.py).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/pooling.cuh"
#include "pooling.h"

namespace qgait {
namespace {

constexpr const char* kSph = "set_pool_hpp";
constexpr const char* kSphB = "set_pool_hpp_backward";
constexpr const char* kTp = "temporal_pool";
constexpr const char* kTpB = "temporal_pool_backward";

// The small tables of pooling.h as device tensors: (seq_base int64, seq_len int32,
// row0 int32, row1 int32). seq_base is the element offset of channel 0's first frame.
struct Tables {
  at::Tensor base, len, row0, row1;
};

Tables make_tables(const std::vector<PoolSeq>& seqs, const std::vector<PoolStrip>& strips,
                   int64_t C, int64_t T, int64_t HW, const at::Device& dev) {
  const int64_t n = static_cast<int64_t>(seqs.size());
  const int64_t b = std::max<int64_t>(1, static_cast<int64_t>(strips.size()));
  at::Tensor base = at::empty({n}, at::kLong), len = at::empty({n}, at::kInt);
  at::Tensor r0 = at::zeros({b}, at::kInt), r1 = at::zeros({b}, at::kInt);
  for (int64_t i = 0; i < n; ++i) {
    base.data_ptr<int64_t>()[i] = (seqs[i].item * C * T + seqs[i].start) * HW;
    len.data_ptr<int32_t>()[i] = seqs[i].len;
  }
  for (size_t j = 0; j < strips.size(); ++j) {
    r0.data_ptr<int32_t>()[j] = strips[j].row0;
    r1.data_ptr<int32_t>()[j] = strips[j].row1;
  }
  return {base.to(dev), len.to(dev), r0.to(dev), r1.to(dev)};
}

void check_launch(const char* op, cudaError_t err, int64_t HW) {
  QGAIT_CHECK(err == cudaSuccess, op, "CUDA launch failed (H*W = ", HW, ", at most ",
              cuda::kPoolMaxHW, "): ", cudaGetErrorString(err));
}

at::Tensor empty_i32(const at::Tensor& like) { return at::empty({0}, like.options().dtype(at::kInt)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> set_pool_hpp_cuda(const at::Tensor& x,
                                                                  at::IntArrayRef seqL,
                                                                  at::IntArrayRef bins,
                                                                  int64_t mode, bool need_idx) {
  const auto seqs = pool_sequences(kSph, x, seqL);
  const int64_t C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4), HW = H * W;
  const auto strips = pool_strips(kSph, H, bins, mode);
  const int64_t NO = static_cast<int64_t>(seqs.size()), B = static_cast<int64_t>(strips.size());
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({NO, C, B}, x.options());
  const bool with_t = need_idx && T > 1, with_s = need_idx && mode != kMean;
  at::Tensor targ = with_t ? at::empty({NO, C, H, W}, x.options().dtype(at::kInt)) : empty_i32(x);
  at::Tensor sarg = with_s ? at::empty({NO, C, B}, x.options().dtype(at::kInt)) : empty_i32(x);
  const Tables tb = make_tables(seqs, strips, C, T, HW, x.device());
  check_launch(kSph, cuda::pool_forward(
      xc.data_ptr(), out.data_ptr(), with_t ? targ.data_ptr<int32_t>() : nullptr,
      with_s ? sarg.data_ptr<int32_t>() : nullptr, tb.base.data_ptr<int64_t>(),
      tb.len.data_ptr<int32_t>(), tb.row0.data_ptr<int32_t>(), tb.row1.data_ptr<int32_t>(), NO, C,
      T * HW, H, W, B, static_cast<int>(mode), true, dtype_code(x.scalar_type()),
      c10::cuda::getCurrentCUDAStream()), HW);
  return {out, targ, sarg};
}

at::Tensor set_pool_hpp_backward_cuda(const at::Tensor& grad, const at::Tensor& targ,
                                      const at::Tensor& sarg, at::IntArrayRef x_shape,
                                      at::IntArrayRef seqL, at::IntArrayRef bins, int64_t mode) {
  const PoolBackward a = check_pool_backward(kSphB, true, grad, targ, &sarg, x_shape, seqL, bins,
                                             mode);
  const auto& seqs = a.seqs;
  const auto& strips = a.strips;
  const int64_t NO = a.NO, C = a.C, T = a.T, H = a.H, W = a.W, HW = a.HW, B = a.B;
  const bool with_t = a.with_t, with_s = a.with_s;
  c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor tc = with_t ? targ.contiguous() : targ, sc = with_s ? sarg.contiguous() : sarg;
  at::Tensor dx = at::empty(x_shape, grad.options());
  const Tables tb = make_tables(seqs, strips, C, T, HW, grad.device());
  check_launch(kSphB, cuda::pool_backward(
      gc.data_ptr(), with_t ? tc.data_ptr<int32_t>() : nullptr,
      with_s ? sc.data_ptr<int32_t>() : nullptr, dx.data_ptr(), tb.base.data_ptr<int64_t>(),
      tb.len.data_ptr<int32_t>(), tb.row0.data_ptr<int32_t>(), tb.row1.data_ptr<int32_t>(), NO, C,
      T * HW, H, W, B, static_cast<int>(mode), true, dtype_code(grad.scalar_type()),
      c10::cuda::getCurrentCUDAStream()), HW);
  return dx;
}

std::tuple<at::Tensor, at::Tensor> temporal_pool_cuda(const at::Tensor& x, at::IntArrayRef seqL,
                                                      bool need_idx) {
  const auto seqs = pool_sequences(kTp, x, seqL);
  const int64_t C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4), HW = H * W;
  const int64_t NO = static_cast<int64_t>(seqs.size());
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({NO, C, H, W}, x.options());
  const bool with_t = need_idx && T > 1;
  at::Tensor targ = with_t ? at::empty({NO, C, H, W}, x.options().dtype(at::kInt)) : empty_i32(x);
  const Tables tb = make_tables(seqs, {}, C, T, HW, x.device());
  check_launch(kTp, cuda::pool_forward(
      xc.data_ptr(), out.data_ptr(), with_t ? targ.data_ptr<int32_t>() : nullptr, nullptr,
      tb.base.data_ptr<int64_t>(), tb.len.data_ptr<int32_t>(), tb.row0.data_ptr<int32_t>(),
      tb.row1.data_ptr<int32_t>(), NO, C, T * HW, H, W, 0, 0, false,
      dtype_code(x.scalar_type()), c10::cuda::getCurrentCUDAStream()), HW);
  return {out, targ};
}

at::Tensor temporal_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& targ,
                                       at::IntArrayRef x_shape, at::IntArrayRef seqL) {
  const PoolBackward a = check_pool_backward(kTpB, false, grad, targ, nullptr, x_shape, seqL, {},
                                             kMax);
  const auto& seqs = a.seqs;
  const int64_t NO = a.NO, C = a.C, T = a.T, H = a.H, W = a.W, HW = a.HW;
  const bool with_t = a.with_t;
  c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous(), tc = with_t ? targ.contiguous() : targ;
  at::Tensor dx = at::empty(x_shape, grad.options());
  const Tables tb = make_tables(seqs, {}, C, T, HW, grad.device());
  check_launch(kTpB, cuda::pool_backward(
      gc.data_ptr(), with_t ? tc.data_ptr<int32_t>() : nullptr, nullptr, dx.data_ptr(),
      tb.base.data_ptr<int64_t>(), tb.len.data_ptr<int32_t>(), tb.row0.data_ptr<int32_t>(),
      tb.row1.data_ptr<int32_t>(), NO, C, T * HW, H, W, 0, 0, false,
      dtype_code(grad.scalar_type()), c10::cuda::getCurrentCUDAStream()), HW);
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
