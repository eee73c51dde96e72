// Helpers shared by the C++ CPU kernels and the CUDA kernels' torch glue. Light on purpose: the ATen
// core tensor, not <ATen/ATen.h> (which alone costs ~6 s per file to compile), so a first build is quick.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdint>

namespace ladder_kernels {

inline int64_t num_blocks(int64_t rows, int64_t block) { return (rows + block - 1) / block; }

// Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise (the Python side's twin is
// ladder_kernels/_common.py). Reduced precision is widened block by block, so GEMMs run in fp32.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A tensor in the accumulation dtype: itself when it already is (fp32, fp64: no ATen call, no copy; at
// the sizes where the host path matters every call costs as much as the maths).
inline at::Tensor widened(const at::Tensor& t, at::ScalarType acc) { return t.scalar_type() == acc ? t : t.to(acc); }

// At the entry of every kernel: autograd is the caller's (the inputs may require grad), and autocast must
// not recast the GEMMs inside it (the kernel picks its own precision; under CPU fp16 autocast an at::mm
// here came back in fp16 where the kernel reads fp32).
struct KernelGuard {
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// A dropout seed handed over as a one-element int64 CPU tensor: read on the host, no device sync.
inline int64_t seed_value(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.device().is_cpu() && seed.numel() == 1 && seed.scalar_type() == at::kLong, op,
              ": seed must be a one-element int64 CPU tensor, got ", seed.sizes(), " ", seed.scalar_type(), " on ",
              seed.device());
  return seed.item<int64_t>();
}

}  // namespace ladder_kernels
