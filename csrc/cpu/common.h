// Helpers shared by the C++ CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ladder_kernels {

inline int64_t num_blocks(int64_t rows, int64_t block) { return (rows + block - 1) / block; }

// Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise (reduced precision is widened block by
// block, so GEMMs run in fp32 with fp32 accumulation).
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace ladder_kernels
