// Schemas of the compiled kernels, in one place. Each csrc/<backend>/<op>.cpp registers its
// implementation with TORCH_LIBRARY_IMPL; the Python custom ops in ladder_kernels/ops/ call them through
// torch.ops.ladder_kernels_C, so the extension needs no pybind11 bindings of its own.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(ladder_kernels_C, m) {
  // out = mu * side + (1 - mu) * (tap @ weight^T + bias); diff = side - Z when save_diff.
  m.def("gated_fusion_fwd(Tensor side, Tensor tap, Tensor weight, Tensor? bias, Tensor mu, "
        "bool save_diff) -> (Tensor, Tensor)");
  // d_side = mu * grad (when need_side); col_grad = sum_rows grad; col_gdiff = sum_rows grad * diff.
  m.def("gated_fusion_bwd_rows(Tensor grad, Tensor? diff, Tensor mu, bool need_side) "
        "-> (Tensor, Tensor, Tensor)");
  // grad^T @ (tap * tap_scale[:, None]) accumulated in fp32 (fp64 for double), rows in fixed blocks.
  m.def("gated_fusion_bwd_weight(Tensor grad, Tensor tap, Tensor? tap_scale) -> Tensor");
}

// `import ladder_kernels._C` loads the library above; the module itself exports nothing.
static struct PyModuleDef ladder_kernels_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ladder_kernels_C_module); }
