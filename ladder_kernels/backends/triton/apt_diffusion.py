"""Triton kernels of APT's approximated prompt attention (docs/design.md, section 3), flash-style.

    S = H Kt^T,  A = dropout(relu(S)),  w = row max of A (after dropout),  out = exp(s) (Y + w (A P))

Forward, one kernel over (row block, D tile): for each block of prompts it computes S block by block in
registers (looping over D), applies relu, dropout and the running row max, and accumulates E = A P for
its D tile, then writes out = exp(s) (Y + w E). A never reaches global memory.

Backward, with G = dL/dout, dS = exp(s) w (G P^T) [S > 0] keep / (1 - dropout), two kernels that
recompute S (and G P^T) tile by tile from H, Kt, G and P:
  * rows: over (row block, D tile): dH = dS Kt, dY = exp(s) G, and per-tile partials of ds = sum G out;
  * prompts: over (prompt block, D tile, row split): dKt = dS^T H and dP = (exp(s) w A)^T G, one
    partial per row split in a (splits, p, D) buffer.
Partials are folded by torch.sum in a fixed order: no atomics, the same bits on every run. Accumulation
is fp32 (fp64 for fp64); fp32 dots use IEEE precision, not TF32. Dropout regenerates the forward's mask
from the seed with the row-col stream of ladder_kernels/_dropout.py.
"""

import torch
import triton
import triton.language as tl

from ..._common import acc_dtype
from ._launch import block, dropout_args, num_programs_target, tl_acc_dtype, upcast_bf16


@triton.jit
def _fmix32(x):
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _keep(seed, rm, rp, thresh):
    """keep[m, j] = (fmix32(fmix32(m * 0x9E3779B1 ^ seed) ^ j * 0x85EBCA77) >> 8) >= thresh."""
    row = _fmix32((rm.to(tl.uint32) * 0x9E3779B1) ^ seed)
    h = _fmix32(row[:, None] ^ (rp.to(tl.uint32) * 0x85EBCA77)[None, :])
    return (h >> 8).to(tl.int32) >= thresh


@triton.jit
def _mma(a, b, acc, ACC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)


@triton.jit
def _scores(x_ptr, y_ptr, rm, rp, m_ok, p_ok, D, stride_xm, stride_xk, stride_yp, stride_yk,
            ACC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """sum_k x[m, k] y[j, k] over all of D: S = H Kt^T, or G P^T in the backward."""
    rk = tl.arange(0, BLOCK_K)
    s = tl.zeros((BLOCK_M, BLOCK_P), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + rk) < D
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(y_ptr + rp[None, :] * stride_yp + (k0 + rk)[:, None] * stride_yk,
                    mask=k_ok[:, None] & p_ok[None, :], other=0.0)
        s = _mma(x, y, s, ACC, UPCAST)
    return s


@triton.jit
def _fwd_kernel(h_ptr, y_ptr, kt_ptr, p_ptr, logs_ptr, seed_ptr, out_ptr, w_ptr, M, D, NP, thresh, keep_scale,
                stride_hm, stride_hk, stride_ym, stride_yk,
                DROPOUT: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[m, d] = exp(s) (Y[m, d] + w[m] sum_j A[m, j] P[j, d]),  w[m] = max_j A[m, j]."""
    pid_m, pid_d = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok, d_ok = rm < M, rd < D
    seed = tl.load(seed_ptr).to(tl.uint32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    w = tl.zeros((BLOCK_M,), dtype=ACC)
    for p0 in range(0, NP, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)
        p_ok = rp < NP
        a = tl.maximum(_scores(h_ptr, kt_ptr, rm, rp, m_ok, p_ok, D, stride_hm, stride_hk, D, 1,
                               ACC, UPCAST, BLOCK_M, BLOCK_P, BLOCK_K), 0.0)
        if DROPOUT:
            a = tl.where(_keep(seed, rm, rp, thresh), a * keep_scale, 0.0)
        w = tl.maximum(w, tl.max(a, axis=1))  # of A after dropout; padded prompts give 0 and cannot raise it
        pv = tl.load(p_ptr + rp[:, None] * D + rd[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _mma(a.to(pv.dtype), pv, acc, ACC, UPCAST)
    ex = tl.exp(tl.load(logs_ptr).to(ACC))
    tile = m_ok[:, None] & d_ok[None, :]
    y = tl.load(y_ptr + rm[:, None] * stride_ym + rd[None, :] * stride_yk, mask=tile, other=0.0).to(ACC)
    out = ex * (y + w[:, None] * acc)
    tl.store(out_ptr + rm[:, None] * D + rd[None, :], out.to(out_ptr.dtype.element_ty), mask=tile)
    tl.store(w_ptr + rm, w, mask=m_ok & (pid_d == 0))


@triton.jit
def _bwd_rows_kernel(h_ptr, g_ptr, out_ptr, kt_ptr, p_ptr, logs_ptr, w_ptr, seed_ptr, dh_ptr, dy_ptr, part_s_ptr,
                     M, D, NP, thresh, keep_scale, stride_hm, stride_hk,
                     NEED_H: tl.constexpr, NEED_Y: tl.constexpr, NEED_S: tl.constexpr, DROPOUT: tl.constexpr,
                     ACC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dH = dS Kt;  dY = exp(s) G;  part_s[tile] = sum over the tile of G out."""
    pid_m, pid_d = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok, d_ok = rm < M, rd < D
    tile = m_ok[:, None] & d_ok[None, :]
    offs = rm[:, None] * D + rd[None, :]  # G, out, dH and dY are contiguous (M, D)
    ex = tl.exp(tl.load(logs_ptr).to(ACC))
    if NEED_Y or NEED_S:
        g = tl.load(g_ptr + offs, mask=tile, other=0.0).to(ACC)
        if NEED_Y:
            tl.store(dy_ptr + offs, (ex * g).to(dy_ptr.dtype.element_ty), mask=tile)
        if NEED_S:
            o = tl.load(out_ptr + offs, mask=tile, other=0.0).to(ACC)
            tl.store(part_s_ptr + pid_m * tl.num_programs(1) + pid_d, tl.sum(tl.sum(g * o, axis=1), axis=0))
    if NEED_H:
        seed = tl.load(seed_ptr).to(tl.uint32)
        ew = ex * tl.load(w_ptr + rm, mask=m_ok, other=0.0).to(ACC)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
        for p0 in range(0, NP, BLOCK_P):
            rp = p0 + tl.arange(0, BLOCK_P)
            p_ok = rp < NP
            s = _scores(h_ptr, kt_ptr, rm, rp, m_ok, p_ok, D, stride_hm, stride_hk, D, 1,
                        ACC, UPCAST, BLOCK_M, BLOCK_P, BLOCK_K)
            gp = _scores(g_ptr, p_ptr, rm, rp, m_ok, p_ok, D, D, 1, D, 1, ACC, UPCAST, BLOCK_M, BLOCK_P, BLOCK_K)
            ds = tl.where(s > 0, ew[:, None] * gp, 0.0)
            if DROPOUT:
                ds = tl.where(_keep(seed, rm, rp, thresh), ds * keep_scale, 0.0)
            ktv = tl.load(kt_ptr + rp[:, None] * D + rd[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
            acc = _mma(ds.to(ktv.dtype), ktv, acc, ACC, UPCAST)
        tl.store(dh_ptr + offs, acc.to(dh_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _bwd_prompts_kernel(h_ptr, g_ptr, kt_ptr, p_ptr, logs_ptr, w_ptr, seed_ptr, part_kt_ptr, part_p_ptr,
                        M, D, NP, rows_per_split, thresh, keep_scale, stride_hm, stride_hk,
                        NEED_KT: tl.constexpr, NEED_P: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """part_kt[split, j, d] = sum_{m in split} dS[m, j] H[m, d];  part_p = sum exp(s) w[m] A[m, j] G[m, d]."""
    pid_p, pid_d, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    p_ok, d_ok = rp < NP, rd < D
    seed = tl.load(seed_ptr).to(tl.uint32)
    ex = tl.exp(tl.load(logs_ptr).to(ACC))
    acc_kt = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    acc_p = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    row_end = tl.minimum(M, (split + 1) * rows_per_split)
    for m0 in range(split * rows_per_split, row_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < row_end
        s = _scores(h_ptr, kt_ptr, rm, rp, m_ok, p_ok, D, stride_hm, stride_hk, D, 1,
                    ACC, UPCAST, BLOCK_M, BLOCK_P, BLOCK_K)
        ew = ex * tl.load(w_ptr + rm, mask=m_ok, other=0.0).to(ACC)
        on = s > 0
        if DROPOUT:
            on = on & _keep(seed, rm, rp, thresh)
            ew = ew * keep_scale
        tile = m_ok[:, None] & d_ok[None, :]
        if NEED_KT:
            gp = _scores(g_ptr, p_ptr, rm, rp, m_ok, p_ok, D, D, 1, D, 1, ACC, UPCAST, BLOCK_M, BLOCK_P, BLOCK_K)
            ds = tl.where(on, ew[:, None] * gp, 0.0)
            hv = tl.load(h_ptr + rm[:, None] * stride_hm + rd[None, :] * stride_hk, mask=tile, other=0.0)
            acc_kt = _mma(tl.trans(ds.to(hv.dtype)), hv, acc_kt, ACC, UPCAST)
        if NEED_P:
            aw = tl.where(on, ew[:, None] * s, 0.0)
            gv = tl.load(g_ptr + rm[:, None] * D + rd[None, :], mask=tile, other=0.0)
            acc_p = _mma(tl.trans(aw.to(gv.dtype)), gv, acc_p, ACC, UPCAST)
    offs = split * NP * D + rp[:, None] * D + rd[None, :]
    out_tile = p_ok[:, None] & d_ok[None, :]
    if NEED_KT:
        tl.store(part_kt_ptr + offs, acc_kt, mask=out_tile)
    if NEED_P:
        tl.store(part_p_ptr + offs, acc_p, mask=out_tile)


def launch_config(D, NP):
    """(block sizes, num_warps) per kernel. Chosen from ptxas -v on sm_90 (bf16, dropout on): with
    D tiles of 256 the forward and rows kernels keep their accumulators in registers without spilling
    at 8 warps, and recompute S only D / 256 times; the prompts kernel holds two (BLOCK_P, BLOCK_D)
    accumulators, so it takes 32 rows x 32 prompts to stay spill-free."""
    wide = block(D, hi=256)
    warps = 8 if wide >= 256 else 4
    rows = dict(BLOCK_M=64, BLOCK_P=block(NP, hi=64), BLOCK_K=block(D, hi=64), BLOCK_D=wide)
    prompts = dict(BLOCK_M=32, BLOCK_P=block(NP, hi=32), BLOCK_K=block(D, hi=64), BLOCK_D=wide)
    return {"fwd": (rows, warps), "rows": (rows, warps), "prompts": (prompts, 8)}


def forward(hidden, attn_out, prompts, kt, log_scale, seed, dropout):
    M, D = hidden.shape
    NP = prompts.shape[0]
    out = torch.empty((M, D), dtype=hidden.dtype, device=hidden.device)
    w = torch.empty(M, dtype=acc_dtype(hidden.dtype), device=hidden.device)
    if M == 0:
        return out, w
    blocks, warps = launch_config(D, NP)["fwd"]
    thresh, keep_scale = dropout_args(dropout)
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(D, blocks["BLOCK_D"]))
    _fwd_kernel[grid](
        hidden, attn_out, kt.contiguous(), prompts.contiguous(), log_scale, seed, out, w, M, D, NP,
        thresh, keep_scale, hidden.stride(0), hidden.stride(1), attn_out.stride(0), attn_out.stride(1),
        DROPOUT=dropout > 0, ACC=tl_acc_dtype(hidden.dtype), UPCAST=upcast_bf16(hidden.dtype), **blocks,
        num_warps=warps, num_stages=2)
    return out, w


def backward(grad, hidden, out, prompts, kt, log_scale, w, seed, dropout, need_h, need_y, need_p, need_kt, need_s):
    M, D = grad.shape
    NP = prompts.shape[0]
    dtype, acc, dev = grad.dtype, acc_dtype(grad.dtype), grad.device
    d_h = torch.empty((M, D) if need_h else (0,), dtype=dtype, device=dev)
    d_y = torch.empty((M, D) if need_y else (0,), dtype=dtype, device=dev)
    config = launch_config(D, NP)
    blocks, warps = config["rows"]
    thresh, keep_scale = dropout_args(dropout)
    kt, prompts = kt.contiguous(), prompts.contiguous()
    h = hidden if hidden is not None else grad
    h_strides = (h.stride(0), h.stride(1)) if h.dim() == 2 else (D, 1)
    w_arg = w if w is not None else log_scale
    common = dict(DROPOUT=dropout > 0, ACC=tl_acc_dtype(dtype), UPCAST=upcast_bf16(dtype))
    n_m, n_d = triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(D, blocks["BLOCK_D"])
    part_s = torch.zeros((n_m * n_d if need_s else 0,), dtype=acc, device=dev)
    if M > 0 and (need_h or need_y or need_s):
        _bwd_rows_kernel[(n_m, n_d)](
            h, grad, out if need_s else grad, kt, prompts, log_scale, w_arg, seed, d_h, d_y, part_s,
            M, D, NP, thresh, keep_scale, *h_strides,
            NEED_H=need_h, NEED_Y=need_y, NEED_S=need_s, **common, **blocks, num_warps=warps, num_stages=2)
    d_s = part_s.sum().reshape(1).to(log_scale.dtype) if need_s else log_scale.new_empty(0)
    d_p = torch.zeros(prompts.shape if need_p else (0,), dtype=acc, device=dev)
    d_kt = torch.zeros(kt.shape if need_kt else (0,), dtype=acc, device=dev)
    if M > 0 and (need_p or need_kt):
        blocks, warps = config["prompts"]
        n_p, n_d = triton.cdiv(NP, blocks["BLOCK_P"]), triton.cdiv(D, blocks["BLOCK_D"])
        n_rows = triton.cdiv(M, blocks["BLOCK_M"])
        # Split the row reduction so the grid fills the GPU; partials are folded by torch.sum, in order.
        splits = max(1, min(n_rows, num_programs_target(dev) // (n_p * n_d)))
        rows_per_split = triton.cdiv(n_rows, splits) * blocks["BLOCK_M"]
        splits = triton.cdiv(M, rows_per_split)
        part_kt = torch.empty((splits, NP, D) if need_kt else (0,), dtype=acc, device=dev)
        part_p = torch.empty((splits, NP, D) if need_p else (0,), dtype=acc, device=dev)
        _bwd_prompts_kernel[(n_p, n_d, splits)](
            h, grad, kt, prompts, log_scale, w_arg, seed, part_kt, part_p, M, D, NP, rows_per_split,
            thresh, keep_scale, *h_strides, NEED_KT=need_kt, NEED_P=need_p, **common, **blocks, num_warps=warps,
            num_stages=2)
        if need_kt:
            d_kt = part_kt.sum(0)
        if need_p:
            d_p = part_p.sum(0)
    return d_h, d_y, d_p.to(dtype), d_kt.to(dtype), d_s
