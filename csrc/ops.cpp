// The compiled kernels' library. The Python custom ops in ladder_kernels/ops/ call the kernels through
// torch.ops.ladder_kernels_C, so the extension needs no pybind11 bindings of its own.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(ladder_kernels_C, m) {}
// Each op declares its schemas in a TORCH_LIBRARY_FRAGMENT at the top of csrc/cpu/<op>.cpp (the CPU
// sources are always built) and registers kernels with TORCH_LIBRARY_IMPL per dispatch key.

// `import ladder_kernels._C` loads the library above; the module itself exports nothing.
static struct PyModuleDef ladder_kernels_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ladder_kernels_C_module); }
