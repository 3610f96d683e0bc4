// Every qgait op schema, defined once. Backend kernels live in one file per backend
// (csrc/cpu/<op>.cpp, csrc/cuda/<op>_bind.cpp) that ends in its TORCH_LIBRARY_IMPL;
// fake (meta) kernels and autograd are registered from Python (qgait/ops/<op>.py).
#include <string>

#include "common.h"
#include "cpu/isa.h"

namespace {

std::string cpu_isa_op() { return qgait::isa_name(qgait::cpu_isa()); }

// Caps the CPU ISA used by the C++ kernels; returns the previous level. Used by tests to run
// every fallback (avx2, scalar) on a CPU that has wider vectors.
std::string set_cpu_isa_op(std::string name) {
  std::string prev = qgait::isa_name(qgait::cpu_isa());
  try {
    qgait::set_isa_cap(qgait::parse_isa(name));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "qgait::_set_cpu_isa: ", e.what());
  }
  return prev;
}

std::string cpu_features_op() {
  std::string s = std::string("detected=") + qgait::isa_name(qgait::detected_isa());
  s += qgait::cpu_has_vnni() ? " vnni=1" : " vnni=0";
  s += qgait::cpu_has_amx_int8() ? " amx_int8=1" : " amx_int8=0";
  return s;
}

}  // namespace

TORCH_LIBRARY(qgait, m) {
  // --- runtime CPU dispatch control -------------------------------------------------------
  m.def("_cpu_isa() -> str", &cpu_isa_op);
  m.def("_set_cpu_isa(str isa) -> str", &set_cpu_isa_op);
  m.def("_cpu_features() -> str", &cpu_features_op);

  // --- soft fake quantizer (qgait/ops/soft_quant.py documents the math) -------------------
  // axis = -1: per-tensor step (scale has one element); else per-channel along `axis`.
  // gamma (the step-gradient scale) is unused by the forward; it is an argument so that the
  // registered autograd formula sees it.
  m.def("soft_fake_quant(Tensor x, Tensor scale, int axis, int qn, int qp, float k, bool soft,"
        " float gamma) -> Tensor");
  // Returns (grad_x, grad_scale); an output that is not needed is an empty tensor.
  m.def("soft_fake_quant_backward(Tensor grad_y, Tensor x, Tensor scale, int axis, int qn,"
        " int qp, float k, bool soft, float gamma, bool need_dx, bool need_ds)"
        " -> (Tensor, Tensor)");

  // --- pooling (temporal max + horizontal pyramid; qgait/ops/pooling.py has the math) -----
  // seqL = [] means one sequence per batch item; mode 0 = mean+max, 1 = max, 2 = mean.
  // need_idx: also return the int32 arg-max indices the backward needs (else empty tensors):
  // targ [N', C, H, W] (frame within the sequence; empty when T = 1) and sarg [N', C, B]
  // (flat h*W+w of each strip's max; empty for mode = mean).
  m.def("set_pool_hpp(Tensor x, int[] seqL, int[] bins, int mode, bool need_idx)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("set_pool_hpp_backward(Tensor grad, Tensor targ, Tensor sarg, int[] x_shape, int[] seqL,"
        " int[] bins, int mode) -> Tensor");
  m.def("temporal_pool(Tensor x, int[] seqL, bool need_idx) -> (Tensor, Tensor)");
  m.def("temporal_pool_backward(Tensor grad, Tensor targ, int[] x_shape, int[] seqL) -> Tensor");
}
