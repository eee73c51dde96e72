// `import ladder_kernels._C_cuda` loads the CUDA kernels (csrc/cuda/*), which register themselves with
// TORCH_LIBRARY_IMPL(ladder_kernels_C, CUDA, ...) against the schemas ladder_kernels._C declares. A
// separate library, so that a CUDA build problem leaves the CPU kernels intact.
#include <Python.h>

static struct PyModuleDef ladder_kernels_C_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&ladder_kernels_C_cuda_module); }
