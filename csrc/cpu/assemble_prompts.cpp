// RLP prompt assembly on the CPU (docs/design.md, section 2):
//
//   P    = base + scale * dropout(A B)      base: (n, D) or (C, n, D); A: (n, r) or (C, n, r); B: (r, D)
//   E[c] = concat(prefix[c], P[c], suffix[c]) (+ pos)
//
// One pass over memory: each thread builds the n prompt rows in a small fp32 scratch (once per chunk of
// classes when P is shared, per class when it is class-specific) and streams prefix, scratch and suffix
// rows into E, adding pos from cache. A B, the expanded P and the concatenation never reach memory.
//
// Dropout keeps element idx of Q = A B (flat index in Q) when (h >> 8) >= thr, with
// h = fmix32(fmix32(idx ^ key) + key), key = fmix32(seed ^ 0x9e3779b9), thr = floor(p 2^24 + 0.5): the
// flat stream of csrc/hash.h, shared with the CUDA kernel and mirrored in ladder_kernels/_dropout.py.
//
// The backward's class reduction sums each output element over classes in class order, with threads
// splitting the elements (never the classes), so the bits do not depend on the thread count.

// Light headers (no <ATen/ATen.h>, no <torch/library.h>: csrc/ops.cpp registers the kernels), which
// keeps a first build quick.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include "../hash.h"
#include "../common.h"
#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace ladder_kernels {
namespace cpu {
namespace {

using at::Tensor;

// A fresh output of many MB costs more in 4 KB page faults than in copying (4x on the CI machine):
// ask for transparent huge pages on its 2 MB-aligned interior before the first write. Only a hint.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t start = (p + kHuge - 1) & ~(kHuge - 1), end = (p + t.nbytes()) & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}


template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

struct Layout {
  int64_t C, a, n, s, D, r;
  int64_t pre_cs, pre_ts, suf_cs, suf_ts;  // prefix / suffix strides (class, token): views of a layout
  bool base_per_class, a_per_class;
  double coef;  // scale / (1 - p)
  uint32_t key, thr;
  bool dropout;
};

// The n prompt rows of class c into `prompt` (n x D, acc_t); `q` is a D-long scratch.
template <typename scalar_t, typename acc_t>
void build_prompt(const Layout& g, int64_t c, const scalar_t* base, const scalar_t* A, const scalar_t* B,
                  acc_t* prompt, acc_t* q) {
  const int64_t D = g.D, n = g.n, r = g.r;
  const scalar_t* base_c = base + (g.base_per_class ? c * n * D : 0);
  const scalar_t* a_c = A ? A + (g.a_per_class ? c * n * r : 0) : nullptr;
  const acc_t coef = static_cast<acc_t>(g.coef);
  for (int64_t i = 0; i < n; ++i) {
    acc_t* row = prompt + i * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) row[j] = static_cast<acc_t>(base_c[i * D + j]);
    if (!a_c) continue;
    std::fill(q, q + D, acc_t(0));
    for (int64_t k = 0; k < r; ++k) {
      const acc_t ak = static_cast<acc_t>(a_c[i * r + k]);
      const scalar_t* bk = B + k * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) q[j] += ak * static_cast<acc_t>(bk[j]);
    }
    if (g.dropout) {
      const uint32_t idx0 = static_cast<uint32_t>(((g.a_per_class ? c : 0) * n + i) * D);
      for (int64_t j = 0; j < D; ++j)
        row[j] += flat_keep(idx0 + static_cast<uint32_t>(j), g.key, g.thr) ? coef * q[j] : acc_t(0);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) row[j] += coef * q[j];
    }
  }
}

template <typename scalar_t, typename acc_t, typename src_t>
void write_row(scalar_t* out, const src_t* src, const acc_t* pos, int64_t D) {
  if (pos) {
#pragma omp simd
    for (int64_t j = 0; j < D; ++j)
      out[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) + pos[j]);
  } else if constexpr (std::is_same_v<scalar_t, src_t>) {
    std::memcpy(out, src, sizeof(scalar_t) * D);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) out[j] = static_cast<scalar_t>(src[j]);
  }
}

template <typename scalar_t, typename acc_t>
void assemble_classes(const Layout& g, int64_t c0, int64_t c1, const scalar_t* prefix, const scalar_t* suffix,
                      const scalar_t* base, const scalar_t* A, const scalar_t* B, const acc_t* pos,
                      scalar_t* out) {
  const int64_t D = g.D, L = g.a + g.n + g.s;
  const bool per_class = g.base_per_class || g.a_per_class;
  std::vector<acc_t> prompt(g.n * D), q(D);
  for (int64_t c = c0; c < c1; ++c) {
    if (per_class || c == c0) build_prompt<scalar_t, acc_t>(g, c, base, A, B, prompt.data(), q.data());
    scalar_t* oc = out + c * L * D;
    for (int64_t l = 0; l < g.a; ++l)
      write_row<scalar_t, acc_t>(oc + l * D, prefix + c * g.pre_cs + l * g.pre_ts, pos ? pos + l * D : nullptr, D);
    for (int64_t i = 0; i < g.n; ++i) {
      const int64_t l = g.a + i;
      write_row<scalar_t, acc_t>(oc + l * D, prompt.data() + i * D, pos ? pos + l * D : nullptr, D);
    }
    for (int64_t t = 0; t < g.s; ++t) {
      const int64_t l = g.a + g.n + t;
      write_row<scalar_t, acc_t>(oc + l * D, suffix + c * g.suf_cs + t * g.suf_ts, pos ? pos + l * D : nullptr, D);
    }
  }
}

}  // namespace

Tensor assemble_prompts_fwd(const Tensor& prefix, const Tensor& suffix, const Tensor& base,
                                const std::optional<Tensor>& lowrank_a, const std::optional<Tensor>& lowrank_b,
                                const std::optional<Tensor>& pos, double scale, double dropout,
                                const Tensor& seed) {
  // Shapes, dtypes and devices were checked once, at the public call (ladder_kernels/ops/assemble_prompts.py).
  TORCH_CHECK(prefix.dim() == 3 && suffix.dim() == 3, "assemble_prompts_fwd: prefix and suffix must be 3-D");
  const bool lowrank = lowrank_a.has_value() && lowrank_a->defined();
  TORCH_CHECK(!lowrank || (lowrank_b.has_value() && lowrank_b->defined()), "assemble_prompts_fwd: lowrank_b missing");
  Layout g{};
  g.C = prefix.size(0), g.a = prefix.size(1), g.D = prefix.size(2), g.n = base.size(-2), g.s = suffix.size(1);
  g.r = lowrank ? lowrank_b->size(0) : 0;
  g.base_per_class = base.dim() == 3;
  g.a_per_class = lowrank && lowrank_a->dim() == 3;
  g.coef = scale / (1.0 - dropout);
  g.dropout = lowrank && dropout > 0;
  g.key = flat_key(seed_value(seed, "assemble_prompts_fwd"));
  g.thr = dropout_threshold(dropout);
  const int64_t L = g.a + g.n + g.s;
  const auto acc = acc_type(prefix.scalar_type());

  // prefix and suffix are read through their strides (the pipeline passes slices of a cached layout):
  // only a non-unit stride along D makes a copy.
  const Tensor pre = prefix.stride(2) == 1 ? prefix : prefix.contiguous();
  const Tensor suf = suffix.stride(2) == 1 ? suffix : suffix.contiguous();
  const Tensor bas = base.contiguous();
  g.pre_cs = pre.stride(0), g.pre_ts = pre.stride(1), g.suf_cs = suf.stride(0), g.suf_ts = suf.stride(1);
  const Tensor A = lowrank ? lowrank_a->contiguous() : Tensor();
  const Tensor B = lowrank ? lowrank_b->contiguous() : Tensor();
  const Tensor pos_a = (pos.has_value() && pos->defined()) ? pos->to(acc).contiguous() : Tensor();
  Tensor out = at::empty({g.C, L, g.D}, pre.options());
  if (out.numel() == 0) return out;
  advise_huge_pages(out);

  // Enough classes per task to amortise a shared prompt's build, few enough to spread over threads.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, L * g.D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pre.scalar_type(), "assemble_prompts_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, g.C, grain, [&](int64_t c0, int64_t c1) {
      assemble_classes<scalar_t, acc_t>(g, c0, c1, pre.const_data_ptr<scalar_t>(), suf.const_data_ptr<scalar_t>(),
                                        bas.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(A),
                                        ptr_or_null<scalar_t>(B), ptr_or_null<acc_t>(pos_a),
                                        out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

namespace {

template <typename scalar_t, typename acc_t>
void add_classes(const scalar_t* grad, acc_t* out, int64_t C, int64_t class_stride, int64_t e0, int64_t e1) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* src = grad + c * class_stride;
#pragma omp simd
    for (int64_t e = e0; e < e1; ++e) out[e] += static_cast<acc_t>(src[e]);
  }
}

}  // namespace

Tensor assemble_prompts_reduce(const Tensor& grad, int64_t start, int64_t end) {
  TORCH_CHECK(grad.dim() == 3, "assemble_prompts_reduce: grad must be 3-D");
  const int64_t C = grad.size(0), L = grad.size(1), D = grad.size(2);
  TORCH_CHECK(0 <= start && start <= end && end <= L, "assemble_prompts_reduce: bad row range");
  const Tensor g = grad.contiguous();
  const int64_t rows = end - start;
  Tensor out = at::zeros({rows, D}, g.options().dtype(acc_type(g.scalar_type())));
  if (out.numel() == 0 || C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "assemble_prompts_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Rows start..end of one class are contiguous, so an element's offset is the same in every class.
    const scalar_t* base = g.const_data_ptr<scalar_t>() + start * D;
    acc_t* o = out.mutable_data_ptr<acc_t>();
    // Each task gets >= ~1M additions: a prompt's few rows are summed faster than threads wake up.
    const int64_t grain = std::max<int64_t>(2048, (int64_t(1) << 20) / C);
    at::parallel_for(0, rows * D, grain, [&](int64_t e0, int64_t e1) {
      add_classes<scalar_t, acc_t>(base, o, C, L * D, e0, e1);
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace ladder_kernels
