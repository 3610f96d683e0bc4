// CUDA glue of the soft fake-quant op: the shared argument checks, contiguous inputs,
// allocation and the current stream; the kernels are in soft_fake_quant.cu. Mirrors
// csrc/cpu/soft_fake_quant.cpp, except that step values are checked on the device (see
// soft_fake_quant.cuh): checking them here would sync the host on every call.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/soft_fake_quant.cuh"
#include "soft_fake_quant.h"

namespace qgait {
namespace {

static_assert(cuda::kDtypeF32 == kF32 && cuda::kDtypeF16 == kF16 && cuda::kDtypeBF16 == kBF16,
              "the CUDA launchers' dtype codes must equal qgait::DtypeCode");

constexpr const char* kFwd = "soft_fake_quant";
constexpr const char* kBwd = "soft_fake_quant_backward";

cuda::SfqConsts sfq_consts(int64_t qn, int64_t qp, double k, bool soft) {
  const SfqParams P = make_sfq_params(qn, qp, k, soft);
  return {P.qn, P.qp, P.k, P.tanh_scale, P.g_scale, P.soft, P.k0};
}

at::Tensor soft_fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale, int64_t axis,
                                int64_t qn, int64_t qp, double k, bool soft,
                                double /*gamma*/) {
  check_sfq_args(kFwd, x, scale, axis, qn, qp, k);
  QGAIT_CHECK(x.is_cuda(), kFwd, "x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), sc = scale.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (xc.numel() == 0) return y;
  const SfqLayout L = sfq_layout(xc, axis);
  C10_CUDA_CHECK(cuda::sfq_forward_cuda(xc.data_ptr(), y.data_ptr(), sc.data_ptr<float>(),
                                        dtype_code(xc.scalar_type()), L.outer, L.C, L.inner,
                                        sfq_consts(qn, qp, k, soft),
                                        c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> soft_fake_quant_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, int64_t axis,
    int64_t qn, int64_t qp, double k, bool soft, double gamma, bool need_dx, bool need_ds) {
  check_sfq_backward_args(kBwd, grad_y, x, scale, axis, qn, qp, k);
  QGAIT_CHECK(x.is_cuda() && grad_y.device() == x.device(), kBwd,
              "x and grad_y must be on the same CUDA device, got ", x.device(), " and ",
              grad_y.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), gc = grad_y.contiguous(), sc = scale.contiguous();
  at::Tensor dx = need_dx ? at::empty_like(xc) : at::empty({0}, x.options());
  at::Tensor ds = need_ds ? at::zeros(scale.sizes(), scale.options())
                          : at::empty({0}, scale.options());
  const int64_t N = xc.numel();
  if (N == 0 || (!need_dx && !need_ds)) return {dx, ds};
  const SfqLayout L = sfq_layout(xc, axis);
  // The step-gradient partials: a small buffer from torch's caching allocator.
  at::Tensor ws = need_ds ? at::empty({cuda::sfq_backward_workspace(L.outer, L.C, L.inner)},
                                      scale.options())
                          : at::Tensor();
  C10_CUDA_CHECK(cuda::sfq_backward_cuda(
      gc.data_ptr(), xc.data_ptr(), need_dx ? dx.data_ptr() : nullptr,
      need_ds ? ds.data_ptr<float>() : nullptr, need_ds ? ws.data_ptr<float>() : nullptr,
      sc.data_ptr<float>(), dtype_code(xc.scalar_type()), L.outer, L.C, L.inner,
      sfq_consts(qn, qp, k, soft), gamma, c10::cuda::getCurrentCUDAStream()));
  return {dx, ds};
}

}  // namespace

TORCH_LIBRARY_IMPL(qgait, CUDA, m) {
  m.impl("soft_fake_quant", &soft_fake_quant_cuda);
  m.impl("soft_fake_quant_backward", &soft_fake_quant_backward_cuda);
}

}  // namespace qgait
