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
#include <cmath>
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
#include <vector>

namespace ladder_kernels {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kRowBlock = 256;     // rows per forward GEMM block: its Z (256 x d) stays in L2
constexpr int64_t kReduceBlock = 256;  // rows per partial sum in the backward reductions

// The blend on a block's Z. The bias pointer is never null (zeros when the op has none) and the diff
// store has a loop of its own, so neither loop branches per element (as in grad_rows below; here the
// GEMM is the time, so the forward gained only about 1%).
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

// grad^T @ (tap * tap_scale[:, None]) in the accumulation dtype: the tap may be a float8 copy with one
// scale per row. A tap already in the accumulation dtype goes to BLAS whole; otherwise rows go through
// in blocks, each widened once, so no full-size fp32 copy of the tap is ever made. Blocks add in order.
Tensor grad_weight(const Tensor& grad, const Tensor& tap, const std::optional<Tensor>& tap_scale,
                   at::ScalarType acc) {
  const int64_t M = grad.size(0), d = grad.size(1), D = tap.size(1);
  if (!tap_scale.has_value() && tap.scalar_type() == acc) return at::mm(widened(grad, acc).t(), tap);
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

// out[n, k] = scale[n] * in[n, k], cast to out's dtype (in place when the dtypes agree).
template <typename scalar_t, typename acc_t>
void scale_rows(const acc_t* in, const acc_t* scale, scalar_t* out, int64_t n, int64_t k) {
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) out[i * k + j] = static_cast<scalar_t>(scale[i] * in[i * k + j]);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> gated_fusion_fwd(const Tensor& side, const Tensor& tap, const Tensor& weight,
                                            const std::optional<Tensor>& bias, const Tensor& mu,
                                            bool save_diff) {
  const KernelGuard guard;  // no autograd, no autocast inside (common.h)
  const int64_t M = side.size(0), d = side.size(1);
  const auto acc = acc_type(side.scalar_type());
  TORCH_CHECK(side.dim() == 2 && tap.dim() == 2 && weight.dim() == 2, "expected 2-D side, tap, weight");
  TORCH_CHECK(mu.numel() == d && mu.scalar_type() == acc && mu.is_contiguous(), "gated_fusion_fwd: mu must be a "
              "contiguous (d,) tensor in the accumulation dtype");
  // Few ATen calls on purpose: at the sizes where the host path matters each costs as much as the maths.
  const Tensor s = side.contiguous(), x = tap.contiguous();
  const Tensor wt = widened(weight, acc).t();  // a view: BLAS reads W transposed, no copy
  const Tensor bias_a = bias.has_value() ? widened(*bias, acc).contiguous() : Tensor();
  Tensor out = at::empty({M, d}, s.options());
  Tensor diff = save_diff ? at::empty({M, d}, s.options()) : at::empty({0}, s.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "gated_fusion_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* mu_p = mu.const_data_ptr<acc_t>();
    std::vector<acc_t> omu(d), zeros(bias_a.defined() ? 0 : d, acc_t(0));
    for (int64_t j = 0; j < d; ++j) omu[j] = acc_t(1) - mu_p[j];
    const acc_t* bias_p = bias_a.defined() ? bias_a.const_data_ptr<acc_t>() : zeros.data();
    auto blend = [&](const Tensor& z, int64_t r0, int64_t rows) {
      blend_rows<scalar_t, acc_t>(z.const_data_ptr<acc_t>(), s.const_data_ptr<scalar_t>() + r0 * d, bias_p, mu_p,
                                  omu.data(), out.mutable_data_ptr<scalar_t>() + r0 * d,
                                  save_diff ? diff.mutable_data_ptr<scalar_t>() + r0 * d : nullptr, rows, d);
    };
    if (M <= kRowBlock) {  // one block: one GEMM call, no scratch of our own
      if (M > 0) blend(at::mm(widened(x, acc), wt), 0, M);
      return;
    }
    at::parallel_for(0, num_blocks(M, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_worker;  // grad mode is thread-local: mm_out on a tap that requires grad
      Tensor z = at::empty({kRowBlock, d}, s.options().dtype(acc));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, M - r0);
        Tensor zb = z.narrow(0, 0, rows);
        at::mm_out(zb, widened(x.narrow(0, r0, rows), acc), wt);
        blend(zb, r0, rows);
      }
    });
  });
  return {out, diff};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_fusion_bwd(
    const Tensor& grad, const std::optional<Tensor>& diff, const std::optional<Tensor>& tap,
    const std::optional<Tensor>& tap_scale, const std::optional<Tensor>& weight, const Tensor& mu,
    double temperature, bool scalar_gate, bool need_side, bool need_tap, bool need_weight, bool need_bias,
    bool need_gate) {
  const KernelGuard guard;  // no autograd, no autocast inside (common.h)
  const Tensor g = grad.contiguous();
  const int64_t M = g.size(0), d = g.size(1);
  const auto acc = acc_type(g.scalar_type());
  TORCH_CHECK(mu.numel() == d && mu.scalar_type() == acc && mu.is_contiguous(), "gated_fusion_bwd: mu must be a "
              "contiguous (d,) tensor in the accumulation dtype");
  TORCH_CHECK(!need_gate || diff.has_value(), "gated_fusion_bwd: the gate's gradient needs s - Z");
  TORCH_CHECK(!need_weight || tap.has_value(), "gated_fusion_bwd: the weight's gradient needs the tap");
  TORCH_CHECK(!need_tap || weight.has_value(), "gated_fusion_bwd: the tap's gradient needs the weight");
  const Tensor df = need_gate ? diff->contiguous() : Tensor();
  const bool rows_pass = need_side || need_bias || need_gate;
  Tensor d_side = at::empty({need_side ? M : 0, d}, g.options());
  Tensor d_bias = at::empty({need_bias ? d : 0}, g.options());
  Tensor d_gate = at::empty({need_gate ? (scalar_gate ? 1 : d) : 0}, g.options().dtype(acc));
  Tensor d_tap = at::empty({0}, g.options()), d_weight = at::empty({0}, g.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "gated_fusion_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* mu_p = mu.const_data_ptr<acc_t>();
    std::vector<acc_t> omu(d);
    for (int64_t j = 0; j < d; ++j) omu[j] = acc_t(1) - mu_p[j];
    if (rows_pass && M > 0) {
      // Per-block partial sums, added in block order: the same bits whatever the thread count.
      const int64_t nb = num_blocks(M, kReduceBlock);
      std::vector<acc_t> part_g(nb * d, acc_t(0)), part_gd(need_gate ? nb * d : 0, acc_t(0));
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * kReduceBlock, r1 = std::min(M, r0 + kReduceBlock);
          grad_rows<scalar_t, acc_t>(g.const_data_ptr<scalar_t>(), need_gate ? df.const_data_ptr<scalar_t>() : nullptr,
                                     mu_p, need_side ? d_side.mutable_data_ptr<scalar_t>() : nullptr,
                                     part_g.data() + blk * d, need_gate ? part_gd.data() + blk * d : nullptr, r0, r1, d);
        }
      });
      std::vector<acc_t> col_g(d, acc_t(0)), col_gd(d, acc_t(0));
      for (int64_t blk = 0; blk < nb; ++blk)
        for (int64_t j = 0; j < d; ++j) {
          col_g[j] += part_g[blk * d + j];
          if (need_gate) col_gd[j] += part_gd[blk * d + j];
        }
      if (need_bias)  // db = (1 - mu) sum_rows G
        for (int64_t j = 0; j < d; ++j) d_bias.mutable_data_ptr<scalar_t>()[j] = static_cast<scalar_t>(omu[j] * col_g[j]);
      if (need_gate) {  // dalpha = dmu mu (1 - mu) / T, dmu = sum_rows G (s - Z); summed in order for a scalar gate
        acc_t* out = d_gate.mutable_data_ptr<acc_t>();
        const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
        // 1 / T past the accumulation type's range (a tiny accepted T): summed, then divided in double, so
        // a zero stays 0 and the rest overflows to +-inf, never 0 * inf = NaN, nor inf - inf in the sum
        if (std::isinf(inv_t)) {
          double total = 0;
          for (int64_t j = 0; j < d; ++j) {
            const double v = static_cast<double>(col_gd[j] * mu_p[j] * omu[j]);
            if (scalar_gate) total += v; else out[j] = static_cast<acc_t>(v / temperature);
          }
          if (scalar_gate) out[0] = static_cast<acc_t>(total / temperature);
        } else {
          acc_t total = 0;
          for (int64_t j = 0; j < d; ++j) {
            const acc_t v = col_gd[j] * mu_p[j] * omu[j] * inv_t;
            if (scalar_gate) total += v; else out[j] = v;
          }
          if (scalar_gate) out[0] = total;
        }
      }
    } else {
      if (need_bias) d_bias.zero_();
      if (need_gate) d_gate.zero_();
    }
    if (need_weight) {  // dW = (1 - mu)[:, None] G^T X
      const Tensor dw = grad_weight(g, *tap, tap_scale, acc).contiguous();
      d_weight = g.scalar_type() == acc ? dw : at::empty(dw.sizes(), g.options());
      scale_rows<scalar_t, acc_t>(dw.const_data_ptr<acc_t>(), omu.data(), d_weight.mutable_data_ptr<scalar_t>(),
                                  d, dw.size(1));
    }
    if (need_tap) {  // dX = G ((1 - mu)[:, None] W)
      const Tensor w = widened(*weight, acc).contiguous();
      Tensor ws = at::empty(w.sizes(), w.options());
      scale_rows<acc_t, acc_t>(w.const_data_ptr<acc_t>(), omu.data(), ws.mutable_data_ptr<acc_t>(), d, w.size(1));
      d_tap = at::mm(widened(g, acc), ws);
      if (g.scalar_type() != acc) d_tap = d_tap.to(g.scalar_type());
    }
  });
  return {d_side, d_tap, d_weight, d_bias, d_gate};
}

}  // namespace cpu
}  // namespace ladder_kernels
