// The op library torch.ops.ladder_kernels_C: every schema, and the CPU kernels behind them. The CUDA
// kernels register themselves for the CUDA dispatch key from ladder_kernels._C_cuda (csrc/cuda/*_glue.cpp).
// The Python ops (ladder_kernels/ops/) call these through ladder_kernels/backends/{cpu,cuda}/, so the
// extension needs no pybind11 bindings. Only this file includes <torch/library.h> (~5 s to compile).
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(ladder_kernels_C, m) {
  // Gated fusion: out = mu * side + (1 - mu) * (tap @ weight^T + bias); diff = side - Z when save_diff.
  m.def("gated_fusion_fwd(Tensor side, Tensor tap, Tensor weight, Tensor? bias, Tensor mu, "
        "bool save_diff) -> (Tensor, Tensor)");
  // The whole backward in one call (one dispatch on the host path): d_side = mu grad, d_tap = grad
  // ((1 - mu) W), d_weight = (1 - mu) grad^T (tap * tap_scale), d_bias = (1 - mu) sum_rows grad, d_gate =
  // sum_rows(grad diff) mu (1 - mu) / T, summed to one element for a scalar gate; unneeded ones are empty.
  m.def("gated_fusion_bwd(Tensor grad, Tensor? diff, Tensor? tap, Tensor? tap_scale, Tensor? weight, Tensor mu, "
        "float temperature, bool scalar_gate, bool need_side, bool need_tap, bool need_weight, bool need_bias, "
        "bool need_gate) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Prompt assembly: E = concat(prefix, base + scale * dropout(A B), suffix) (+ pos); (C, L, D) in prefix's
  // dtype. seed: a one-element int64 CPU tensor (a tensor, so torch.compile keeps its draw in the graph).
  m.def("assemble_prompts_fwd(Tensor prefix, Tensor suffix, Tensor base, Tensor? lowrank_a, "
        "Tensor? lowrank_b, Tensor? pos, float scale, float dropout, Tensor seed) -> Tensor");
  // sum_c grad[c, start:end] in fp32 (fp64 for double), deterministic.
  m.def("assemble_prompts_reduce(Tensor grad, int start, int end) -> Tensor");

  // APT: (out, w): out = exp(log_scale) (attn_out + w (A prompts)), A = dropout(relu(hidden kt^T)),
  // w = row max of A.
  m.def("apt_diffusion_fwd(Tensor hidden, Tensor attn_out, Tensor prompts, Tensor kt, Tensor log_scale, "
        "Tensor seed, float dropout) -> (Tensor, Tensor)");
  // (d_hidden, d_attn_out, d_prompts (direct term A^T dE), d_kt, d_log_scale); unneeded ones are empty.
  m.def("apt_diffusion_bwd(Tensor grad, Tensor? hidden, Tensor? out, Tensor prompts, Tensor kt, "
        "Tensor log_scale, Tensor? w, Tensor seed, float dropout, bool need_h, bool need_y, bool need_p, "
        "bool need_kt, bool need_s) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ladder_kernels_C, CPU, m) {
  namespace cpu = ladder_kernels::cpu;
  m.impl("gated_fusion_fwd", &cpu::gated_fusion_fwd);
  m.impl("gated_fusion_bwd", &cpu::gated_fusion_bwd);
  m.impl("assemble_prompts_fwd", &cpu::assemble_prompts_fwd);
  m.impl("assemble_prompts_reduce", &cpu::assemble_prompts_reduce);
  m.impl("apt_diffusion_fwd", &cpu::apt_diffusion_fwd);
  m.impl("apt_diffusion_bwd", &cpu::apt_diffusion_bwd);
}

// `import ladder_kernels._C` loads the library above; the module itself exports nothing.
static struct PyModuleDef ladder_kernels_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ladder_kernels_C_module); }
