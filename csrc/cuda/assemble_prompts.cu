// RLP prompt assembly on CUDA (docs/design.md, section 2). Pure CUDA: no torch headers, so it compiles alone with
// nvcc; csrc/cuda/assemble_prompts_glue.cpp wraps the launchers for torch.
//
//   P    = base + scale * dropout(A B)      base: (n, D) or (C, n, D); A: (n, r) or (C, n, r); B: (r, D)
//   E[c] = concat(prefix[c], P[c], suffix[c]) (+ pos)
//
// Forward: one thread per 16-byte vector of E. Each vector is read once from prefix, suffix or the prompt
// (base plus r FMAs against B, which stay in L1/L2) and written once, so E costs one read and one write of
// itself: A B, the expanded P and the concatenation never reach memory. fp32 accumulation (fp64 for double).
//
// Dropout keeps element idx of Q = A B (its flat index in Q) when (h >> 8) >= thr, with
// h = fmix32(fmix32(idx ^ key) + key), key = fmix32(seed ^ 0x9e3779b9), thr = floor(p 2^24 + 0.5): the
// flat stream of csrc/hash.h (mirrored in ladder_kernels/_dropout.py), so the
// backward regenerates the mask and every backend draws the same one.
//
// Backward's class reduction out = sum_c grad[c, start:end]: pass 1 sums fixed chunks of classes into
// partials, pass 2 adds the partials in chunk order. The chunking depends only on the shape, and nothing
// uses atomics, so two runs give identical bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../hash.h"
#include "assemble_prompts.cuh"

namespace ladder_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest
constexpr int64_t kMinChunk = 8;                   // classes per pass-1 partial
constexpr int64_t kMaxChunks = 1024;               // bounds the partials' workspace

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void from_acc(float x, float& y) { y = x; }
__device__ __forceinline__ void from_acc(double x, double& y) { y = x; }
__device__ __forceinline__ void from_acc(float x, __half& y) { y = __float2half_rn(x); }
__device__ __forceinline__ void from_acc(float x, __nv_bfloat16& y) { y = __float2bfloat16_rn(x); }

// N elements moved as one aligned access (16 bytes for the inputs).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T, typename A>
__device__ __forceinline__ void load(const T* __restrict__ p, A (&x)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int e = 0; e < N; ++e) x[e] = to_acc(pk.v[e]);
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store(T* __restrict__ p, const A (&x)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int e = 0; e < N; ++e) from_acc(x[e], pk.v[e]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

template <typename T>
struct FwdParams {
  T* out;
  const T* prefix;
  const T* suffix;
  const T* base;
  const T* la;
  const T* lb;
  const T* pos;
  int64_t C, a, n, s, D, r, base_cstride, a_cstride;
  int64_t pre_cs, pre_ts, suf_cs, suf_ts;  // prefix / suffix strides (class, token): views of a layout
  bool a_per_class, dropout;
  typename AccOf<T>::type coef;  // scale / (1 - p)
  uint32_t key, thr;
  const int64_t* seed;  // the seed in device memory (key then formed in the kernel), or null: key given
};

// flat_key of csrc/hash.h (a host function there), for a seed read from device memory: a captured CUDA
// graph's replay reads the seed its own RNG draw just wrote, so every replay gets a new mask.
__device__ __forceinline__ uint32_t device_flat_key(const int64_t* seed) {
  return fmix32(static_cast<uint32_t>(*seed) ^ 0x9e3779b9u);
}

// Idx is int32_t when every element index of E fits, which keeps the per-vector divisions cheap.
template <typename T, int VEC, typename Idx>
__global__ void __launch_bounds__(kThreads) assemble_kernel(const FwdParams<T> p) {
  using A = typename AccOf<T>::type;
  const Idx D = static_cast<Idx>(p.D), a = static_cast<Idx>(p.a), n = static_cast<Idx>(p.n);
  const Idx L = a + n + static_cast<Idx>(p.s);
  const Idx Dv = D / VEC;
  const Idx total = static_cast<Idx>(p.C) * L * Dv;
  const Idx stride = static_cast<Idx>(gridDim.x) * kThreads;
  const uint32_t key = (p.dropout && p.seed != nullptr) ? device_flat_key(p.seed) : p.key;
  for (Idx v = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; v < total; v += stride) {
    const Idx row = v / Dv;
    const Idx j = (v - row * Dv) * VEC;
    const Idx c = row / L;
    const Idx l = row - c * L;
    A x[VEC];
    if (l < a) {
      load<VEC>(p.prefix + static_cast<int64_t>(c) * p.pre_cs + static_cast<int64_t>(l) * p.pre_ts + j, x);
    } else if (l >= a + n) {
      load<VEC>(p.suffix + static_cast<int64_t>(c) * p.suf_cs + static_cast<int64_t>(l - a - n) * p.suf_ts + j, x);
    } else {
      const Idx i = l - a;
      load<VEC>(p.base + c * static_cast<Idx>(p.base_cstride) + i * D + j, x);
      if (p.la != nullptr) {
        A q[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) q[e] = A(0);
        const T* arow = p.la + c * static_cast<Idx>(p.a_cstride) + i * static_cast<Idx>(p.r);
        for (int64_t k = 0; k < p.r; ++k) {
          const A ak = to_acc(arow[k]);
          A bk[VEC];
          load<VEC>(p.lb + static_cast<Idx>(k) * D + j, bk);
#pragma unroll
          for (int e = 0; e < VEC; ++e) q[e] += ak * bk[e];
        }
        if (p.dropout) {
          const uint32_t idx0 = static_cast<uint32_t>(
              (static_cast<int64_t>(p.a_per_class ? c : 0) * p.n + i) * p.D + j);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const bool keep = flat_keep(idx0 + e, key, p.thr);
            x[e] += keep ? p.coef * q[e] : A(0);
          }
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) x[e] += p.coef * q[e];
        }
      }
    }
    if (p.pos != nullptr) {
      A pv[VEC];
      load<VEC>(p.pos + l * D + j, pv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[e] += pv[e];
    }
    store<VEC>(p.out + row * D + j, x);
  }
}

// part[chunk] = sum over the chunk's classes of grad[c, rows]; elements are (rows x D) flattened, at
// `offset` inside each class of `class_stride` elements.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) reduce_partial_kernel(const T* __restrict__ grad,
                                                                  typename AccOf<T>::type* __restrict__ part,
                                                                  int64_t C, int64_t class_stride,
                                                                  int64_t offset, int64_t elems, int64_t chunk) {
  using A = typename AccOf<T>::type;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t c1 = c0 + chunk < C ? c0 + chunk : C;
  A* out = part + static_cast<int64_t>(blockIdx.y) * elems;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * VEC;
  for (int64_t e = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC; e < elems; e += stride) {
    A acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = A(0);
    for (int64_t c = c0; c < c1; ++c) {
      A g[VEC];
      load<VEC>(grad + c * class_stride + offset + e, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += g[k];
    }
    store<VEC>(out + e, acc);
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) reduce_final_kernel(const A* __restrict__ part, A* __restrict__ out,
                                                                int64_t chunks, int64_t elems) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < elems; e += stride) {
    A s = A(0);
    for (int64_t k = 0; k < chunks; ++k) s += part[k * elems + e];  // chunk order: deterministic
    out[e] = s;
  }
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

unsigned int blocks_for(int64_t work) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks)));
}

template <typename T, int VEC>
void launch_forward(const FwdParams<T>& p, cudaStream_t stream) {
  const int64_t vectors = p.C * (p.a + p.n + p.s) * (p.D / VEC);
  const unsigned int blocks = blocks_for(vectors);
  if (p.C * (p.a + p.n + p.s) * p.D < (int64_t(1) << 30)) {  // v + stride stays below 2^31
    assemble_kernel<T, VEC, int32_t><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    assemble_kernel<T, VEC, int64_t><<<blocks, kThreads, 0, stream>>>(p);
  }
}

template <typename T>
cudaError_t forward_typed(const AssembleArgs& g, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  FwdParams<T> p;
  p.out = static_cast<T*>(g.out);
  p.prefix = static_cast<const T*>(g.prefix);
  p.suffix = static_cast<const T*>(g.suffix);
  p.base = static_cast<const T*>(g.base);
  p.la = static_cast<const T*>(g.lowrank_a);
  p.lb = static_cast<const T*>(g.lowrank_b);
  p.pos = static_cast<const T*>(g.pos);
  p.C = g.classes, p.a = g.prefix_len, p.n = g.prompt_len, p.s = g.suffix_len, p.D = g.width;
  p.pre_cs = g.prefix_strides[0], p.pre_ts = g.prefix_strides[1];
  p.suf_cs = g.suffix_strides[0], p.suf_ts = g.suffix_strides[1];
  p.r = p.la != nullptr ? g.rank : 0;
  p.base_cstride = g.base_per_class ? g.prompt_len * g.width : 0;
  p.a_cstride = g.a_per_class ? g.prompt_len * g.rank : 0;
  p.a_per_class = g.a_per_class;
  p.dropout = p.la != nullptr && g.dropout > 0;
  p.coef = static_cast<A>(g.scale / (1.0 - g.dropout));
  p.seed = g.seed_ptr;
  p.key = g.seed_ptr != nullptr ? 0u : flat_key(g.seed);
  p.thr = dropout_threshold(g.dropout);
  if (p.C * (p.a + p.n + p.s) * p.D == 0) return cudaSuccess;
  constexpr int VEC = 16 / sizeof(T);
  const bool strides_ok = p.pre_cs % VEC == 0 && p.pre_ts % VEC == 0 && p.suf_cs % VEC == 0 && p.suf_ts % VEC == 0;
  const bool vec_ok = p.D % VEC == 0 && strides_ok && aligned(p.out, 16) && aligned(p.prefix, 16) && aligned(p.suffix, 16) &&
                      aligned(p.base, 16) && aligned(p.lb, 16) && aligned(p.pos, 16);
  if (vec_ok) {
    launch_forward<T, VEC>(p, stream);
  } else {
    launch_forward<T, 1>(p, stream);
  }
  return cudaGetLastError();
}

int64_t chunk_size(int64_t classes) {
  return std::max<int64_t>(kMinChunk, (classes + kMaxChunks - 1) / kMaxChunks);
}

template <typename T>
cudaError_t reduce_typed(void* out_acc, void* workspace_acc, const void* grad_v, int64_t C, int64_t L,
                         int64_t start, int64_t end, int64_t D, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const T* grad = static_cast<const T*>(grad_v);
  A* out = static_cast<A*>(out_acc);
  const int64_t elems = (end - start) * D;
  if (elems == 0) return cudaSuccess;
  if (C == 0) return cudaMemsetAsync(out, 0, sizeof(A) * elems, stream);
  const int64_t chunk = chunk_size(C);
  const int64_t chunks = (C + chunk - 1) / chunk;
  A* part = chunks > 1 ? static_cast<A*>(workspace_acc) : out;
  if (part == nullptr) return cudaErrorInvalidValue;
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_ok = D % VEC == 0 && aligned(grad, 16) && aligned(part, sizeof(A) * VEC);
  const dim3 grid(blocks_for(vec_ok ? elems / VEC : elems), static_cast<unsigned int>(chunks));
  if (vec_ok) {
    reduce_partial_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(grad, part, C, L * D, start * D, elems, chunk);
  } else {
    reduce_partial_kernel<T, 1><<<grid, kThreads, 0, stream>>>(grad, part, C, L * D, start * D, elems, chunk);
  }
  if (chunks > 1) reduce_final_kernel<A><<<blocks_for(elems), kThreads, 0, stream>>>(part, out, chunks, elems);
  return cudaGetLastError();
}

}  // namespace

cudaError_t assemble_prompts_forward(int dtype, const AssembleArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return forward_typed<float>(args, stream);
    case kFloat16: return forward_typed<__half>(args, stream);
    case kBFloat16: return forward_typed<__nv_bfloat16>(args, stream);
    case kFloat64: return forward_typed<double>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

int64_t assemble_prompts_reduce_workspace(int64_t classes, int64_t rows, int64_t width) {
  if (classes <= 0) return 0;
  const int64_t chunk = chunk_size(classes);
  const int64_t chunks = (classes + chunk - 1) / chunk;
  return chunks > 1 ? chunks * rows * width : 0;
}

cudaError_t assemble_prompts_reduce(int dtype, void* out_acc, void* workspace_acc, const void* grad,
                                    int64_t classes, int64_t length, int64_t start, int64_t end,
                                    int64_t width, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return reduce_typed<float>(out_acc, workspace_acc, grad, classes, length, start, end, width, stream);
    case kFloat16: return reduce_typed<__half>(out_acc, workspace_acc, grad, classes, length, start, end, width, stream);
    case kBFloat16:
      return reduce_typed<__nv_bfloat16>(out_acc, workspace_acc, grad, classes, length, start, end, width, stream);
    case kFloat64: return reduce_typed<double>(out_acc, workspace_acc, grad, classes, length, start, end, width, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ladder_kernels
