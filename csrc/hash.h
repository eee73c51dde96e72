// The counter-based random streams behind every op's dropout, built on MurmurHash3's 32-bit finaliser.
// One definition for the C++ and CUDA kernels; ladder_kernels/_dropout.py is its Python mirror and the
// Triton kernels restate it. A mask is a pure function of (seed, element index), so every backend draws
// the same mask for the same seed and the backward regenerates it instead of storing it.
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

// An element is kept when the top 24 bits of its hash are >= threshold(p) = floor(p 2^24 + 0.5) (p < 1).
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0 + 0.5); }

// The flat stream (RLP's low-rank product): hash(i) = fmix32(fmix32(i ^ key) + key).
inline uint32_t flat_key(int64_t seed) { return fmix32(static_cast<uint32_t>(seed) ^ 0x9e3779b9u); }
LADDER_HOST_DEVICE bool flat_keep(uint32_t idx, uint32_t key, uint32_t thr) {
  return (fmix32(fmix32(idx ^ key) + key) >> 8) >= thr;
}

// The row-col stream (APT's activation): hash(m, j) = fmix32(row_hash(m) ^ (j * 0x85EBCA77)).
LADDER_HOST_DEVICE uint32_t row_hash(int64_t row, uint32_t seed) {
  return fmix32(static_cast<uint32_t>(row) * 0x9E3779B1u ^ seed);
}
LADDER_HOST_DEVICE bool row_col_keep(uint32_t row_h, int64_t col, uint32_t thr) {
  return (fmix32(row_h ^ (static_cast<uint32_t>(col) * 0x85EBCA77u)) >> 8) >= thr;
}

}  // namespace ladder_kernels
