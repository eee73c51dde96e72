"""Triton kernels of APT's approximated prompt attention (docs/design.md, section 3).

    S = H Kt^T,  A = dropout(relu(S)),  w = row max of A (after dropout),  out = exp(s) (Y + w (A P))

Forward, one kernel over row blocks: a program forms the scores of its rows for ALL prompts once (p <= 256,
held in registers as up to four power-of-two prompt chunks, so p is padded only to the next multiple of 16:
200 -> 128 + 64 + 16), looping over D for S; then loops over D tiles for E = A P and the output. S is never
recomputed per D tile and A never reaches global memory.

Backward, with G = dL/dout:
    dY = exp(s) G;  ds = sum(G out);  dE = exp(s) w G;  dS = (dE P^T) [S > 0] keep / (1 - dropout)
    dH = dS Kt;  dKt = dS^T H;  dP = A^T dE = (exp(s) w A)^T G
One rows kernel recomputes S and G P^T for all prompts (one pass over D), writes dS and exp(s) w A as
short-lived (M, p) scratch in the compute dtype (rows padded to a multiple of 16 elements, so its stores
are 128-bit vectors; the GEMMs read p-column views), then loops over D tiles for dH, dY and the per-program
partials of ds. dKt and dP are then two GEMMs through torch.matmul (cuBLAS on a GPU: deterministic, on
tensor-core tiles), and the scratch is freed when the backward returns: nothing of size (M, p) is kept
between forward and backward. The ds partials are folded by torch.sum in a fixed order: no atomics, the
same bits on every run. Accumulation is fp32 (fp64 for fp64); fp32 dots use IEEE precision, not TF32.
Dropout regenerates the forward's mask from the seed with the row-col stream of ladder_kernels/_dropout.py.

Launch shapes (tiles per dtype and architecture from the static gate, tests/kernels/test_triton_static.py): a
program owns ROWS <= BLOCK_M rows, so that ViT-B/16 (M = 6304) makes 132 programs of 64-row wgmma tiles;
on sm_80 the rows kernel takes the prompts in groups of 128 (prompt_groups), where mma.sync's register
fragments for S and G P^T over 208 padded prompts would spill. p > 256 does not fit one program's
registers: those calls go to the plain-PyTorch primitives (backends/torch/apt_diffusion.py: same maths,
same dropout stream, rows in chunks), whose GEMMs are the time at that width anyway.

Offsets: every row index is widened to int64 before it meets a stride (`_rows64`), so M x D or M x p
past 2^31 elements addresses correctly.
"""

import torch
import triton
import triton.language as tl

from ..._common import acc_dtype
from ..torch import apt_diffusion as torch_kernels
from ._jit import mma, row_col_keep, rows64
from ._launch import device_arch, dropout_args, num_programs_target, rows_per_program, tl_acc_dtype, upcast_bf16

MAX_PROMPTS = 256  # the widest score block one program holds in registers; wider p goes to torch_kernels
PAD = 16           # p is padded to a multiple of this (tl.dot's smallest N)


def prompt_chunks(NP: int):
    """p padded to a multiple of 16, as up to 4 power-of-two chunks, largest first (0 = unused slot):
    Triton blocks are powers of two, so 208 = 128 + 64 + 16 holds 200 prompts with 8 padded."""
    padded = triton.cdiv(NP, PAD) * PAD
    chunks = [1 << b for b in range(padded.bit_length() - 1, -1, -1) if padded & (1 << b)]
    assert len(chunks) <= 4, NP
    return tuple(chunks + [0] * (4 - len(chunks)))


@triton.jit
def _dot_t(x, y_ptr, P0: tl.constexpr, C: tl.constexpr, k0, rk, k_ok, NP, D, acc, ACC: tl.constexpr,
           UPCAST: tl.constexpr):
    """acc + x @ y[P0:P0+C, k0:k0+BLOCK_K]^T, y a contiguous (p, D) matrix (Kt or P)."""
    rp = P0 + tl.arange(0, C)
    yv = tl.load(y_ptr + rows64(rp, D)[None, :] + (k0 + rk)[:, None], mask=k_ok[:, None] & (rp < NP)[None, :],
                 other=0.0)
    return mma(x, yv, acc, ACC, UPCAST)


@triton.jit
def _dot_n(a, y_ptr, P0: tl.constexpr, C: tl.constexpr, rd, d_ok, NP, D, acc, ACC: tl.constexpr,
           UPCAST: tl.constexpr):
    """acc + a @ y[P0:P0+C, rd]: a (rows, C) block times a D tile of P (or Kt)."""
    rp = P0 + tl.arange(0, C)
    yv = tl.load(y_ptr + rows64(rp, D)[:, None] + rd[None, :], mask=(rp < NP)[:, None] & d_ok[None, :], other=0.0)
    return mma(a.to(yv.dtype), yv, acc, ACC, UPCAST)


@triton.jit
def _keep_scale(hi, lo, ACC: tl.constexpr):
    """1 / (1 - p) as hi + lo: Triton passes a Python float as fp32, whose rounding (6e-8) fp64 would see."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _activation(s, seed, rm, P0: tl.constexpr, C: tl.constexpr, thresh, keep_scale, DROPOUT: tl.constexpr):
    """A = dropout(relu(S)) of one prompt chunk (the mask replayed from the seed: prompts P0..P0+C)."""
    a = tl.maximum(s, 0.0)
    if DROPOUT:
        keep = row_col_keep(seed, rm, P0 + tl.arange(0, C), thresh)
        a = tl.where(keep, a * keep_scale, 0.0)
    return a


@triton.jit
def _fwd_kernel(h_ptr, y_ptr, kt_ptr, p_ptr, logs_ptr, seed_ptr, out_ptr, w_ptr, M, D, NP, thresh, keep_scale,
                keep_lo,
                stride_hm, stride_hk, stride_ym, stride_yk,
                DROPOUT: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """out[m, d] = exp(s) (Y[m, d] + w[m] sum_j A[m, j] P[j, d]),  w[m] = max_j A[m, j],
    A = dropout(relu(H Kt^T)); one program owns ROWS rows (a BLOCK_M tile, ROWS <= BLOCK_M valid) and
    all p prompts, as chunks C0..C3 (0 = unused)."""
    P1: tl.constexpr = C0
    P2: tl.constexpr = C0 + C1
    P3: tl.constexpr = C0 + C1 + C2
    local = tl.arange(0, BLOCK_M)
    rm = tl.program_id(0) * ROWS + local
    m_ok = (local < ROWS) & (rm < M)
    rk = tl.arange(0, BLOCK_K)
    h_rows = rows64(rm, stride_hm)
    # Phase 1: S for every prompt, one pass over D (H read once).
    s0 = tl.zeros((BLOCK_M, C0), dtype=ACC)
    if C1 > 0:
        s1 = tl.zeros((BLOCK_M, C1), dtype=ACC)
    if C2 > 0:
        s2 = tl.zeros((BLOCK_M, C2), dtype=ACC)
    if C3 > 0:
        s3 = tl.zeros((BLOCK_M, C3), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + rk) < D
        h = tl.load(h_ptr + h_rows[:, None] + (k0 + rk)[None, :] * stride_hk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        s0 = _dot_t(h, kt_ptr, 0, C0, k0, rk, k_ok, NP, D, s0, ACC, UPCAST)
        if C1 > 0:
            s1 = _dot_t(h, kt_ptr, P1, C1, k0, rk, k_ok, NP, D, s1, ACC, UPCAST)
        if C2 > 0:
            s2 = _dot_t(h, kt_ptr, P2, C2, k0, rk, k_ok, NP, D, s2, ACC, UPCAST)
        if C3 > 0:
            s3 = _dot_t(h, kt_ptr, P3, C3, k0, rk, k_ok, NP, D, s3, ACC, UPCAST)
    # A and its row max (after dropout; padded prompts give 0 and cannot raise it). tl.maximum keeps a
    # NaN score's NaN in w, as E = A P would carry it to out anyway.
    seed = tl.load(seed_ptr).to(tl.uint32)
    keep_scale = _keep_scale(keep_scale, keep_lo, ACC)
    a0 = _activation(s0, seed, rm, 0, C0, thresh, keep_scale, DROPOUT)
    w = tl.max(a0, axis=1)
    if C1 > 0:
        a1 = _activation(s1, seed, rm, P1, C1, thresh, keep_scale, DROPOUT)
        w = tl.maximum(w, tl.max(a1, axis=1))
    if C2 > 0:
        a2 = _activation(s2, seed, rm, P2, C2, thresh, keep_scale, DROPOUT)
        w = tl.maximum(w, tl.max(a2, axis=1))
    if C3 > 0:
        a3 = _activation(s3, seed, rm, P3, C3, thresh, keep_scale, DROPOUT)
        w = tl.maximum(w, tl.max(a3, axis=1))
    tl.store(w_ptr + rm, w, mask=m_ok)
    # Phase 2: E = A P and the output, one D tile at a time (Y read once, out written once).
    ex = tl.exp(tl.load(logs_ptr).to(ACC))
    y_rows = rows64(rm, stride_ym)
    o_rows = rows64(rm, D)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        e = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
        e = _dot_n(a0, p_ptr, 0, C0, rd, d_ok, NP, D, e, ACC, UPCAST)
        if C1 > 0:
            e = _dot_n(a1, p_ptr, P1, C1, rd, d_ok, NP, D, e, ACC, UPCAST)
        if C2 > 0:
            e = _dot_n(a2, p_ptr, P2, C2, rd, d_ok, NP, D, e, ACC, UPCAST)
        if C3 > 0:
            e = _dot_n(a3, p_ptr, P3, C3, rd, d_ok, NP, D, e, ACC, UPCAST)
        tile = m_ok[:, None] & d_ok[None, :]
        y = tl.load(y_ptr + y_rows[:, None] + rd[None, :] * stride_yk, mask=tile, other=0.0).to(ACC)
        out = ex * (y + w[:, None] * e)
        tl.store(out_ptr + o_rows[:, None] + rd[None, :], out.to(out_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _bwd_chunk(s, gp, ew, seed, rm, m_ok, P0: tl.constexpr, C: tl.constexpr, NP, p_off, stride_sc, thresh,
               keep_scale, ds_ptr, aw_ptr, NEED_DS: tl.constexpr, NEED_AW: tl.constexpr, DROPOUT: tl.constexpr):
    """One prompt chunk: dS = ew G P^T [S > 0] keep / (1 - p) and exp(s) w A; both written to the (M, p)
    scratch when asked; dS is returned (in the scratch dtype) for dH. Prompt j of this launch is prompt
    p_off + j of the op (the dropout stream's column, the scratch's column)."""
    rp = P0 + tl.arange(0, C)
    on = s > 0
    scale = ew[:, None]
    if DROPOUT:
        on = on & row_col_keep(seed, rm, p_off + rp, thresh)
        scale = scale * keep_scale
    offs = rows64(rm, stride_sc)[:, None] + (p_off + rp)[None, :]
    # No column mask: the chunks end at the launch's p padded to 16, inside the scratch's padded row (the
    # padded prompts store zeros, G P^T and S being 0 there), so the stores are whole 128-bit vectors.
    mask = m_ok[:, None]
    ds = tl.where(on, scale * gp, 0.0).to(ds_ptr.dtype.element_ty)
    if NEED_DS:
        tl.store(ds_ptr + offs, ds, mask=mask)
    if NEED_AW:
        tl.store(aw_ptr + offs, tl.where(on, scale * s, 0.0).to(aw_ptr.dtype.element_ty), mask=mask)
    return ds


@triton.jit
def _bwd_rows_kernel(h_ptr, g_ptr, out_ptr, kt_ptr, p_ptr, logs_ptr, w_ptr, seed_ptr, dh_ptr, dy_ptr, part_s_ptr,
                     ds_ptr, aw_ptr, M, D, NP, p_off, stride_sc, thresh, keep_scale, keep_lo, stride_hm, stride_hk,
                     ACCUM_DH: tl.constexpr, NEED_H: tl.constexpr, NEED_Y: tl.constexpr, NEED_S: tl.constexpr,
                     NEED_DS: tl.constexpr, NEED_AW: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
                     UPCAST: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """With ew = exp(s) w:  dS = ew (G P^T) [S > 0] keep / (1 - p) -> ds_ptr (M, p);  exp(s) w A -> aw_ptr;
    dH = dS Kt;  dY = exp(s) G;  part_s[row block] = sum over its rows and all of D of G out.
    One program owns ROWS rows (BLOCK_M tile) and all prompts of the launch (chunks C0..C3), S recomputed
    once. A launch covers prompts p_off.. p_off + NP of the op (kt_ptr, p_ptr start there; the scratch
    rows are stride_sc wide); with ACCUM_DH it adds its dS Kt to the dH already written (see backward)."""
    P1: tl.constexpr = C0
    P2: tl.constexpr = C0 + C1
    P3: tl.constexpr = C0 + C1 + C2
    SCORES: tl.constexpr = NEED_H or NEED_DS or NEED_AW
    local = tl.arange(0, BLOCK_M)
    rm = tl.program_id(0) * ROWS + local
    m_ok = (local < ROWS) & (rm < M)
    ex = tl.exp(tl.load(logs_ptr).to(ACC))
    keep_scale = _keep_scale(keep_scale, keep_lo, ACC)
    g_rows = rows64(rm, D)  # G, out, dH and dY are contiguous (M, D)
    if SCORES:
        # Phase 1: S = H Kt^T and G P^T for every prompt, one pass over D.
        rk = tl.arange(0, BLOCK_K)
        h_rows = rows64(rm, stride_hm)
        s0 = tl.zeros((BLOCK_M, C0), dtype=ACC)
        q0 = tl.zeros((BLOCK_M, C0), dtype=ACC)
        if C1 > 0:
            s1 = tl.zeros((BLOCK_M, C1), dtype=ACC)
            q1 = tl.zeros((BLOCK_M, C1), dtype=ACC)
        if C2 > 0:
            s2 = tl.zeros((BLOCK_M, C2), dtype=ACC)
            q2 = tl.zeros((BLOCK_M, C2), dtype=ACC)
        if C3 > 0:
            s3 = tl.zeros((BLOCK_M, C3), dtype=ACC)
            q3 = tl.zeros((BLOCK_M, C3), dtype=ACC)
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + rk) < D
            tile_k = m_ok[:, None] & k_ok[None, :]
            h = tl.load(h_ptr + h_rows[:, None] + (k0 + rk)[None, :] * stride_hk, mask=tile_k, other=0.0)
            g = tl.load(g_ptr + g_rows[:, None] + (k0 + rk)[None, :], mask=tile_k, other=0.0)
            s0 = _dot_t(h, kt_ptr, 0, C0, k0, rk, k_ok, NP, D, s0, ACC, UPCAST)
            q0 = _dot_t(g, p_ptr, 0, C0, k0, rk, k_ok, NP, D, q0, ACC, UPCAST)
            if C1 > 0:
                s1 = _dot_t(h, kt_ptr, P1, C1, k0, rk, k_ok, NP, D, s1, ACC, UPCAST)
                q1 = _dot_t(g, p_ptr, P1, C1, k0, rk, k_ok, NP, D, q1, ACC, UPCAST)
            if C2 > 0:
                s2 = _dot_t(h, kt_ptr, P2, C2, k0, rk, k_ok, NP, D, s2, ACC, UPCAST)
                q2 = _dot_t(g, p_ptr, P2, C2, k0, rk, k_ok, NP, D, q2, ACC, UPCAST)
            if C3 > 0:
                s3 = _dot_t(h, kt_ptr, P3, C3, k0, rk, k_ok, NP, D, s3, ACC, UPCAST)
                q3 = _dot_t(g, p_ptr, P3, C3, k0, rk, k_ok, NP, D, q3, ACC, UPCAST)
        seed = tl.load(seed_ptr).to(tl.uint32)
        ew = ex * tl.load(w_ptr + rm, mask=m_ok, other=0.0).to(ACC)
        d0_ = _bwd_chunk(s0, q0, ew, seed, rm, m_ok, 0, C0, NP, p_off, stride_sc, thresh, keep_scale,
                         ds_ptr, aw_ptr, NEED_DS, NEED_AW, DROPOUT)
        if C1 > 0:
            d1_ = _bwd_chunk(s1, q1, ew, seed, rm, m_ok, P1, C1, NP, p_off, stride_sc, thresh, keep_scale,
                             ds_ptr, aw_ptr, NEED_DS, NEED_AW, DROPOUT)
        if C2 > 0:
            d2_ = _bwd_chunk(s2, q2, ew, seed, rm, m_ok, P2, C2, NP, p_off, stride_sc, thresh, keep_scale,
                             ds_ptr, aw_ptr, NEED_DS, NEED_AW, DROPOUT)
        if C3 > 0:
            d3_ = _bwd_chunk(s3, q3, ew, seed, rm, m_ok, P3, C3, NP, p_off, stride_sc, thresh, keep_scale,
                             ds_ptr, aw_ptr, NEED_DS, NEED_AW, DROPOUT)
    # Phase 2: dH, dY and ds, one D tile at a time.
    part = tl.zeros((BLOCK_M,), dtype=ACC)
    if NEED_H or NEED_Y or NEED_S:
        for e0 in range(0, D, BLOCK_D):
            rd = e0 + tl.arange(0, BLOCK_D)
            d_ok = rd < D
            tile = m_ok[:, None] & d_ok[None, :]
            offs = g_rows[:, None] + rd[None, :]
            if NEED_Y or NEED_S:
                gv = tl.load(g_ptr + offs, mask=tile, other=0.0).to(ACC)
                if NEED_Y:
                    tl.store(dy_ptr + offs, (ex * gv).to(dy_ptr.dtype.element_ty), mask=tile)
                if NEED_S:
                    o = tl.load(out_ptr + offs, mask=tile, other=0.0).to(ACC)
                    part += tl.sum(gv * o, axis=1)
            if NEED_H:
                acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
                acc = _dot_n(d0_, kt_ptr, 0, C0, rd, d_ok, NP, D, acc, ACC, UPCAST)
                if C1 > 0:
                    acc = _dot_n(d1_, kt_ptr, P1, C1, rd, d_ok, NP, D, acc, ACC, UPCAST)
                if C2 > 0:
                    acc = _dot_n(d2_, kt_ptr, P2, C2, rd, d_ok, NP, D, acc, ACC, UPCAST)
                if C3 > 0:
                    acc = _dot_n(d3_, kt_ptr, P3, C3, rd, d_ok, NP, D, acc, ACC, UPCAST)
                if ACCUM_DH:  # a later prompt group: dH = sum over the groups of dS_g Kt_g
                    acc += tl.load(dh_ptr + offs, mask=tile, other=0.0).to(ACC)
                tl.store(dh_ptr + offs, acc.to(dh_ptr.dtype.element_ty), mask=tile)
    if NEED_S:
        tl.store(part_s_ptr + tl.program_id(0), tl.sum(part, axis=0))


# Per-dtype tiles, from the static gate (tests/kernels/test_triton_static.py; benchmarks/static_gate.py prints the
# table): bf16/fp16 run their dots on wgmma (sm_90), which needs 64-row tiles (4 warps = one warpgroup per
# 64 rows); fp32/fp64 dots are IEEE FMA loops that hold both operands in registers, so their tiles are
# smaller. Past 128 padded prompts the score blocks alone take 100+ registers a thread.
def _tiles(kind, padded, arch):
    wide = padded > 128
    if kind == "half":
        # (sm_80 past 128 prompts: the forward in 8 warps and narrower K / D tiles, 16-wide K steps, whose
        # mma.sync operand fragments leave room for the scores (K = 32 spilled 56-120 B at p = 209..240);
        # its rows kernel never sees more than 128 (prompt_groups), and from three chunks on (96, 112
        # padded) takes 16-wide K steps too (K = 32 spilled 16-40 B at 97..112))
        fwd = (dict(BLOCK_M=64, BLOCK_K=16, BLOCK_D=32), 8, 2) if wide and arch < 90 else \
            (dict(BLOCK_M=64, BLOCK_K=64, BLOCK_D=64), 4, 3)
        rows = (dict(BLOCK_M=64, BLOCK_K=16 if arch < 90 and padded > 80 else 32, BLOCK_D=64), 8, 2)
    else:
        # 3 stages up to 128 padded prompts (2 stages spilled 8 B at 65..80 on sm_90), 2 past it (3 stages
        # spill 368+ B there)
        fwd = (dict(BLOCK_M=32, BLOCK_K=16, BLOCK_D=32), 4, 3 if padded <= 128 else 2)
        # (8 warps also for sm_80's <= 32-prompt launches: a later group that adds to dH spilled 16 B in 4
        # warps at p = 145..160, found by the static gate on the GPU machine)
        rows = (dict(BLOCK_M=32, BLOCK_K=16, BLOCK_D=32), 8 if padded >= 128 or (arch < 90 and padded <= 32) else 4, 2)
    return {"fwd": fwd, "rows": rows}


def prompt_groups(NP, arch):
    """[(first, end)] prompt ranges the backward's rows kernel is launched over. One launch holds all p on
    sm_90; sm_80's mma.sync fragments make S and G P^T for more than 128 padded prompts spill, so there
    the prompts go in groups of 128 (dH accumulated in place: one more read and write of dH per group)."""
    if arch >= 90 or sum(prompt_chunks(NP)) <= 128:
        return [(0, NP)]
    return [(g, min(NP, g + 128)) for g in range(0, NP, 128)]


def launch_config(M, D, NP, dtype, programs=None, arch=90):
    """{kernel: (constexprs, num_warps, num_stages)} for "fwd" and "rows" at these sizes, for sm_`arch`.
    `programs` is the number of programs that fill the device (num_programs_target; 132 for an H100 /
    H200's SMs): a program owns ROWS <= BLOCK_M rows so that the grid reaches it (ViT-B/16, M = 6304:
    48 rows of a 64-row tile -> 132 programs instead of 99)."""
    kind = "half" if dtype in (torch.bfloat16, torch.float16) else "float"
    chunks = prompt_chunks(NP)
    config = {}
    for name, (tiles, warps, stages) in _tiles(kind, sum(chunks), arch).items():
        rows = rows_per_program(M, tiles["BLOCK_M"], programs or 4)
        config[name] = (dict(tiles, ROWS=rows, **dict(zip(("C0", "C1", "C2", "C3"), chunks))), warps, stages)
    return config


def _programs(device):
    return num_programs_target(device, waves=1)


def forward(hidden, attn_out, prompts, kt, log_scale, seed, dropout):
    M, D = hidden.shape
    NP = prompts.shape[0]
    if NP > MAX_PROMPTS:
        return torch_kernels.forward(hidden, attn_out, prompts, kt, log_scale, seed, dropout)
    out = torch.empty((M, D), dtype=hidden.dtype, device=hidden.device)
    w = torch.empty(M, dtype=acc_dtype(hidden.dtype), device=hidden.device)
    if M == 0:
        return out, w
    dev = hidden.device
    consts, warps, stages = launch_config(M, D, NP, hidden.dtype, _programs(dev), device_arch(dev))["fwd"]
    thresh, keep_scale, keep_lo = dropout_args(dropout)
    _fwd_kernel[(triton.cdiv(M, consts["ROWS"]),)](
        hidden, attn_out, kt.contiguous(), prompts.contiguous(), log_scale, seed, out, w, M, D, NP,
        thresh, keep_scale, keep_lo, hidden.stride(0), hidden.stride(1), attn_out.stride(0), attn_out.stride(1),
        DROPOUT=dropout > 0, ACC=tl_acc_dtype(hidden.dtype), UPCAST=upcast_bf16(hidden.dtype), **consts,
        num_warps=warps, num_stages=stages)
    return out, w


def backward(grad, hidden, out, prompts, kt, log_scale, w, seed, dropout, need_h, need_y, need_p, need_kt, need_s):
    M, D = grad.shape
    NP = prompts.shape[0]
    if NP > MAX_PROMPTS:
        return torch_kernels.backward(grad, hidden, out, prompts, kt, log_scale, w, seed, dropout,
                                      need_h, need_y, need_p, need_kt, need_s)
    dtype, acc, dev = grad.dtype, acc_dtype(grad.dtype), grad.device
    d_h = torch.empty((M, D) if need_h else (0,), dtype=dtype, device=dev)
    d_y = torch.empty((M, D) if need_y else (0,), dtype=dtype, device=dev)
    # Short-lived (M, p) scratch in the compute dtype, freed when this function returns. Its rows are
    # padded to a multiple of 16 elements (p = 200 -> 208): the rows kernel's stride_sc then specialises as
    # 16-divisible, so its dS / exp(s) w A stores are 128-bit vectors (a row stride of 200 made them scalar
    # 16-bit stores); the GEMMs below read the first p columns through a view (no copy, cuBLAS's lda).
    stride_sc = triton.cdiv(NP, PAD) * PAD
    d_scores = torch.empty((M, stride_sc) if need_kt else (0, stride_sc), dtype=dtype, device=dev)[:, :NP]
    act_w = torch.empty((M, stride_sc) if need_p else (0, stride_sc), dtype=dtype, device=dev)[:, :NP]
    arch = device_arch(dev)
    groups = prompt_groups(NP, arch)
    # One launch configuration per prompt group, worked out once (it is host time on every call).
    programs = _programs(dev)
    configs = [launch_config(M, D, g1 - g0, dtype, programs, arch)["rows"] for g0, g1 in groups]
    # ds's partials: one per program of the first launch (the one that computes them), all written.
    part_s = torch.empty((triton.cdiv(M, configs[0][0]["ROWS"]) if need_s else 0,), dtype=acc, device=dev)
    thresh, keep_scale, keep_lo = dropout_args(dropout)
    kt, prompts = kt.contiguous(), prompts.contiguous()
    h = hidden if hidden is not None else grad
    if M > 0 and (need_h or need_y or need_s or need_p or need_kt):
        for first, ((g0, g1), (consts, warps, stages)) in enumerate(zip(groups, configs)):
            first = first == 0
            _bwd_rows_kernel[(triton.cdiv(M, consts["ROWS"]),)](
                h, grad, out if need_s else grad, kt[g0:], prompts[g0:], log_scale,
                w if w is not None else log_scale, seed, d_h, d_y, part_s, d_scores, act_w, M, D, g1 - g0, g0,
                stride_sc,
                thresh, keep_scale, keep_lo, h.stride(0), h.stride(1), ACCUM_DH=not first, NEED_H=need_h,
                NEED_Y=need_y and first, NEED_S=need_s and first, NEED_DS=need_kt, NEED_AW=need_p,
                DROPOUT=dropout > 0, ACC=tl_acc_dtype(dtype), UPCAST=upcast_bf16(dtype), **consts, num_warps=warps,
                num_stages=stages)
    d_s = part_s.sum().reshape(1).to(log_scale.dtype) if need_s else log_scale.new_empty(0)
    # The reductions over rows are plain GEMMs (cuBLAS on a GPU, fp32 accumulation, deterministic).
    d_kt = torch.matmul(d_scores.t(), hidden) if need_kt else grad.new_empty(0)
    d_p = torch.matmul(act_w.t(), grad) if need_p else grad.new_empty(0)
    return d_h, d_y, d_p, d_kt, d_s
