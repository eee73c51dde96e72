// torch glue of the CUDA prompt-assembly kernels (csrc/cuda/assemble_prompts.cu): the CUDA kernels of the
// schemas declared in csrc/cpu/assemble_prompts.cpp. Inputs are made contiguous here (a no-op for the
// usual contiguous embeddings); kernels run on the current stream of the inputs' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../cpu/common.h"
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

void check_like(const Tensor& t, const Tensor& ref, const char* name) {
  if (!t.defined()) return;
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "assemble_prompts (CUDA): ", name,
              " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "assemble_prompts (CUDA): ", name, " must have dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

Tensor assemble_prompts_fwd_cuda(const Tensor& prefix, const Tensor& suffix, const Tensor& base,
                                 const std::optional<Tensor>& lowrank_a, const std::optional<Tensor>& lowrank_b,
                                 const std::optional<Tensor>& pos, double scale, double dropout,
                                 const Tensor& seed) {
  TORCH_CHECK(prefix.is_cuda(), "assemble_prompts (CUDA): prefix must be a CUDA tensor");
  TORCH_CHECK(prefix.dim() == 3 && suffix.dim() == 3, "assemble_prompts (CUDA): prefix and suffix must be 3-D");
  TORCH_CHECK(base.dim() == 2 || base.dim() == 3, "assemble_prompts (CUDA): base must be 2-D or 3-D");
  const c10::cuda::CUDAGuard guard(prefix.device());
  const Tensor pre = prefix.contiguous(), suf = suffix.contiguous(), bas = base.contiguous();
  const Tensor la = contiguous_or_undefined(lowrank_a), lb = contiguous_or_undefined(lowrank_b);
  const Tensor ps = contiguous_or_undefined(pos);
  TORCH_CHECK(la.defined() == lb.defined(), "assemble_prompts (CUDA): lowrank_a and lowrank_b go together");
  check_like(suf, pre, "suffix");
  check_like(bas, pre, "base");
  check_like(la, pre, "lowrank_a");
  check_like(lb, pre, "lowrank_b");
  check_like(ps, pre, "pos");

  cuda::AssembleArgs args{};
  args.classes = pre.size(0);
  args.prefix_len = pre.size(1);
  args.width = pre.size(2);
  args.prompt_len = bas.size(-2);
  args.suffix_len = suf.size(1);
  args.rank = la.defined() ? lb.size(0) : 0;
  args.base_per_class = bas.dim() == 3;
  args.a_per_class = la.defined() && la.dim() == 3;
  const int64_t L = args.prefix_len + args.prompt_len + args.suffix_len;
  TORCH_CHECK(suf.size(0) == args.classes && suf.size(2) == args.width && bas.size(-1) == args.width &&
                  (!args.base_per_class || bas.size(0) == args.classes),
              "assemble_prompts (CUDA): prefix, suffix and base disagree in classes or width");
  TORCH_CHECK(!la.defined() || (la.size(-2) == args.prompt_len && la.size(-1) == args.rank &&
                                lb.size(1) == args.width && (!args.a_per_class || la.size(0) == args.classes)),
              "assemble_prompts (CUDA): lowrank_a / lowrank_b have the wrong shape");
  TORCH_CHECK(!ps.defined() || (ps.dim() == 2 && ps.size(0) == L && ps.size(1) == args.width),
              "assemble_prompts (CUDA): pos must be (L, D)");

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
  args.seed = seed_value(seed, "assemble_prompts (CUDA)");  // a CPU tensor: no sync
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
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
