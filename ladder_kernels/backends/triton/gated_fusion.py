"""Triton kernels of the ladder gated fusion (docs/design.md, section 1).

Forward, one kernel: the GEMM Z = X W^T with the bias, gate and blend in its epilogue,

    out = mu * s + (1 - mu) * (X W^T + b),   and  diff = s - Z  when the gate is trainable,

so Z never reaches global memory. Backward, two kernels and no atomics:
  * grad_rows: one pass over G (and diff): ds = mu * G, and per-row-block column sums of G and G * diff
    written to a (row blocks, d) buffer that torch.sum folds in a fixed order;
  * grad_weight: G^T X with the float8 tap's row scales applied on the fly, split over rows into a
    (splits, d, D) buffer for occupancy and folded the same way. Same inputs, same bits.
All accumulation is fp32 (fp64 for fp64 inputs); fp32 dots use IEEE precision, not TF32, so fp32 results
match plain PyTorch's fp32 matmul.
"""

import torch
import triton
import triton.language as tl

from ..._common import acc_dtype
from ..torch import gated_fusion as torch_kernels
from ._launch import block, num_programs_target, tl_acc_dtype, upcast_bf16


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, s_ptr, mu_ptr, out_ptr, diff_ptr, M, N, K,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sn,
                HAS_BIAS: tl.constexpr, SAVE_DIFF: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = mu[n] s[m, n] + (1 - mu[n]) (sum_k x[m, k] w[n, k] + b[n]); diff = s - Z."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + rk)[:, None] * stride_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee", out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    mu = tl.load(mu_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    tile = m_ok[:, None] & n_ok[None, :]
    s = tl.load(s_ptr + rm[:, None] * stride_sm + rn[None, :] * stride_sn, mask=tile, other=0.0).to(ACC)
    offs = rm[:, None] * N + rn[None, :]  # outputs are fresh, contiguous (M, N)
    tl.store(out_ptr + offs, (mu * s + (1.0 - mu) * acc).to(out_ptr.dtype.element_ty), mask=tile)
    if SAVE_DIFF:
        tl.store(diff_ptr + offs, (s - acc).to(diff_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _grad_rows_kernel(g_ptr, diff_ptr, mu_ptr, ds_ptr, part_g_ptr, part_gd_ptr, M, N,
                      HAS_DIFF: tl.constexpr, NEED_SIDE: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """ds = mu G;  part_g[b, n] = sum_{m in block b} G[m, n];  part_gd[b, n] = sum G[m, n] diff[m, n]."""
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    tile = (rm < M)[:, None] & n_ok[None, :]
    offs = rm[:, None] * N + rn[None, :]
    g = tl.load(g_ptr + offs, mask=tile, other=0.0).to(ACC)
    if NEED_SIDE:
        mu = tl.load(mu_ptr + rn, mask=n_ok, other=0.0).to(ACC)
        tl.store(ds_ptr + offs, (mu[None, :] * g).to(ds_ptr.dtype.element_ty), mask=tile)
    tl.store(part_g_ptr + pid_m * N + rn, tl.sum(g, axis=0), mask=n_ok)
    if HAS_DIFF:
        df = tl.load(diff_ptr + offs, mask=tile, other=0.0).to(ACC)
        tl.store(part_gd_ptr + pid_m * N + rn, tl.sum(g * df, axis=0), mask=n_ok)


@triton.jit
def _grad_weight_kernel(g_ptr, x_ptr, scale_ptr, part_ptr, M, N, K, rows_per_split,
                        stride_xm, stride_xk, HAS_SCALE: tl.constexpr, ACC: tl.constexpr,
                        UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[split, n, k] = sum_{m in split} G[m, n] x[m, k] scale[m]   (scale = 1 without HAS_SCALE)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    n_ok = rn < N
    k_ok = rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    row_end = tl.minimum(M, (split + 1) * rows_per_split)
    for m0 in range(split * rows_per_split, row_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < row_end
        g = tl.load(g_ptr + rm[:, None] * N + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_SCALE:  # dequantise the float8 tap in registers: x * scale per row, in G's dtype
            sc = tl.load(scale_ptr + rm, mask=m_ok, other=0.0)
            x = (x.to(tl.float32) * sc[:, None]).to(g.dtype)
        if UPCAST:
            g, x = g.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee", out_dtype=ACC)
    tl.store(part_ptr + split * N * K + rn[:, None] * K + rk[None, :], acc,
             mask=n_ok[:, None] & k_ok[None, :])


def forward(side, tap, weight, bias, mu, save_diff):
    M, K = tap.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=side.dtype, device=side.device)
    diff = torch.empty((M, N) if save_diff else (0,), dtype=side.dtype, device=side.device)
    if M == 0:
        return out, diff
    BLOCK_M, BLOCK_N, BLOCK_K = 64, block(N), block(K, hi=64)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _fwd_kernel[grid](
        tap, weight, bias.contiguous() if bias is not None else mu, side, mu, out, diff, M, N, K,
        tap.stride(0), tap.stride(1), weight.stride(0), weight.stride(1), side.stride(0), side.stride(1),
        HAS_BIAS=bias is not None, SAVE_DIFF=save_diff, ACC=tl_acc_dtype(side.dtype),
        UPCAST=upcast_bf16(side.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3)
    return out, diff


def grad_rows(grad, diff, mu, need_side):
    M, N = grad.shape
    acc = acc_dtype(grad.dtype)
    BLOCK_M, BLOCK_N = 64, block(N)
    blocks = triton.cdiv(M, BLOCK_M)
    d_side = torch.empty((M, N) if need_side else (0,), dtype=grad.dtype, device=grad.device)
    part_g = torch.zeros((blocks, N), dtype=acc, device=grad.device)
    part_gd = torch.zeros((blocks if diff is not None else 0, N), dtype=acc, device=grad.device)
    if M > 0:
        _grad_rows_kernel[(blocks, triton.cdiv(N, BLOCK_N))](
            grad, diff.contiguous() if diff is not None else grad, mu, d_side, part_g, part_gd, M, N,
            HAS_DIFF=diff is not None, NEED_SIDE=need_side, ACC=tl_acc_dtype(grad.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)
    return d_side, part_g.sum(0), part_gd.sum(0) if diff is not None else part_gd.new_empty(0)


def grad_weight(grad, tap, tap_scale):
    M, N = grad.shape
    K = tap.shape[1]
    if M == 0:
        return torch.zeros((N, K), dtype=acc_dtype(grad.dtype), device=grad.device)
    if tap.dtype == torch.float8_e4m3fn and grad.is_cuda and torch.cuda.get_device_capability(grad.device) < (8, 9):
        # Triton has no e4m3 type before Ada/Hopper (sm_89): dequantise through the PyTorch path there.
        return torch_kernels.grad_weight(grad, tap, tap_scale)
    BLOCK_M, BLOCK_N, BLOCK_K = 64, block(N, hi=64), block(K, hi=64)
    tiles = triton.cdiv(N, BLOCK_N) * triton.cdiv(K, BLOCK_K)
    # Split the row reduction so the grid fills the GPU; partials are folded by torch.sum, in order.
    splits = max(1, min(triton.cdiv(M, BLOCK_M), num_programs_target(grad.device) // tiles))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BLOCK_M) * BLOCK_M
    splits = max(1, triton.cdiv(M, rows_per_split))
    part = torch.empty((splits, N, K), dtype=acc_dtype(grad.dtype), device=grad.device)
    _grad_weight_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K), splits)](
        grad, tap, tap_scale if tap_scale is not None else grad, part, M, N, K, rows_per_split,
        tap.stride(0), tap.stride(1), HAS_SCALE=tap_scale is not None, ACC=tl_acc_dtype(grad.dtype),
        UPCAST=upcast_bf16(grad.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3)
    return part.sum(0)
