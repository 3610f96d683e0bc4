// Every qgait op schema, defined once. Backend kernels live in one file per backend
// (csrc/cpu/<op>.cpp, csrc/cuda/<op>_bind.cpp) that ends in its TORCH_LIBRARY_IMPL;
// fake (meta) kernels and autograd are registered from Python (qgait/ops/<op>.py).
#include <string>

#include "common.h"
#include "cpu/isa.h"
#include "packed_conv3d.h"

namespace {

std::string cpu_isa_op() { return qgait::cpu_isa_name(); }

// Caps the CPU ISA used by the C++ kernels; returns the previous level. Used by tests to run
// every fallback (avx2_vnni, avx2, scalar) on a CPU that has wider vectors.
std::string set_cpu_isa_op(std::string name) {
  std::string prev = qgait::cpu_isa_name();
  try {
    qgait::set_isa_cap(name);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "qgait::_set_cpu_isa: ", e.what());
  }
  return prev;
}

std::string cpu_features_op() {
  std::string s = std::string("detected=") + qgait::isa_name(qgait::detected_isa());
  s += qgait::cpu_has_vnni() ? " vnni=1" : " vnni=0";
  s += qgait::cpu_has_avx_vnni() ? " avx_vnni=1" : " avx_vnni=0";
  s += qgait::cpu_has_amx_int8() ? " amx_int8=1" : " amx_int8=0";
  return s;
}

}  // namespace

TORCH_LIBRARY(qgait, m) {
  // --- runtime CPU dispatch control -------------------------------------------------------
  m.def("_cpu_isa() -> str", &cpu_isa_op);
  m.def("_set_cpu_isa(str isa) -> str", &set_cpu_isa_op);
  m.def("_cpu_features() -> str", &cpu_features_op);
  // the kernel path of this thread's last CPU packed_conv3d call (csrc/packed_conv3d.h)
  m.def("_packed_conv3d_cpu_path() -> str", &qgait::packed_conv3d_cpu_path);

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
  // --- packed_conv3d (qgait/ops/packed_conv3d.py documents the math and the layouts) ------
  // x: float32 (quantized here with x_scale on the grid [in_qn, in_qp]), int8 / uint8 codes,
  // or bool (binary). w_packed: [C_out, kT, kH, kW, C_in] int8 (w_bits 8) or
  // [C_out, kT, kH, kW, ceil(C_in/2)] uint8 (w_bits 4, low nibble = even channel).
  // act: 0 none, 1 relu, 2 leaky relu. out_mode: 0 float32, 1 requantized to out_scale on
  // [out_qn, out_qp] (int8 if out_qn < 0 else uint8), 2 the int32 accumulators.
  // The output is [N, C_out, T', H', W'] in channels_last_3d memory order.
  m.def("packed_conv3d(Tensor x, Tensor x_scale, int in_qn, int in_qp, Tensor w_packed,"
        " Tensor w_scale, int w_bits, int c_in, int[] stride, int[] padding, int[] dilation,"
        " Tensor? bias, Tensor? bn_scale, Tensor? bn_shift, int act, float neg_slope,"
        " int out_mode, Tensor? out_scale, int out_qn, int out_qp) -> Tensor");
  // uint8 codes of a binary float input and the count of its values other than 0 / 1
  // (PackedConv3d's silhouette stem; CPU only)
  m.def("_binary_codes(Tensor x) -> (Tensor, int)");
  // --- code-domain inference ops of the packed models (qgait/ops/codes.py; CPU only) --------
  // max pooling of int8 / uint8 codes (no padding, dilation 1), channels_last_3d output
  m.def("_max_pool_codes(Tensor x, int[] kernel, int[] stride) -> Tensor");
  // per-part FCs: x [N, C_in, P] float32 quantized to codes on [qn, qp] with a_scale, times
  // w [P, C_out, C_in] int8 in int32, scaled by a_scale * w_scale [P * C_out] -> [N, C_out, P]
  m.def("_part_linear_codes(Tensor x, Tensor a_scale, int qn, int qp, Tensor w, Tensor w_scale)"
        " -> Tensor");
}
