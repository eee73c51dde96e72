// Host launchers of the CUDA prompt-assembly kernels (csrc/cuda/assemble_prompts.cu). Plain C++ and the
// CUDA runtime only, so both nvcc (the kernels) and the host compiler (the torch glue) can include it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ladder_kernels {
namespace cuda {

// Element types the kernels are instantiated for; the accumulation type is fp64 for kFloat64, else fp32.
enum AssembleDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// In `dtype`: out (C, a + n + s, D); prefix (C, a, D) and suffix (C, s, D) with unit stride along D and any
// class and token strides (in elements: slices of a cached layout are read in place); base (n, D) or
// (C, n, D); lowrank_a (n, r) or (C, n, r) and lowrank_b (r, D), or both null; pos (L, D) or null; all
// but prefix and suffix contiguous.
struct AssembleArgs {
  void* out;
  const void* prefix;
  const void* suffix;
  const void* base;
  const void* lowrank_a;
  const void* lowrank_b;
  const void* pos;
  int64_t classes, prefix_len, prompt_len, suffix_len, width, rank;
  int64_t prefix_strides[2], suffix_strides[2];  // (class, token)
  bool base_per_class, a_per_class;
  double scale, dropout;
  int64_t seed;              // the dropout seed's value when it came as a CPU tensor ...
  const int64_t* seed_ptr;   // ... or, non-null, its one int64 in device memory (read by the kernel)
};

// E = concat(prefix, base + scale * dropout(A B), suffix) (+ pos), one pass, 16-byte vectors when aligned.
cudaError_t assemble_prompts_forward(int dtype, const AssembleArgs& args, cudaStream_t stream);

// Elements of accumulation-type workspace that assemble_prompts_reduce needs (0: none).
int64_t assemble_prompts_reduce_workspace(int64_t classes, int64_t rows, int64_t width);

// out_acc (end - start, D) = sum_c grad[c, start:end] in the accumulation type: per-chunk partial sums over
// fixed chunks of classes, then a second pass adding the chunks in order (deterministic, no atomics).
cudaError_t assemble_prompts_reduce(int dtype, void* out_acc, void* workspace_acc, const void* grad,
                                    int64_t classes, int64_t length, int64_t start, int64_t end,
                                    int64_t width, cudaStream_t stream);

}  // namespace cuda
}  // namespace ladder_kernels
