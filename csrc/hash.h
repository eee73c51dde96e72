// The counter-based random stream behind every op's dropout: MurmurHash3's 32-bit finaliser. One
// definition for the C++ and CUDA kernels (and mirrored in Python, ladder_kernels/ops/*.py), so every
// backend draws the same mask for the same seed and backward regenerates it instead of storing it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LADDER_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LADDER_HOST_DEVICE inline
#endif

namespace ladder_kernels {

LADDER_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

}  // namespace ladder_kernels
