// APT approximated prompt attention on the CPU (docs/design.md, section 3):
//
//   S = H Kt^T,  A = dropout(relu(S)),  w = max_j A[:, j] (after dropout, as APT's code; no gradient)
//   out = exp(s) (Y + w (A P))
//
// The forward runs over fixed blocks of kRowBlock rows: a block's S (held as S^T, p x rows) lives in
// cache, relu, dropout and the row max run on it in place, and its A P GEMM feeds the epilogue directly,
// so no (M, p) tensor is ever allocated. The backward makes one pass over blocks of kBwdBlock rows,
// recomputing S from H and Kt; row gradients (dH, dY) are written per block, and the reductions over rows (dKt = dS^T H,
// dP = (exp(s) w A)^T G, ds = sum G out) are per-block partials added in block order, so two runs give
// the same bits. Its scratch is a few blocks of (p, D) partials whatever M is.
//
// Dropout: keep(m, j) = (h >> 8) >= threshold, the row-col stream of csrc/hash.h (ladder_kernels/_dropout.py),
// so the backward and every backend regenerate the forward's mask from the seed.

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
#include "../hash.h"
#include "../common.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace ladder_kernels {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kRowBlock = 128;  // rows per block: S^T (p x 128) and E (128 x D) stay in L2
// The backward runs five GEMMs per block, not two; 256 rows gave its partial GEMMs (K = rows) a longer
// K and were a little faster at p = 200 than 128 (58-60 vs 62 ms fwd+bwd, ViT-B/16 shapes), same at p = 10.
constexpr int64_t kBwdBlock = 256;

struct Dropout {
  uint32_t seed = 0;
  uint32_t threshold = 0;  // 0: no dropout
  double scale = 1.0;

  Dropout(const Tensor& seed_t, double p) {
    if (p > 0) {
      seed = static_cast<uint32_t>(seed_value(seed_t, "apt_diffusion (CPU)") & 0xFFFFFFFF);
      threshold = dropout_threshold(p);
      scale = 1.0 / (1.0 - p);
    }
  }
  uint32_t row_hash(int64_t row) const { return ladder_kernels::row_hash(row, seed); }
  bool keep(uint32_t row_h, int64_t col) const { return row_col_keep(row_h, col, threshold); }
};

// A block's scores live transposed, S^T (p, rows): MKL forms Kt H_b^T up to 2x faster than H_b Kt^T at
// small p (33 vs 65 us per 128 rows at p = 10, D = 768; 15% at p = 50), and every other GEMM of the
// kernel runs as fast on S^T as on S. The elementwise loops then run along rows, which vectorises
// whatever p is.

// Per-row dropout hashes of a block (the mask's row half, computed once per block, not once per score).
void row_hashes(const Dropout& drop, int64_t r0, int64_t rows, uint32_t* rh) {
  for (int64_t i = 0; i < rows; ++i) rh[i] = drop.row_hash(r0 + i);
}

// In place on a block's S^T: A^T = dropout(relu(S^T)); w = max_j A[:, j], after dropout as in APT's code.
// NaN stays NaN (as in torch): relu and max are written so that a NaN score is neither dropped by a
// comparison nor skipped by the max, unless the mask drops it.
template <typename acc_t>
void activate_block(acc_t* st, acc_t* w, const uint32_t* rh, int64_t rows, int64_t p, const Dropout& drop) {
  const acc_t scale = static_cast<acc_t>(drop.scale);
  std::fill(w, w + rows, acc_t(0));
  for (int64_t j = 0; j < p; ++j) {
    acc_t* sj = st + j * rows;
    if (drop.threshold) {
      for (int64_t i = 0; i < rows; ++i) {
        const acc_t x = sj[i];
        sj[i] = drop.keep(rh[i], j) ? (x < 0 ? acc_t(0) : x * scale) : acc_t(0);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < rows; ++i) sj[i] = sj[i] < 0 ? acc_t(0) : sj[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < rows; ++i) w[i] = (sj[i] != sj[i] || sj[i] > w[i]) ? sj[i] : w[i];
  }
}

// A (p, rows) contiguous view of the front of a scratch buffer: the leading dimension is the block's rows.
// Scratch is sized for min(block, M) rows, so with a single block (small M, where the host path is the
// cost) it is the buffer itself, and these helpers make no view at all.
inline Tensor transposed_block(const Tensor& scratch, int64_t p, int64_t rows) {
  if (scratch.size(0) == p && scratch.size(1) == rows) return scratch;
  return scratch.view(-1).narrow(0, 0, p * rows).view({p, rows});
}

// Rows [r0, r0 + rows) of t: t itself when that is all of it.
inline Tensor row_range(const Tensor& t, int64_t r0, int64_t rows) {
  return r0 == 0 && rows == t.size(0) ? t : t.narrow(0, r0, rows);
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

}  // namespace

std::tuple<Tensor, Tensor> apt_diffusion_fwd(const Tensor& hidden, const Tensor& attn_out,
                                                 const Tensor& prompts, const Tensor& kt,
                                                 const Tensor& log_scale, const Tensor& seed, double dropout) {
  const KernelGuard guard;  // no autograd, no autocast inside (common.h)
  TORCH_CHECK(hidden.dim() == 2 && attn_out.dim() == 2 && prompts.dim() == 2 && kt.dim() == 2,
              "apt_diffusion_fwd: expected 2-D hidden, attn_out, prompts, kt");
  const Tensor h = hidden.contiguous(), y = attn_out.contiguous();
  const int64_t M = h.size(0), D = h.size(1), P = prompts.size(0);
  const auto acc = acc_type(h.scalar_type());
  Tensor out = at::empty({M, D}, h.options());
  Tensor w = at::empty({M}, h.options().dtype(acc));
  const Tensor kt_a = widened(kt, acc).contiguous();  // (p, D), widened once
  const Tensor p_a = widened(prompts, acc).contiguous();  // (p, D)
  const double ex = std::exp(log_scale.item<double>());
  const Dropout drop(seed, dropout);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "apt_diffusion_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, num_blocks(M, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_worker;  // grad mode is thread-local
      const int64_t cap = std::min(kRowBlock, M);
      Tensor s = at::empty({P, cap}, h.options().dtype(acc));
      Tensor e = at::empty({cap, D}, h.options().dtype(acc));
      std::vector<uint32_t> rh(drop.threshold ? cap : 0);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, M - r0);
        Tensor st = transposed_block(s, P, rows), eb = row_range(e, 0, rows);
        at::mm_out(st, kt_a, widened(row_range(h, r0, rows), acc).t());
        if (drop.threshold) row_hashes(drop, r0, rows, rh.data());
        activate_block<acc_t>(st.mutable_data_ptr<acc_t>(), w.mutable_data_ptr<acc_t>() + r0, rh.data(), rows, P,
                              drop);
        at::mm_out(eb, st.t(), p_a);
        epilogue_rows<scalar_t, acc_t>(eb.const_data_ptr<acc_t>(), y.const_data_ptr<scalar_t>() + r0 * D,
                                       w.const_data_ptr<acc_t>() + r0, static_cast<acc_t>(ex),
                                       out.mutable_data_ptr<scalar_t>() + r0 * D, rows, D);
      }
    });
  });
  return {out, w};
}

namespace {

// On a block, transposed: dA^T (= P G_b^T on entry) becomes dS^T = exp(s) w dA [S > 0] keep / (1 - p),
// and A_w^T = (exp(s) w A)^T (for dP = A_w^T G). Scaling by exp(s) w here, after the GEMM, spares a
// (rows, D) pass that would form exp(s) w G first.
template <typename acc_t>
void grad_activation_block(const acc_t* st, acc_t* dat, acc_t* awt, const acc_t* w, const uint32_t* rh, acc_t ex,
                           int64_t rows, int64_t p, const Dropout& drop, acc_t* ewf) {
  const acc_t f = drop.threshold ? static_cast<acc_t>(drop.scale) : acc_t(1);
  for (int64_t i = 0; i < rows; ++i) ewf[i] = ex * w[i] * f;
  for (int64_t j = 0; j < p; ++j) {
    const acc_t* sj = st + j * rows;
    acc_t* dj = dat + j * rows;
    acc_t* aj = awt ? awt + j * rows : nullptr;
    if (drop.threshold) {
      for (int64_t i = 0; i < rows; ++i) {
        const bool on = sj[i] > 0 && drop.keep(rh[i], j);
        if (aj) aj[i] = on ? ewf[i] * sj[i] : acc_t(0);
        dj[i] = on ? ewf[i] * dj[i] : acc_t(0);
      }
    } else {
      if (aj) {
#pragma omp simd
        for (int64_t i = 0; i < rows; ++i) aj[i] = sj[i] > 0 ? ewf[i] * sj[i] : acc_t(0);
      }
#pragma omp simd
      for (int64_t i = 0; i < rows; ++i) dj[i] = sj[i] > 0 ? ewf[i] * dj[i] : acc_t(0);
    }
  }
}

// dY = exp(s) G on a block's rows and its partial of sum(G out). Two branch-free loops, not one with
// both: the sum's reduction clause lets it vectorise (a plain sum may not be reordered), and the block
// is in cache for the second read.
template <typename scalar_t, typename acc_t>
double rows_dy_ds(const scalar_t* g, const scalar_t* out, scalar_t* d_y, acc_t ex, int64_t n) {
  if (d_y) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) d_y[k] = static_cast<scalar_t>(ex * static_cast<acc_t>(g[k]));
  }
  double sum = 0;  // in fp64: a block holds 200K terms, too many for an fp32 running sum to match torch's
  if (out) {
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < n; ++k) sum += static_cast<double>(static_cast<acc_t>(g[k]) * static_cast<acc_t>(out[k]));
  }
  return sum;
}

// Blocks whose (p, D) partials of dKt and dP are held at once, within kPartialBytes: up to 16 (or one
// per thread) when that many fit. When fewer than the threads fit (wide p and D), one block at a time:
// at::parallel_for then runs it inline, and its GEMMs, large at such p and D, are threaded by BLAS.
int64_t blocks_per_step(int64_t p, int64_t d, int64_t elem) {
  constexpr int64_t kPartialBytes = 8 << 20;
  const int64_t fit = kPartialBytes / std::max<int64_t>(1, 2 * p * d * elem);
  const int64_t threads = at::get_num_threads();
  return fit >= threads ? std::min<int64_t>(fit, std::max<int64_t>(16, threads)) : 1;
}

// One pass over the rows, block by block: G, out and H are each read once from memory (a block of them
// is re-read from cache by its GEMMs), dY and dH written once. The CPU is memory-bound at small p, so
// this pass count is the time. Reductions over rows (dKt, dP, ds) are per-block partials added in
// block order: the same bits whatever the thread count or the step size.
}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> apt_diffusion_bwd(
    const Tensor& grad, const std::optional<Tensor>& hidden, const std::optional<Tensor>& out,
    const Tensor& prompts, const Tensor& kt, const Tensor& log_scale, const std::optional<Tensor>& w,
    const Tensor& seed, double dropout, bool need_h, bool need_y, bool need_p, bool need_kt, bool need_s) {
  const KernelGuard guard;  // no autograd, no autocast inside (common.h)
  const Tensor g = grad.contiguous();
  const int64_t M = g.size(0), D = g.size(1), P = prompts.size(0);
  const auto acc = acc_type(g.scalar_type());
  const auto acc_opts = g.options().dtype(acc);
  const double ex = std::exp(log_scale.item<double>());
  const Dropout drop(seed, dropout);
  TORCH_CHECK(!need_s || out.has_value(), "apt_diffusion_bwd: need_s requires out");
  const bool recompute = need_h || need_p || need_kt;
  TORCH_CHECK(!recompute || (hidden.has_value() && w.has_value()), "apt_diffusion_bwd: dH/dP/dKt need hidden and w");

  Tensor d_h = at::empty({need_h ? M : 0, D}, g.options());
  Tensor d_y = at::empty({need_y ? M : 0, D}, g.options());
  const int64_t nb = num_blocks(M, kBwdBlock);
  // One block (small M, where the host path is the cost): its GEMMs write dKt and dP themselves, with no
  // partials to allocate and add. Otherwise partials, added in block order.
  const bool one_block = nb == 1;
  Tensor d_p = one_block ? at::empty({need_p ? P : 0, D}, acc_opts) : at::zeros({need_p ? P : 0, D}, acc_opts);
  Tensor d_kt = one_block ? at::empty({need_kt ? P : 0, D}, acc_opts) : at::zeros({need_kt ? P : 0, D}, acc_opts);
  Tensor d_s = at::empty({need_s ? 1 : 0}, log_scale.options());
  const Tensor o = need_s ? out->contiguous() : Tensor();
  const Tensor h = recompute ? hidden->contiguous() : Tensor();
  const Tensor w_a = recompute ? widened(*w, acc).contiguous() : Tensor();
  const Tensor kt_a = widened(kt, acc).contiguous();      // (p, D); used transposed as a view (see the forward)
  const Tensor p_a = widened(prompts, acc).contiguous();  // (p, D); likewise
  const bool widen = g.scalar_type() != acc;              // reduced precision: a block of G and H widened to fp32
  const int64_t step = one_block ? 1 : blocks_per_step(P, D, at::elementSize(acc));
  const Tensor part_kt = need_kt && !one_block ? at::empty({step, P, D}, acc_opts) : Tensor();
  const Tensor part_p = need_p && !one_block ? at::empty({step, P, D}, acc_opts) : Tensor();
  std::vector<double> part_s(nb, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "apt_diffusion_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t ex_a = static_cast<acc_t>(ex);
    for (int64_t s0 = 0; s0 < nb; s0 += step) {
      const int64_t s1 = std::min(nb, s0 + step);
      at::parallel_for(s0, s1, 1, [&](int64_t b0, int64_t b1) {
        at::NoGradGuard no_grad_worker;  // grad mode is thread-local
        const int64_t cap = std::min(kBwdBlock, M);
        Tensor s, da, a_w;  // only what this call's gradients need: each costs an allocation
        if (recompute) s = at::empty({P, cap}, acc_opts), da = at::empty({P, cap}, acc_opts);
        if (recompute && need_p) a_w = at::empty({P, cap}, acc_opts);
        std::vector<uint32_t> rh(drop.threshold ? cap : 0);
        std::vector<acc_t> ewf(cap);
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * kBwdBlock, rows = std::min(kBwdBlock, M - r0);
          if (need_y || need_s)
            part_s[blk] = rows_dy_ds<scalar_t, acc_t>(
                g.const_data_ptr<scalar_t>() + r0 * D, need_s ? o.const_data_ptr<scalar_t>() + r0 * D : nullptr,
                need_y ? d_y.mutable_data_ptr<scalar_t>() + r0 * D : nullptr, ex_a, rows * D);
          if (!recompute) continue;
          const Tensor hb = widened(row_range(h, r0, rows), acc), gb = widened(row_range(g, r0, rows), acc);
          Tensor st = transposed_block(s, P, rows), dat = transposed_block(da, P, rows);
          Tensor awt = need_p ? transposed_block(a_w, P, rows) : Tensor();
          at::mm_out(st, kt_a, hb.t());
          if (need_h || need_kt) at::mm_out(dat, p_a, gb.t()); else dat.zero_();  // dP alone needs no dA
          if (drop.threshold) row_hashes(drop, r0, rows, rh.data());
          grad_activation_block<acc_t>(st.const_data_ptr<acc_t>(), dat.mutable_data_ptr<acc_t>(),
                                       need_p ? awt.mutable_data_ptr<acc_t>() : nullptr,
                                       w_a.const_data_ptr<acc_t>() + r0, rh.data(), ex_a, rows, P, drop, ewf.data());
          if (need_h) {  // dH = dS Kt, straight into d_h when no narrowing to the input dtype is needed
            Tensor dst = row_range(d_h, r0, rows);
            if (widen) dst.copy_(at::mm(dat.t(), kt_a)); else at::mm_out(dst, dat.t(), kt_a);
          }
          if (need_kt) { Tensor dst = one_block ? d_kt : part_kt[blk - s0]; at::mm_out(dst, dat, hb); }
          if (need_p) { Tensor dst = one_block ? d_p : part_p[blk - s0]; at::mm_out(dst, awt, gb); }
        }
      });
      for (int64_t blk = s0; blk < s1 && !one_block; ++blk) {  // in block order
        if (need_kt) d_kt.add_(part_kt[blk - s0]);
        if (need_p) d_p.add_(part_p[blk - s0]);
      }
    }
    if (need_s) {
      double sum = 0;  // block partials in block order
      for (int64_t blk = 0; blk < nb; ++blk) sum += part_s[blk];
      d_s.fill_(sum);
    }
  });
  if (prompts.scalar_type() != acc) d_p = d_p.to(prompts.scalar_type());
  if (kt.scalar_type() != acc) d_kt = d_kt.to(kt.scalar_type());
  return {d_h, d_y, d_p, d_kt, d_s};
}

}  // namespace cpu
}  // namespace ladder_kernels
