"""Triton kernels of the ladder gated fusion (docs/design.md, section 1).

Forward, one kernel: the GEMM Z = X W^T with the bias, gate and blend in its epilogue,

    out = mu * s + (1 - mu) * (X W^T + b),   and  diff = s - Z  when the gate is trainable,

so Z never reaches global memory. Backward, two kernels and no atomics:
  * grad_rows: one pass over G (and diff): ds = mu * G, and per-row-block column sums of G and G * diff
    written to a (row blocks, d) buffer that torch.sum folds in a fixed order;
  * grad_weight: G^T X with the float8 tap's row scales applied on the fly, split over rows into a
    (splits, d, D) buffer for occupancy, then one small kernel folds the splits in order (and, when the
    caller passes them, applies the (1 - mu) row scale and casts to the gradient's dtype). Same inputs,
    same bits.
All accumulation is fp32 (fp64 for fp64 inputs); fp32 dots use IEEE precision, not TF32, so fp32 results
match plain PyTorch's fp32 matmul. Row offsets are int64 (`_rows64`): M x D past 2^31 elements is fine.

Launch shapes (checked by the static gate, tests/test_triton_static.py): d <= 128 is one N block, so the
forward and dW read X once; a program owns ROWS <= BLOCK_M rows so that the ladder's vision tap
(M = 32 x 197 = 6304, d = 96) makes 132 programs, one full wave of an H100 / H200, with 64-row wgmma
tiles (99 tiles of 64 rows would leave a quarter of the SMs idle); bf16/fp16 and fp32 have their own
tiles (fp32 dots are FMA loops that hold their operands in registers).
"""

import torch
import triton
import triton.language as tl

from ..._common import acc_dtype
from ..torch import gated_fusion as torch_kernels
from ._jit import rows64
from ._launch import block, device_arch, num_programs_target, rows_per_program, tl_acc_dtype, upcast_bf16


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, s_ptr, mu_ptr, out_ptr, diff_ptr, M, N, K,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sn,
                HAS_BIAS: tl.constexpr, SAVE_DIFF: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = mu[n] s[m, n] + (1 - mu[n]) (sum_k x[m, k] w[n, k] + b[n]); diff = s - Z.
    A program owns ROWS rows (of a BLOCK_M tile) and BLOCK_N columns."""
    local = tl.arange(0, BLOCK_M)
    rm = tl.program_id(0) * ROWS + local
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = (local < ROWS) & (rm < M)
    n_ok = rn < N
    x_rows = rows64(rm, stride_xm)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr + x_rows[:, None] + (k0 + rk)[None, :] * stride_xk,
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
    s = tl.load(s_ptr + rows64(rm, stride_sm)[:, None] + rn[None, :] * stride_sn, mask=tile, other=0.0).to(ACC)
    offs = rows64(rm, N)[:, None] + rn[None, :]  # outputs are fresh, contiguous (M, N)
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
    offs = rows64(rm, N)[:, None] + rn[None, :]
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
        g = tl.load(g_ptr + rows64(rm, N)[:, None] + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows64(rm, stride_xm)[:, None] + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_SCALE:  # dequantise the float8 tap in registers: x * scale per row, in G's dtype
            sc = tl.load(scale_ptr + rm, mask=m_ok, other=0.0)
            x = (x.to(tl.float32) * sc[:, None]).to(g.dtype)
        if UPCAST:
            g, x = g.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee", out_dtype=ACC)
    tl.store(part_ptr + split.to(tl.int64) * N * K + rn[:, None] * K + rk[None, :], acc,
             mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _fold_kernel(part_ptr, row_scale_ptr, out_ptr, splits, N, K, HAS_ROW_SCALE: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr):
    """out[n, k] = (sum over split = 0, 1, .. of part[split, n, k]) * row_scale[n], in out's dtype
    (row_scale = 1 without HAS_ROW_SCALE). The splits are added in order: the same bits on every run."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N * K
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for split in range(0, splits):
        # tl.cast, not .to: a size equal to 1 arrives as a Python int on a GPU (the JIT's constexpr-1
        # specialisation), which has no .to; the interpreter passes a tensor and hid it.
        acc += tl.load(part_ptr + split * tl.cast(N, tl.int64) * K + offs, mask=ok, other=0.0)
    if HAS_ROW_SCALE:
        acc *= tl.load(row_scale_ptr + offs // K, mask=ok, other=0.0).to(ACC)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _half(dtype):
    return dtype in (torch.bfloat16, torch.float16)


def forward_config(M, N, K, dtype, programs=None):
    """(constexprs, num_warps, num_stages) of the forward. d <= 128 in one N block (X read once); fp32's
    FMA dots get 32-row tiles and 16-wide K steps (no spills on sm_80 / sm_90 at the benchmark shapes)."""
    if _half(dtype):
        tiles, warps, stages = dict(BLOCK_M=64, BLOCK_N=block(N, hi=128), BLOCK_K=block(K, hi=64)), 4, 3
    else:
        tiles, warps, stages = dict(BLOCK_M=32, BLOCK_N=block(N, hi=128), BLOCK_K=block(K, hi=16)), 4, 3
    tiles["ROWS"] = rows_per_program(M, tiles["BLOCK_M"], programs or 4)
    return tiles, warps, stages


def grad_weight_config(M, N, K, dtype, programs=None):
    """(constexprs, num_warps, num_stages, splits, rows_per_split) of dW = G^T X: one N block for d <= 128
    (X read once), splits over rows so that the grid makes one wave of `programs`."""
    if _half(dtype):
        tiles, warps, stages = dict(BLOCK_M=64, BLOCK_N=block(N, hi=128), BLOCK_K=block(K, hi=64)), 4, 3
    else:
        tiles, warps, stages = dict(BLOCK_M=16, BLOCK_N=block(N, hi=128), BLOCK_K=block(K, hi=32)), 4, 3
    n_tiles = triton.cdiv(N, tiles["BLOCK_N"]) * triton.cdiv(K, tiles["BLOCK_K"])
    # Split the row reduction so the grid fills the GPU; the fold kernel adds the partials in order.
    splits = max(1, min(triton.cdiv(M, tiles["BLOCK_M"]), (programs or 4) // n_tiles))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), tiles["BLOCK_M"]) * tiles["BLOCK_M"]
    return tiles, warps, stages, max(1, triton.cdiv(M, rows_per_split)), rows_per_split


def _programs(device):
    return num_programs_target(device, waves=1)


def forward(side, tap, weight, bias, mu, save_diff):
    M, K = tap.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=side.dtype, device=side.device)
    diff = torch.empty((M, N) if save_diff else (0,), dtype=side.dtype, device=side.device)
    if M == 0:
        return out, diff
    tiles, warps, stages = forward_config(M, N, K, side.dtype, _programs(side.device))
    grid = (triton.cdiv(M, tiles["ROWS"]), triton.cdiv(N, tiles["BLOCK_N"]))
    _fwd_kernel[grid](
        tap, weight, bias.contiguous() if bias is not None else mu, side, mu, out, diff, M, N, K,
        tap.stride(0), tap.stride(1), weight.stride(0), weight.stride(1), side.stride(0), side.stride(1),
        HAS_BIAS=bias is not None, SAVE_DIFF=save_diff, ACC=tl_acc_dtype(side.dtype),
        UPCAST=upcast_bf16(side.dtype), **tiles, num_warps=warps, num_stages=stages)
    return out, diff


def grad_rows(grad, diff, mu, need_side):
    M, N = grad.shape
    acc = acc_dtype(grad.dtype)
    # A streaming pass: 32-row blocks when 64-row ones would not make one wave (the vision tap: 197 vs 99).
    BLOCK_M = 32 if triton.cdiv(M, 64) < _programs(grad.device) else 64
    BLOCK_N = block(N, hi=128)
    blocks = triton.cdiv(M, BLOCK_M)
    d_side = torch.empty((M, N) if need_side else (0,), dtype=grad.dtype, device=grad.device)
    # Every element of the partials is written by its program (all n < N of every row block): empty.
    part_g = torch.empty((blocks, N), dtype=acc, device=grad.device)
    part_gd = torch.empty((blocks if diff is not None else 0, N), dtype=acc, device=grad.device)
    if M > 0:
        _grad_rows_kernel[(blocks, triton.cdiv(N, BLOCK_N))](
            grad, diff.contiguous() if diff is not None else grad, mu, d_side, part_g, part_gd, M, N,
            HAS_DIFF=diff is not None, NEED_SIDE=need_side, ACC=tl_acc_dtype(grad.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)
    return d_side, part_g.sum(0), part_gd.sum(0) if diff is not None else part_gd.new_empty(0)


def grad_weight(grad, tap, tap_scale, row_scale=None, out_dtype=None):
    """G^T X (d, D) in the accumulation dtype, as the interface asks. Beyond it: `row_scale` (d,) multiplies
    row n (the op's (1 - mu)) and `out_dtype` casts, both inside the fold kernel, so that a caller that
    passes them needs no torch pass of its own over dW."""
    M, N = grad.shape
    K = tap.shape[1]
    acc = acc_dtype(grad.dtype)
    out_dtype = out_dtype or acc
    if M == 0:
        return torch.zeros((N, K), dtype=out_dtype, device=grad.device)
    if tap.dtype == torch.float8_e4m3fn and grad.is_cuda and device_arch(grad.device) < 89:
        # Triton has no e4m3 type before Ada/Hopper (sm_89): dequantise through the PyTorch path there.
        return torch_kernels.grad_weight(grad, tap, tap_scale, row_scale, out_dtype)
    tiles, warps, stages, splits, rows_per_split = grad_weight_config(M, N, K, grad.dtype, _programs(grad.device))
    part = torch.empty((splits, N, K), dtype=acc, device=grad.device)  # every element written
    _grad_weight_kernel[(triton.cdiv(N, tiles["BLOCK_N"]), triton.cdiv(K, tiles["BLOCK_K"]), splits)](
        grad, tap, tap_scale if tap_scale is not None else grad, part, M, N, K, rows_per_split,
        tap.stride(0), tap.stride(1), HAS_SCALE=tap_scale is not None, ACC=tl_acc_dtype(grad.dtype),
        UPCAST=upcast_bf16(grad.dtype), **tiles, num_warps=warps, num_stages=stages)
    if splits == 1 and row_scale is None and out_dtype == acc:
        return part[0]
    out = torch.empty((N, K), dtype=out_dtype, device=grad.device)
    BLOCK = 1024
    _fold_kernel[(triton.cdiv(N * K, BLOCK),)](
        part, row_scale if row_scale is not None else part, out, splits, N, K, HAS_ROW_SCALE=row_scale is not None,
        ACC=tl_acc_dtype(grad.dtype), BLOCK=BLOCK, num_warps=4)
    return out


backward = torch_kernels.compose_backward(grad_rows, grad_weight)
