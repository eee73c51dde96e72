// Ladder gated fusion on the CPU (docs/design.md, section 1):
//
//   Z   = X W^T + b          X: (M, D) tap, W: (d, D), b: (d,)
//   out = mu * s + (1 - mu) * Z     mu: (d,) = sigmoid(alpha / T), computed by the caller
//
// Rows are processed in fixed blocks of kRowBlock: a block's GEMM runs in BLAS and the bias, gate and
// blend epilogue runs on its Z while it is still in cache, so Z never makes a round trip to memory.
// Reductions over rows use the same fixed blocks and add the block partials in order, so results do not
// depend on the number of threads and two runs give identical bits.

// Light headers (no <ATen/ATen.h>, no <torch/library.h>: csrc/ops.cpp registers the kernels), which
// keeps a first build quick.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include "../common.h"
#include "kernels.h"

#include <algorithm>
#include <optional>
#include <tuple>

namespace ladder_kernels {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kRowBlock = 256;     // rows per forward GEMM block: its Z (256 x d) stays in L2
constexpr int64_t kReduceBlock = 256;  // rows per partial sum in the backward reductions

// The blend on a block's Z. bias is never null (zeros when the op has none) and the diff store has a
// loop of its own, so neither loop branches per element (as in grad_rows below; here the GEMM is the
// time, so the forward gained only about 1%).
template <typename scalar_t, typename acc_t>
void blend_rows(const acc_t* z, const scalar_t* s, const acc_t* bias, const acc_t* mu,
                const acc_t* one_minus_mu, scalar_t* out, scalar_t* diff, int64_t rows, int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* zr = z + i * d;
    const scalar_t* sr = s + i * d;
    scalar_t* outr = out + i * d;
    if (diff) {
      scalar_t* diffr = diff + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const acc_t zj = zr[j] + bias[j], sj = static_cast<acc_t>(sr[j]);
        outr[j] = static_cast<scalar_t>(mu[j] * sj + one_minus_mu[j] * zj);
        diffr[j] = static_cast<scalar_t>(sj - zj);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j)
        outr[j] = static_cast<scalar_t>(mu[j] * static_cast<acc_t>(sr[j]) + one_minus_mu[j] * (zr[j] + bias[j]));
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor> gated_fusion_fwd(const Tensor& side, const Tensor& tap,
                                                const Tensor& weight,
                                                const std::optional<Tensor>& bias, const Tensor& mu,
                                                bool save_diff) {
  at::NoGradGuard no_grad;  // autograd is the caller's; the tap may require grad
  TORCH_CHECK(side.dim() == 2 && tap.dim() == 2 && weight.dim() == 2, "expected 2-D side, tap, weight");
  const Tensor s = side.contiguous();
  const Tensor x = tap.contiguous();
  const int64_t M = s.size(0), d = s.size(1);
  const auto acc = acc_type(s.scalar_type());
  Tensor out = at::empty({M, d}, s.options());
  Tensor diff = at::empty({save_diff ? M : 0, d}, s.options());
  const Tensor wt = weight.t().to(acc).contiguous();  // (D, d), widened once
  const Tensor mu_a = mu.to(acc).contiguous();
  const Tensor omu_a = mu_a.neg().add_(1);
  const Tensor bias_a = bias.has_value() ? bias->to(acc).contiguous() : at::zeros({d}, s.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "gated_fusion_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, num_blocks(M, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_worker;  // grad mode is thread-local: mm_out on a tap that requires grad
      Tensor z = at::empty({kRowBlock, d}, s.options().dtype(acc));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, M - r0);
        Tensor zb = z.narrow(0, 0, rows);
        at::mm_out(zb, x.narrow(0, r0, rows).to(acc), wt);
        blend_rows<scalar_t, acc_t>(
            zb.const_data_ptr<acc_t>(), s.const_data_ptr<scalar_t>() + r0 * d,
            bias_a.const_data_ptr<acc_t>(), mu_a.const_data_ptr<acc_t>(),
            omu_a.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>() + r0 * d,
            save_diff ? diff.mutable_data_ptr<scalar_t>() + r0 * d : nullptr, rows, d);
      }
    });
  });
  return {out, diff};
}

namespace {

// Rows [r0, r1) of the backward's single pass, one branch-free loop per output: with the optional
// outputs tested inside one loop it did not vectorise, and took twice as long (0.33 vs 0.16 ms at
// M = 32 x 197, d = 96). The pragmas live here: they cannot sit inside the AT_DISPATCH macro's arguments.
template <typename scalar_t, typename acc_t>
void grad_rows(const scalar_t* g, const scalar_t* diff, const acc_t* mu, scalar_t* d_side,
               acc_t* sum_g, acc_t* sum_gd, int64_t r0, int64_t r1, int64_t d) {
  for (int64_t i = r0; i < r1; ++i) {
    const scalar_t* gr = g + i * d;
    if (d_side) {
      scalar_t* dr = d_side + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) dr[j] = static_cast<scalar_t>(mu[j] * static_cast<acc_t>(gr[j]));
    }
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) sum_g[j] += static_cast<acc_t>(gr[j]);
    if (sum_gd) {
      const scalar_t* fr = diff + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) sum_gd[j] += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(fr[j]);
    }
  }
}

// One pass over grad (and diff): d_side = mu * grad, and per-channel column sums of grad and of
// grad * diff, returned in the accumulation dtype.
}  // namespace

std::tuple<Tensor, Tensor, Tensor> gated_fusion_bwd_rows(const Tensor& grad,
                                                             const std::optional<Tensor>& diff,
                                                             const Tensor& mu, bool need_side) {
  const Tensor g = grad.contiguous();
  const Tensor df = diff.has_value() ? diff->contiguous() : Tensor();
  const int64_t M = g.size(0), d = g.size(1);
  const auto acc = acc_type(g.scalar_type());
  const int64_t nb = num_blocks(M, kReduceBlock);
  Tensor d_side = at::empty({need_side ? M : 0, d}, g.options());
  Tensor part_g = at::zeros({nb, d}, g.options().dtype(acc));
  Tensor part_gd = at::zeros({df.defined() ? nb : 0, d}, g.options().dtype(acc));
  const Tensor mu_a = mu.to(acc).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "gated_fusion_bwd_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_worker;  // grad mode is thread-local
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kReduceBlock, r1 = std::min(M, r0 + kReduceBlock);
        grad_rows<scalar_t, acc_t>(
            g.const_data_ptr<scalar_t>(), df.defined() ? df.const_data_ptr<scalar_t>() : nullptr,
            mu_a.const_data_ptr<acc_t>(), need_side ? d_side.mutable_data_ptr<scalar_t>() : nullptr,
            part_g.mutable_data_ptr<acc_t>() + blk * d,
            df.defined() ? part_gd.mutable_data_ptr<acc_t>() + blk * d : nullptr, r0, r1, d);
      }
    });
  });
  // Block partials are added in block order: the same bits whatever the thread count.
  Tensor col_g = at::zeros({d}, g.options().dtype(acc));
  Tensor col_gd = at::zeros({df.defined() ? d : 0}, g.options().dtype(acc));
  for (int64_t blk = 0; blk < nb; ++blk) {
    col_g.add_(part_g[blk]);
    if (df.defined()) col_gd.add_(part_gd[blk]);
  }
  return {d_side, col_g, col_gd};
}

namespace {

// grad^T @ (tap * tap_scale[:, None]): the tap may be a float8 copy with one scale per row. A tap
// already in the accumulation dtype goes to BLAS whole; otherwise rows go through in blocks, each
// widened once, so no full-size fp32 copy of the tap is ever made. Blocks are added in order.
}  // namespace

Tensor gated_fusion_bwd_weight(const Tensor& grad, const Tensor& tap,
                                   const std::optional<Tensor>& tap_scale) {
  const int64_t M = grad.size(0), d = grad.size(1), D = tap.size(1);
  const auto acc = acc_type(grad.scalar_type());
  if (!tap_scale.has_value() && tap.scalar_type() == acc) return at::mm(grad.t(), tap);
  Tensor dw = at::zeros({d, D}, grad.options().dtype(acc));
  constexpr int64_t kBlock = 8192;  // large enough that BLAS runs near its peak on each block
  for (int64_t r0 = 0; r0 < M; r0 += kBlock) {
    const int64_t rows = std::min(kBlock, M - r0);
    Tensor gb = grad.narrow(0, r0, rows).to(acc);
    if (tap_scale.has_value()) gb = gb.mul(tap_scale->narrow(0, r0, rows).to(acc).unsqueeze(1));
    dw.addmm_(gb.t(), tap.narrow(0, r0, rows).to(acc));
  }
  return dw;
}

}  // namespace cpu
}  // namespace ladder_kernels
