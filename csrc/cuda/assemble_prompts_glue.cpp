// torch glue of the CUDA prompt-assembly kernels (csrc/cuda/assemble_prompts.cu): their registration for
// the CUDA dispatch key, against the schemas of csrc/ops.cpp. prefix and suffix are read through their
// strides; the small tensors are made contiguous. Kernels run on the current stream of the inputs' device.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../common.h"
#include "assemble_prompts.cuh"

namespace ladder_kernels {
namespace {

using at::Tensor;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::kFloat32;
    case at::kHalf: return cuda::kFloat16;
    case at::kBFloat16: return cuda::kBFloat16;
    case at::kDouble: return cuda::kFloat64;
    default: break;
  }
  TORCH_CHECK(false, "assemble_prompts (CUDA): unsupported dtype ", t);
  return -1;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "assemble_prompts (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

Tensor contiguous_or_undefined(const std::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : Tensor();
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// Shapes, dtypes and devices were checked once, in ladder_kernels/ops/assemble_prompts.py; what is
// checked here is what this glue itself relies on.
Tensor assemble_prompts_fwd_cuda(const Tensor& prefix, const Tensor& suffix, const Tensor& base,
                                 const std::optional<Tensor>& lowrank_a, const std::optional<Tensor>& lowrank_b,
                                 const std::optional<Tensor>& pos, double scale, double dropout,
                                 const Tensor& seed) {
  TORCH_CHECK(prefix.is_cuda() && prefix.dim() == 3 && suffix.dim() == 3,
              "assemble_prompts (CUDA): prefix and suffix must be 3-D CUDA tensors");
  const c10::cuda::CUDAGuard guard(prefix.device());
  // prefix and suffix are read through their strides (slices of a cached layout, no copy); only a
  // non-unit stride along D makes a copy.
  const Tensor pre = prefix.stride(2) == 1 ? prefix : prefix.contiguous();
  const Tensor suf = suffix.stride(2) == 1 ? suffix : suffix.contiguous();
  const Tensor bas = base.contiguous();
  const Tensor la = contiguous_or_undefined(lowrank_a), lb = contiguous_or_undefined(lowrank_b);
  const Tensor ps = contiguous_or_undefined(pos);
  TORCH_CHECK(la.defined() == lb.defined(), "assemble_prompts (CUDA): lowrank_a and lowrank_b go together");

  cuda::AssembleArgs args{};
  args.classes = pre.size(0);
  args.prefix_len = pre.size(1);
  args.width = pre.size(2);
  args.prompt_len = bas.size(-2);
  args.suffix_len = suf.size(1);
  args.rank = la.defined() ? lb.size(0) : 0;
  args.base_per_class = bas.dim() == 3;
  args.a_per_class = la.defined() && la.dim() == 3;
  args.prefix_strides[0] = pre.stride(0), args.prefix_strides[1] = pre.stride(1);
  args.suffix_strides[0] = suf.stride(0), args.suffix_strides[1] = suf.stride(1);
  const int64_t L = args.prefix_len + args.prompt_len + args.suffix_len;
  Tensor out = at::empty({args.classes, L, args.width}, pre.options());
  if (out.numel() == 0) return out;
  args.out = out.mutable_data_ptr();
  args.prefix = ptr_or_null(pre);
  args.suffix = ptr_or_null(suf);
  args.base = ptr_or_null(bas);
  args.lowrank_a = ptr_or_null(la);
  args.lowrank_b = ptr_or_null(lb);
  args.pos = ptr_or_null(ps);
  args.scale = scale;
  args.dropout = dropout;
  if (seed.is_cuda()) {
    // The op's own seed: drawn on the device, read by the kernel (no sync; a captured graph replays the
    // draw, so each replay has its own mask).
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device() == prefix.device(),
                "assemble_prompts (CUDA): seed must be a one-element int64 tensor on the inputs' device or the "
                "CPU, got ", seed.sizes(), " ", seed.scalar_type(), " on ", seed.device());
    args.seed_ptr = seed.const_data_ptr<int64_t>();
  } else {
    args.seed = seed_value(seed, "assemble_prompts (CUDA)");  // a CPU tensor, read by value: no sync
  }
  check_launch(cuda::assemble_prompts_forward(dtype_code(pre.scalar_type()), args,
                                              c10::cuda::getCurrentCUDAStream().stream()),
               "forward kernel");
  return out;
}

Tensor assemble_prompts_reduce_cuda(const Tensor& grad, int64_t start, int64_t end) {
  TORCH_CHECK(grad.is_cuda() && grad.dim() == 3, "assemble_prompts_reduce (CUDA): grad must be a 3-D CUDA tensor");
  const int64_t C = grad.size(0), L = grad.size(1), D = grad.size(2);
  TORCH_CHECK(0 <= start && start <= end && end <= L, "assemble_prompts_reduce (CUDA): bad row range");
  const c10::cuda::CUDAGuard guard(grad.device());
  const Tensor g = grad.contiguous();
  const auto acc = acc_type(g.scalar_type());
  Tensor out = at::empty({end - start, D}, g.options().dtype(acc));
  if (out.numel() == 0) return out;
  const int64_t ws_elems = cuda::assemble_prompts_reduce_workspace(C, end - start, D);
  Tensor ws = at::empty({ws_elems}, g.options().dtype(acc));
  check_launch(cuda::assemble_prompts_reduce(dtype_code(g.scalar_type()), out.mutable_data_ptr(),
                                             ws_elems > 0 ? ws.mutable_data_ptr() : nullptr, g.const_data_ptr(),
                                             C, L, start, end, D, c10::cuda::getCurrentCUDAStream().stream()),
               "class reduction kernel");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ladder_kernels_C, CUDA, m) {
  m.impl("assemble_prompts_fwd", &assemble_prompts_fwd_cuda);
  m.impl("assemble_prompts_reduce", &assemble_prompts_reduce_cuda);
}

}  // namespace ladder_kernels
