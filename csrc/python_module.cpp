// Makes qgait._C importable as a Python module; importing it runs the static TORCH_LIBRARY
// registrations. Only the setup.py build includes this file (the CMake op library is loaded
// with torch.ops.load_library and needs no Python).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
