"""Triton kernels of the ladder gated fusion (docs/design.md, section 1).

Forward, one kernel: the GEMM Z = X W^T with the gate, bias and blend in its epilogue,

    mu = sigmoid(alpha / T),  out = mu * s + (1 - mu) * (X W^T + b),  and  diff = s - Z  when the gate trains,

so Z never reaches global memory, and mu is formed in the kernel from the (1,) or (d,) logits alpha (the
programs of the first row block write the (d,) mu the op keeps for backward): no torch call around it.
Backward, four kernels, no atomics, no torch arithmetic on the common path (ds, db, dalpha, dW):
  * grad_rows: one pass over G (and diff): ds = mu * G, and per-row-block column sums of G and G * diff
    written to (row blocks, d) buffers;
  * finish: one small program folds those buffers in a fixed order into db = (1 - mu) sum_rows G and
    dalpha = mu (1 - mu) / T sum_rows G diff (summed over channels for a scalar gate);
  * grad_weight: G^T X with the float8 tap's row scales applied on the fly, split over rows into a
    (splits, d, D) buffer for occupancy, then the fold kernel adds the splits in order, applies the
    (1 - mu) row scale (from mu itself) and casts to the gradient's dtype. Same inputs, same bits.
dX = G ((1 - mu) W), only when the tap requires grad (never in the ladder: its taps are detached), stays a
torch GEMM. All accumulation is fp32 (fp64 for fp64 inputs); fp32 dots use IEEE precision, not TF32, so fp32
results match plain PyTorch's fp32 matmul. Row offsets are int64 (`rows64`): M x D past 2^31 elements is fine.

The temperature reaches the kernels as an fp32 scalar (what a Triton float argument is), and they divide by
it (1 / T overflows for tiny T). fp64 calls, and T outside fp32's normal range, leave mu to the op
(forward_gate returns None: ops/gated_fusion._mu) and divide dalpha by T in float64 here, so those keep
their precision; fp64 is not a GPU path anyway (the dispatcher sends fp64 CUDA calls to plain PyTorch,
and the static gate does not compile it).

Launch shapes (checked by the static gate, tests/kernels/test_triton_static.py): d <= 256 is one N block
(8 warps past 128: the pipeline's d = 192), so the forward and dW read X once; a program owns ROWS <=
BLOCK_M rows so that the benchmarks' vision tap (M = 32 x 197 = 6304, d = 96) makes 132 programs, one full wave of an
H100 / H200, with 64-row wgmma tiles (99 tiles of 64 rows would leave a quarter of the SMs idle);
bf16/fp16 and fp32 have their own tiles (fp32 dots are FMA loops that hold their operands in registers).
"""

import torch
import triton
import triton.language as tl

from ..._common import acc_dtype
from ._jit import rows64
from ._launch import block, device_arch, num_programs_target, rows_per_program, tl_acc_dtype, upcast_bf16


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, s_ptr, gate_ptr, mu_ptr, out_ptr, diff_ptr, M, N, K, temperature,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sn,
                HAS_BIAS: tl.constexpr, SAVE_DIFF: tl.constexpr, MU_GIVEN: tl.constexpr, GATE_VEC: tl.constexpr,
                ACC: tl.constexpr, UPCAST: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = mu[n] s[m, n] + (1 - mu[n]) (sum_k x[m, k] w[n, k] + b[n]); diff = s - Z.
    mu[n] = sigmoid(gate[n] / T) (gate[0] for a scalar gate, GATE_VEC off), formed here and written to mu_ptr
    by the programs of row block 0; with MU_GIVEN, mu is read from mu_ptr instead (fp64, or T outside fp32's
    normal range: the caller formed it). A program owns ROWS rows (of a BLOCK_M tile) and BLOCK_N columns."""
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
    if MU_GIVEN:
        mu_n = tl.load(mu_ptr + rn, mask=n_ok, other=0.0).to(ACC)
    else:
        if GATE_VEC:
            alpha = tl.load(gate_ptr + rn, mask=n_ok, other=0.0).to(ACC)
        else:
            alpha = tl.zeros((BLOCK_N,), dtype=ACC) + tl.load(gate_ptr).to(ACC)
        mu_n = tl.sigmoid(alpha / temperature)  # by division: 1 / T overflows for tiny T
        if tl.program_id(0) == 0:  # one row of programs writes the (d,) mu the op keeps for backward
            tl.store(mu_ptr + rn, mu_n, mask=n_ok)
    mu = mu_n[None, :]
    tile = m_ok[:, None] & n_ok[None, :]
    s = tl.load(s_ptr + rows64(rm, stride_sm)[:, None] + rn[None, :] * stride_sn, mask=tile, other=0.0).to(ACC)
    offs = rows64(rm, N)[:, None] + rn[None, :]  # outputs are fresh, contiguous (M, N)
    tl.store(out_ptr + offs, (mu * s + (1.0 - mu) * acc).to(out_ptr.dtype.element_ty), mask=tile)
    if SAVE_DIFF:
        tl.store(diff_ptr + offs, (s - acc).to(diff_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _grad_rows_kernel(g_ptr, diff_ptr, mu_ptr, ds_ptr, part_g_ptr, part_gd_ptr, M, N,
                      NEED_SUM: tl.constexpr, HAS_DIFF: tl.constexpr, NEED_SIDE: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """ds = mu G;  part_g[b, n] = sum_{m in block b} G[m, n];  part_gd[b, n] = sum G[m, n] diff[m, n]
    (each only when asked: NEED_SIDE, NEED_SUM, HAS_DIFF)."""
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
    part = pid_m * N + rn  # (row blocks, N) partials: far below 2^31 elements
    if NEED_SUM:
        tl.store(part_g_ptr + part, tl.sum(g, axis=0), mask=n_ok)
    if HAS_DIFF:
        df = tl.load(diff_ptr + offs, mask=tile, other=0.0).to(ACC)
        tl.store(part_gd_ptr + part, tl.sum(g * df, axis=0), mask=n_ok)


@triton.jit
def _finish_kernel(part_g_ptr, part_gd_ptr, mu_ptr, db_ptr, dgate_ptr, blocks, N, temperature,
                   NEED_BIAS: tl.constexpr, NEED_GATE: tl.constexpr, SCALAR_GATE: tl.constexpr,
                   DIV_T: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """db[n] = (1 - mu[n]) sum_b part_g[b, n]  (in db's dtype);
    dgate[n] = mu[n] (1 - mu[n]) / T sum_b part_gd[b, n]  (dgate[0] = the sum over n for a scalar gate;
    without DIV_T the caller divides by T). One program: the row blocks are added BLOCK_B at a time in a
    fixed order, so the same partials give the same bits (no atomics)."""
    total = tl.zeros((BLOCK_N,), dtype=ACC)  # a scalar gate's per-lane running sum over channel chunks
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        mu = tl.load(mu_ptr + rn, mask=n_ok, other=0.0).to(ACC)
        if NEED_BIAS:
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)
            for b0 in range(0, blocks, BLOCK_B):
                rb = b0 + tl.arange(0, BLOCK_B)
                acc += tl.load(part_g_ptr + rows64(rb, N)[:, None] + rn[None, :],
                               mask=(rb < blocks)[:, None] & n_ok[None, :], other=0.0)
            col = tl.sum(acc, axis=0)
            tl.store(db_ptr + rn, ((1.0 - mu) * col).to(db_ptr.dtype.element_ty), mask=n_ok)
        if NEED_GATE:
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)
            for b0 in range(0, blocks, BLOCK_B):
                rb = b0 + tl.arange(0, BLOCK_B)
                acc += tl.load(part_gd_ptr + rows64(rb, N)[:, None] + rn[None, :],
                               mask=(rb < blocks)[:, None] & n_ok[None, :], other=0.0)
            dg = mu * (1.0 - mu) * tl.sum(acc, axis=0)
            if SCALAR_GATE:
                total += tl.where(n_ok, dg, 0.0)
            else:
                if DIV_T:
                    dg = dg / temperature
                tl.store(dgate_ptr + rn, dg.to(dgate_ptr.dtype.element_ty), mask=n_ok)
    if NEED_GATE and SCALAR_GATE:  # summed, then divided once: a sum of finite terms, never inf - inf
        dg = tl.sum(total, axis=0)
        if DIV_T:
            dg = dg / temperature
        tl.store(dgate_ptr, dg.to(dgate_ptr.dtype.element_ty))


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
def _fold_kernel(part_ptr, row_scale_ptr, out_ptr, splits, N, K, HAS_ROW_SCALE: tl.constexpr,
                 ONE_MINUS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[n, k] = (sum over split = 0, 1, .. of part[split, n, k]) * r[n], in out's dtype, with
    r = row_scale (or 1 - row_scale with ONE_MINUS: the op's 1 - mu from mu itself; r = 1 without
    HAS_ROW_SCALE). The splits are added in order: the same bits on every run."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N * K
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for split in range(0, splits):
        # tl.cast, not .to: a size equal to 1 arrives as a Python int on a GPU (the JIT's constexpr-1
        # specialisation), which has no .to; the interpreter passes a tensor and hid it.
        acc += tl.load(part_ptr + split * tl.cast(N, tl.int64) * K + offs, mask=ok, other=0.0)
    if HAS_ROW_SCALE:
        r = tl.load(row_scale_ptr + offs // K, mask=ok, other=0.0).to(ACC)
        if ONE_MINUS:
            r = 1.0 - r
        acc *= r
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _half(dtype):
    return dtype in (torch.bfloat16, torch.float16)


def forward_config(M, N, K, dtype, programs=None):
    """(constexprs, num_warps, num_stages) of the forward. d <= 256 in one N block, so X is read once (the
    pipeline's fusions are d = 768 / 4 = 192: two 128-wide blocks read the tap twice); past 128 columns in
    8 warps (the accumulator's registers; no spills on sm_80 / sm_90, the static gate). fp32's FMA dots get
    32-row tiles and 16-wide K steps."""
    wide = N > 128
    if _half(dtype):
        tiles = dict(BLOCK_M=64, BLOCK_N=block(N, hi=256), BLOCK_K=block(K, hi=32 if wide else 64))
    else:
        tiles = dict(BLOCK_M=32, BLOCK_N=block(N, hi=256), BLOCK_K=block(K, hi=16))
    warps, stages = (8 if wide else 4), 3
    tiles["ROWS"] = rows_per_program(M, tiles["BLOCK_M"], programs or 4)
    return tiles, warps, stages


def grad_weight_config(M, N, K, dtype, programs=None):
    """(constexprs, num_warps, num_stages, splits, rows_per_split) of dW = G^T X: one N block for d <= 256
    (X read once; 8 warps past 128), splits over rows so that the grid makes one wave of `programs`."""
    wide = N > 128
    if _half(dtype):
        tiles = dict(BLOCK_M=64, BLOCK_N=block(N, hi=256), BLOCK_K=block(K, hi=64))
    else:
        tiles = dict(BLOCK_M=16, BLOCK_N=block(N, hi=256), BLOCK_K=block(K, hi=32))
    warps, stages = (8 if wide else 4), 3
    n_tiles = triton.cdiv(N, tiles["BLOCK_N"]) * triton.cdiv(K, tiles["BLOCK_K"])
    # Split the row reduction so the grid fills the GPU; the fold kernel adds the partials in order.
    splits = max(1, min(triton.cdiv(M, tiles["BLOCK_M"]), (programs or 4) // n_tiles))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), tiles["BLOCK_M"]) * tiles["BLOCK_M"]
    return tiles, warps, stages, max(1, triton.cdiv(M, rows_per_split)), rows_per_split


def _programs(device):
    return num_programs_target(device, waves=1)


def _fp32_temperature(temperature: float, dtype) -> bool:
    """Whether the kernels may take T as their fp32 scalar: not for fp64 (its precision), nor for a T that
    fp32 holds only as a subnormal, zero or inf."""
    return dtype != torch.float64 and 1.1754943508222875e-38 <= temperature <= 3.4028234663852886e38


def _forward(side, tap, weight, bias, gate, mu, temperature, save_diff):
    M, K = tap.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=side.dtype, device=side.device)
    diff = torch.empty((M, N) if save_diff else (0,), dtype=side.dtype, device=side.device)
    if M == 0:
        return out, diff
    mu_given = gate is None
    tiles, warps, stages = forward_config(M, N, K, side.dtype, _programs(side.device))
    grid = (triton.cdiv(M, tiles["ROWS"]), triton.cdiv(N, tiles["BLOCK_N"]))
    _fwd_kernel[grid](
        tap, weight, bias if bias is not None else mu, side, mu if mu_given else gate, mu, out, diff, M, N, K,
        temperature, tap.stride(0), tap.stride(1), weight.stride(0), weight.stride(1), side.stride(0),
        side.stride(1), HAS_BIAS=bias is not None, SAVE_DIFF=save_diff, MU_GIVEN=mu_given,
        GATE_VEC=not mu_given and gate.numel() != 1, ACC=tl_acc_dtype(side.dtype),
        UPCAST=upcast_bf16(side.dtype), **tiles, num_warps=warps, num_stages=stages)
    return out, diff


def forward(side, tap, weight, bias, mu, save_diff):
    """The interface's forward: mu (d,) given."""
    return _forward(side, tap, weight, bias.contiguous() if bias is not None else None, None, mu, 1.0, save_diff)


def forward_gate(side, tap, weight, bias, gate, temperature, save_diff):
    """(out, s - Z or empty, mu (d,) in the accumulation dtype) from the gate logits (1,) or (d,): mu is
    formed in the forward kernel, so the op makes no torch call of its own around it (one launch). None
    where the kernel cannot form mu (fp64, a T outside fp32's normal range, no rows): the op then forms mu
    itself (ops/gated_fusion._mu, its one definition for those cases) and calls `forward`."""
    if side.shape[0] == 0 or not _fp32_temperature(temperature, side.dtype):
        return None
    mu = torch.empty(weight.shape[0], dtype=acc_dtype(side.dtype), device=side.device)  # written by the kernel
    bias = bias.contiguous() if bias is not None else None
    return (*_forward(side, tap, weight, bias, gate.contiguous(), mu, temperature, save_diff), mu)


def grad_rows(grad, diff, mu, need_side, temperature=1.0, scalar_gate=False, need_bias=True):
    """(ds = mu G or empty, db = (1 - mu) sum_rows G in grad's dtype or empty, dalpha = mu (1 - mu) / T
    sum_rows(G diff) (acc dtype; (1,) for a scalar gate) or empty when diff is None): the rows kernel and
    the finish kernel that folds its per-block column sums in a fixed order."""
    M, N = grad.shape
    acc = acc_dtype(grad.dtype)
    need_gate = diff is not None
    # A streaming pass: 32-row blocks when 64-row ones would not make one wave (the vision tap: 197 vs 99).
    BLOCK_M = 32 if triton.cdiv(M, 64) < _programs(grad.device) else 64
    BLOCK_N = block(N, hi=128)
    blocks = triton.cdiv(M, BLOCK_M)
    d_side = torch.empty((M, N) if need_side else (0,), dtype=grad.dtype, device=grad.device)
    d_bias = torch.empty(N if need_bias else 0, dtype=grad.dtype, device=grad.device)
    d_gate = torch.empty((1 if scalar_gate else N) if need_gate else 0, dtype=acc, device=grad.device)
    if not (need_side or need_bias or need_gate):
        return d_side, d_bias, d_gate
    if M == 0:  # no rows: the sums are zero
        return d_side, d_bias.zero_(), d_gate.zero_()
    # Every element of the partials is written by its program (all n < N of every row block): empty.
    part_g = torch.empty((blocks if need_bias else 0, N), dtype=acc, device=grad.device)
    part_gd = torch.empty((blocks if need_gate else 0, N), dtype=acc, device=grad.device)
    _grad_rows_kernel[(blocks, triton.cdiv(N, BLOCK_N))](
        grad, diff.contiguous() if need_gate else grad, mu, d_side, part_g, part_gd, M, N,
        NEED_SUM=need_bias, HAS_DIFF=need_gate, NEED_SIDE=need_side, ACC=tl_acc_dtype(grad.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)
    if need_bias or need_gate:
        div_t = _fp32_temperature(temperature, grad.dtype)
        _finish_kernel[(1,)](
            part_g, part_gd, mu, d_bias, d_gate, blocks, N, temperature if div_t else 1.0, NEED_BIAS=need_bias,
            NEED_GATE=need_gate, SCALAR_GATE=scalar_gate, DIV_T=div_t, ACC=tl_acc_dtype(grad.dtype),
            BLOCK_B=32, BLOCK_N=block(N, hi=128), num_warps=4)
        if need_gate and not div_t:  # fp64, or a T fp32 holds only as a subnormal or 0: divided in float64
            d_gate = (d_gate.double() / temperature).to(acc)  # (0 / T stays 0; a huge quotient is +-inf)
    return d_side, d_bias, d_gate


def _e4m3_in_torch(tap, grad) -> bool:
    """Whether dW's e4m3 tap must be dequantised in torch: on a GPU before sm_89 (Triton has no e4m3 there)."""
    return tap.dtype == torch.float8_e4m3fn and grad.is_cuda and device_arch(grad.device) < 89


def grad_weight(grad, tap, tap_scale, row_scale=None, out_dtype=None, one_minus=False):
    """G^T X (d, D) in the accumulation dtype, as the interface asks. Beyond it: `row_scale` (d,) multiplies
    row n (with `one_minus`, 1 - row_scale does: the op passes mu for its (1 - mu)) and `out_dtype` casts,
    both inside the fold kernel, so that a caller that passes them needs no torch pass of its own over dW."""
    M, N = grad.shape
    K = tap.shape[1]
    acc = acc_dtype(grad.dtype)
    out_dtype = out_dtype or acc
    if M == 0:
        return torch.zeros((N, K), dtype=out_dtype, device=grad.device)
    if _e4m3_in_torch(tap, grad):
        # Triton has no e4m3 type before Ada/Hopper (sm_89): dequantise in torch, 8192 rows at a time
        # (never a whole copy), into the fp32 dW the fold below scales and casts.
        dw = torch.zeros((N, K), dtype=acc, device=grad.device)
        for r in range(0, M, 8192):
            g = grad[r:r + 8192].to(acc) * tap_scale[r:r + 8192, None]
            dw.addmm_(g.t(), tap[r:r + 8192].to(acc))
        part, splits = dw, 1
    else:
        tiles, warps, stages, splits, rows_per_split = grad_weight_config(M, N, K, grad.dtype,
                                                                          _programs(grad.device))
        part = torch.empty((splits, N, K), dtype=acc, device=grad.device)  # every element written
        _grad_weight_kernel[(triton.cdiv(N, tiles["BLOCK_N"]), triton.cdiv(K, tiles["BLOCK_K"]), splits)](
            grad, tap, tap_scale if tap_scale is not None else grad, part, M, N, K, rows_per_split,
            tap.stride(0), tap.stride(1), HAS_SCALE=tap_scale is not None, ACC=tl_acc_dtype(grad.dtype),
            UPCAST=upcast_bf16(grad.dtype), **tiles, num_warps=warps, num_stages=stages)
    if splits == 1 and row_scale is None and out_dtype == acc:
        return part.reshape(N, K)
    out = torch.empty((N, K), dtype=out_dtype, device=grad.device)
    BLOCK = 1024
    _fold_kernel[(triton.cdiv(N * K, BLOCK),)](
        part, row_scale if row_scale is not None else part, out, splits, N, K, HAS_ROW_SCALE=row_scale is not None,
        ONE_MINUS=one_minus, ACC=tl_acc_dtype(grad.dtype), BLOCK=BLOCK, num_warps=4)
    return out


def backward(grad, diff, tap, tap_scale, weight, mu, temperature, scalar_gate, need_side, need_tap, need_weight,
             need_bias, need_gate):
    """The interface's backward: ds = mu G, dX = G ((1 - mu) W), dW = (1 - mu) G^T X, db = (1 - mu) sum_rows G,
    dalpha = mu (1 - mu) / T sum_rows(G (s - Z)). Launches: rows + finish (ds, db, dalpha), dW GEMM + fold;
    dX (only when the tap requires grad) is a torch GEMM."""
    d_side, d_tap, d_weight = (grad.new_empty(0) for _ in range(3))  # distinct: no aliasing
    d_bias, d_gate = grad.new_empty(0), mu.new_empty(0)
    if need_side or need_bias or need_gate:
        d_side, d_bias, d_gate = grad_rows(grad, diff if need_gate else None, mu, need_side, temperature,
                                           scalar_gate, need_bias)
    if need_weight:
        d_weight = grad_weight(grad, tap, tap_scale, row_scale=mu, out_dtype=grad.dtype, one_minus=True)
    if need_tap:
        d_tap = grad @ ((1 - mu)[:, None] * weight.to(mu.dtype)).to(grad.dtype)
    return d_side, d_tap, d_weight, d_bias, d_gate
