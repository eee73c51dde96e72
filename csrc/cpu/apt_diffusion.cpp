// APT approximated prompt attention on the CPU (DESIGN.md section 3):
//
//   S = H Kt^T,  A = dropout(relu(S)),  w = max(0, max_j S[:, j]) (before dropout, no gradient)
//   out = exp(s) (Y + w (A P))
//
// The forward runs over fixed blocks of kRowBlock rows: a block's S (rows x p) lives in cache, relu,
// dropout and the row max run on it in place, and its A P GEMM feeds the epilogue directly, so no
// (M, p) tensor is ever allocated. The backward recomputes S block by block from H and Kt; row
// gradients (dH, dY) are written per block, and the reductions over rows (dKt = dS^T H,
// dP = (exp(s) w A)^T G, ds = sum G out) go through fixed chunks added in order, so two runs give the
// same bits. Its scratch is bounded by kChunk rows of (p + D) floats whatever M is.
//
// Dropout: keep(m, j) = (h >> 8) >= threshold with the 32-bit hash of ladder_kernels/ops/apt_diffusion.py,
// so the backward and every backend regenerate the forward's mask from the seed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../hash.h"
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

TORCH_LIBRARY_FRAGMENT(ladder_kernels_C, m) {
  // (out, w): out = exp(log_scale) (attn_out + w (A prompts)), A = dropout(relu(hidden kt^T)).
  m.def("apt_diffusion_fwd(Tensor hidden, Tensor attn_out, Tensor prompts, Tensor kt, Tensor log_scale, "
        "Tensor seed, float dropout) -> (Tensor, Tensor)");
  // (d_hidden, d_attn_out, d_prompts (direct term A^T dE), d_kt, d_log_scale); unneeded ones are empty.
  m.def("apt_diffusion_bwd(Tensor grad, Tensor? hidden, Tensor? out, Tensor prompts, Tensor kt, "
        "Tensor log_scale, Tensor? w, Tensor seed, float dropout, bool need_h, bool need_y, bool need_p, "
        "bool need_kt, bool need_s) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace ladder_kernels {
namespace {

using at::Tensor;

constexpr int64_t kRowBlock = 128;  // rows per block: S (128 x p) and E (128 x D) stay in L2
constexpr int64_t kChunk = 2048;    // rows per backward reduction step: bounds the scratch

struct Dropout {
  uint32_t seed = 0;
  uint32_t threshold = 0;  // 0: no dropout
  double scale = 1.0;

  Dropout(const Tensor& seed_t, double p) {
    if (p > 0) {
      seed = static_cast<uint32_t>(seed_t.item<int64_t>() & 0xFFFFFFFF);
      threshold = static_cast<uint32_t>(std::min<double>(1 << 24, std::floor(p * (1 << 24) + 0.5)));
      scale = 1.0 / (1.0 - p);
    }
  }
  uint32_t row_hash(int64_t row) const { return fmix32(static_cast<uint32_t>(row) * 0x9E3779B1u ^ seed); }
  bool keep(uint32_t row_h, int64_t col) const {
    return (fmix32(row_h ^ (static_cast<uint32_t>(col) * 0x85EBCA77u)) >> 8) >= threshold;
  }
};

// In place on a block's S: A = dropout(relu(S)); w = max(0, row max of S) (before dropout).
template <typename acc_t>
void activate_rows(acc_t* s, acc_t* w, int64_t r0, int64_t rows, int64_t p, const Dropout& drop) {
  const acc_t scale = static_cast<acc_t>(drop.scale);
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* sr = s + i * p;
    acc_t mx = 0;
    for (int64_t j = 0; j < p; ++j) mx = std::max(mx, sr[j]);
    w[i] = mx;
    if (drop.threshold) {
      const uint32_t rh = drop.row_hash(r0 + i);
      for (int64_t j = 0; j < p; ++j) sr[j] = (sr[j] > 0 && drop.keep(rh, j)) ? sr[j] * scale : acc_t(0);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < p; ++j) sr[j] = std::max(sr[j], acc_t(0));
    }
  }
}

template <typename scalar_t, typename acc_t>
void epilogue_rows(const acc_t* e, const scalar_t* y, const acc_t* w, acc_t ex, scalar_t* out, int64_t rows,
                   int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t wi = w[i];
#pragma omp simd
    for (int64_t k = 0; k < d; ++k)
      out[i * d + k] = static_cast<scalar_t>(ex * (static_cast<acc_t>(y[i * d + k]) + wi * e[i * d + k]));
  }
}

std::tuple<Tensor, Tensor> apt_diffusion_fwd_cpu(const Tensor& hidden, const Tensor& attn_out,
                                                 const Tensor& prompts, const Tensor& kt,
                                                 const Tensor& log_scale, const Tensor& seed, double dropout) {
  at::NoGradGuard no_grad;  // the custom op owns autograd; callers may hand in tensors requiring grad
  TORCH_CHECK(hidden.dim() == 2 && attn_out.dim() == 2 && prompts.dim() == 2 && kt.dim() == 2,
              "apt_diffusion_fwd: expected 2-D hidden, attn_out, prompts, kt");
  const Tensor h = hidden.contiguous(), y = attn_out.contiguous();
  const int64_t M = h.size(0), D = h.size(1), P = prompts.size(0);
  const auto acc = acc_type(h.scalar_type());
  Tensor out = at::empty({M, D}, h.options());
  Tensor w = at::empty({M}, h.options().dtype(acc));
  // Kt^T as a transposed view of the contiguous (p, D) Kt, not a (D, p) copy: MKL runs H Kt^T with a
  // p-wide output over 2x faster that way for small p (measured: 68 vs 149 us per 128-row block, p = 10).
  const Tensor kt_a = kt.to(acc).contiguous();  // (p, D), widened once
  const Tensor p_a = prompts.to(acc).contiguous();  // (p, D)
  const double ex = std::exp(log_scale.item<double>());
  const Dropout drop(seed, dropout);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "apt_diffusion_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, num_blocks(M, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_worker;  // grad mode is thread-local
      Tensor s = at::empty({kRowBlock, P}, h.options().dtype(acc));
      Tensor e = at::empty({kRowBlock, D}, h.options().dtype(acc));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, M - r0);
        Tensor sb = s.narrow(0, 0, rows), eb = e.narrow(0, 0, rows);
        at::mm_out(sb, h.narrow(0, r0, rows).to(acc), kt_a.t());
        activate_rows<acc_t>(sb.mutable_data_ptr<acc_t>(), w.mutable_data_ptr<acc_t>() + r0, r0, rows, P, drop);
        at::mm_out(eb, sb, p_a);
        epilogue_rows<scalar_t, acc_t>(eb.const_data_ptr<acc_t>(), y.const_data_ptr<scalar_t>() + r0 * D,
                                       w.const_data_ptr<acc_t>() + r0, static_cast<acc_t>(ex),
                                       out.mutable_data_ptr<scalar_t>() + r0 * D, rows, D);
      }
    });
  });
  return {out, w};
}

// dY = exp(s) G and the per-block partial of sum(G out), one pass over G (and out).
template <typename scalar_t, typename acc_t>
acc_t rows_dy_ds(const scalar_t* g, const scalar_t* out, scalar_t* d_y, acc_t ex, int64_t n) {
  acc_t sum = 0;
  for (int64_t k = 0; k < n; ++k) {
    const acc_t gk = static_cast<acc_t>(g[k]);
    if (d_y) d_y[k] = static_cast<scalar_t>(ex * gk);
    if (out) sum += gk * static_cast<acc_t>(out[k]);
  }
  return sum;
}

// On a block: S becomes dS = dA [S > 0] keep / (1 - p) and A_w = exp(s) w A (for dP = A_w^T G).
template <typename acc_t>
void grad_activation_rows(acc_t* s, acc_t* da, acc_t* a_w, const acc_t* w, acc_t ex, int64_t r0, int64_t rows,
                          int64_t p, const Dropout& drop) {
  const acc_t scale = static_cast<acc_t>(drop.scale);
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t rh = drop.threshold ? drop.row_hash(r0 + i) : 0;
    const acc_t ew = ex * w[i];
    for (int64_t j = 0; j < p; ++j) {
      const int64_t ij = i * p + j;
      const bool on = s[ij] > 0 && (!drop.threshold || drop.keep(rh, j));
      const acc_t f = drop.threshold ? scale : acc_t(1);
      if (a_w) a_w[ij] = on ? ew * s[ij] * f : acc_t(0);
      s[ij] = on ? da[ij] * f : acc_t(0);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> apt_diffusion_bwd_cpu(
    const Tensor& grad, const std::optional<Tensor>& hidden, const std::optional<Tensor>& out,
    const Tensor& prompts, const Tensor& kt, const Tensor& log_scale, const std::optional<Tensor>& w,
    const Tensor& seed, double dropout, bool need_h, bool need_y, bool need_p, bool need_kt, bool need_s) {
  at::NoGradGuard no_grad;
  const Tensor g = grad.contiguous();
  const int64_t M = g.size(0), D = g.size(1), P = prompts.size(0);
  const auto acc = acc_type(g.scalar_type());
  const double ex = std::exp(log_scale.item<double>());
  const Dropout drop(seed, dropout);
  TORCH_CHECK(!need_s || out.has_value(), "apt_diffusion_bwd: need_s requires out");
  const bool recompute = need_h || need_p || need_kt;
  TORCH_CHECK(!recompute || (hidden.has_value() && w.has_value()), "apt_diffusion_bwd: dH/dP/dKt need hidden and w");

  Tensor d_h = at::empty({need_h ? M : 0, D}, g.options());
  Tensor d_y = at::empty({need_y ? M : 0, D}, g.options());
  Tensor d_p = at::zeros({need_p ? P : 0, D}, g.options().dtype(acc));
  Tensor d_kt = at::zeros({need_kt ? P : 0, D}, g.options().dtype(acc));
  Tensor d_s = at::zeros({need_s ? 1 : 0}, log_scale.options());
  const Tensor o = need_s ? out->contiguous() : Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "apt_diffusion_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t ex_a = static_cast<acc_t>(ex);
    if (need_y || need_s) {
      const int64_t nb = num_blocks(M, kRowBlock);
      Tensor part = at::zeros({nb}, g.options().dtype(at::kDouble));
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, M - r0);
          part.mutable_data_ptr<double>()[blk] = rows_dy_ds<scalar_t, acc_t>(
              g.const_data_ptr<scalar_t>() + r0 * D, need_s ? o.const_data_ptr<scalar_t>() + r0 * D : nullptr,
              need_y ? d_y.mutable_data_ptr<scalar_t>() + r0 * D : nullptr, ex_a, rows * D);
        }
      });
      if (need_s) {
        double sum = 0;  // block partials in block order: the same bits whatever the thread count
        for (int64_t blk = 0; blk < nb; ++blk) sum += part.const_data_ptr<double>()[blk];
        d_s.fill_(sum);
      }
    }
    if (!recompute) return;
    const Tensor h = hidden->contiguous();
    const Tensor w_a = w->to(acc).contiguous();
    const Tensor kt_a = kt.to(acc).contiguous();      // (p, D)
    const Tensor p_a = prompts.to(acc).contiguous();  // (p, D); used transposed, as Kt (see the forward)
    Tensor ds_c = at::empty({std::min(kChunk, M), P}, g.options().dtype(acc));
    Tensor aw_c = at::empty({need_p ? std::min(kChunk, M) : 0, P}, g.options().dtype(acc));
    for (int64_t c0 = 0; c0 < M; c0 += kChunk) {
      const int64_t crows = std::min(kChunk, M - c0);
      at::parallel_for(0, num_blocks(crows, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
        at::NoGradGuard no_grad_worker;
        Tensor de = at::empty({kRowBlock, D}, g.options().dtype(acc));
        Tensor da = at::empty({kRowBlock, P}, g.options().dtype(acc));
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t i0 = blk * kRowBlock, r0 = c0 + i0, rows = std::min(kRowBlock, crows - i0);
          Tensor sb = ds_c.narrow(0, i0, rows), deb = de.narrow(0, 0, rows), dab = da.narrow(0, 0, rows);
          at::mm_out(sb, h.narrow(0, r0, rows).to(acc), kt_a.t());
          if (need_h || need_kt) {  // dE = exp(s) w G, then dA = dE P^T; dP alone needs neither
            at::mul_out(deb, g.narrow(0, r0, rows).to(acc), w_a.narrow(0, r0, rows).unsqueeze(1) * ex_a);
            at::mm_out(dab, deb, p_a.t());
          } else {
            dab.zero_();
          }
          grad_activation_rows<acc_t>(sb.mutable_data_ptr<acc_t>(), dab.mutable_data_ptr<acc_t>(),
                                      need_p ? aw_c.mutable_data_ptr<acc_t>() + i0 * P : nullptr,
                                      w_a.const_data_ptr<acc_t>() + r0, ex_a, r0, rows, P, drop);
          if (need_h) {  // dH = dS Kt, straight into d_h when no narrowing to the input dtype is needed
            Tensor dst = d_h.narrow(0, r0, rows);
            if (dst.scalar_type() == acc) at::mm_out(dst, sb, kt_a); else dst.copy_(at::mm(sb, kt_a));
          }
        }
      });
      if (need_kt) d_kt.addmm_(ds_c.narrow(0, 0, crows).t(), h.narrow(0, c0, crows).to(acc));
      if (need_p) d_p.addmm_(aw_c.narrow(0, 0, crows).t(), g.narrow(0, c0, crows).to(acc));
    }
  });
  return {d_h, d_y, d_p.to(prompts.scalar_type()), d_kt.to(kt.scalar_type()), d_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(ladder_kernels_C, CPU, m) {
  m.impl("apt_diffusion_fwd", &apt_diffusion_fwd_cpu);
  m.impl("apt_diffusion_bwd", &apt_diffusion_bwd_cpu);
}

}  // namespace ladder_kernels
