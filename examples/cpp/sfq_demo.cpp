// Calling a qgait op from C++ through the dispatcher, with libqgait_ops.so linked in (its
// static TORCH_LIBRARY registrations run when it loads). Built by CMakeLists.txt with
// -DQGAIT_BUILD_EXAMPLES=ON; tests/test_build.py runs it.
//
// Prints "qgait::soft_fake_quant matches torch: ok" and exits 0 when the 8-bit hard fake-quant
// equals torch's own fake_quantize_per_tensor_affine bit for bit.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

int main() {
  // Schema: soft_fake_quant(Tensor x, Tensor scale, int axis, int qn, int qp, float k,
  //                         bool soft, float gamma) -> Tensor
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("qgait::soft_fake_quant", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                                  double, bool, double)>();
  at::manual_seed(0);
  const at::Tensor x = at::randn({3, 5, 7}) * 4;
  const at::Tensor scale = at::full({}, 0.03f);
  // axis -1 = per tensor; grid [-128, 127] (signed 8 bit); k = 0, hard rounding.
  const at::Tensor y = op.call(x, scale, -1, -128, 127, 0.0, false, 1.0);
  const at::Tensor ref = at::fake_quantize_per_tensor_affine(x, 0.03, 0, -128, 127);
  const bool ok = at::equal(y, ref);
  std::cout << "qgait::soft_fake_quant matches torch: " << (ok ? "ok" : "MISMATCH") << "\n";
  return ok ? 0 : 1;
}
