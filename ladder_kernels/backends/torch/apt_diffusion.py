"""APT's prompt diffusion in plain PyTorch, rows in chunks of 4096 so its (rows, p) scratch stays bounded;
the reductions over rows in a fixed order, so the gradients' bits do not depend on the thread count.

    S = H Kt^T;  A = dropout(relu(S));  w = row max of A;  out = exp(s) (Y + w (A P))
    backward: dY = exp(s) G;  ds = sum(G out);  dE = exp(s) w G;  dS = (dE P^T) [A > 0] / (1 - p)
              dH = dS Kt;  dKt = dS^T H;  dP = A^T dE
"""
import torch

from ... import _dropout
from ..._common import acc_dtype

CHUNK = 4096
BLOCK = 128  # rows per partial GEMM of a gradient reduced over rows


def _activation(h, kt, seed, dropout, row0):
    s = h @ kt.t()
    act = torch.relu(s)
    if dropout > 0:
        keep = _dropout.row_col_keep(seed, row0, h.shape[0], kt.shape[0], dropout)
        act = torch.where(keep, act * (1.0 / (1.0 - dropout)), torch.zeros_like(act))
    return s, act


def tree_sum(x):
    """x summed over dim 0 by pairwise elementwise adds: unlike torch's reductions and GEMMs over many
    rows, whose split between threads changes the rounding, the order is fixed (the C++ kernels add
    per-block partials in block order for the same reason)."""
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = torch.cat((x, x.new_zeros((1, *x.shape[1:]))))
        x = x[0::2] + x[1::2]
    return x[0] if x.shape[0] else x.new_zeros(x.shape[1:])


def row_blocks_product(a, b):
    """a^T b, (rows, m) x (rows, n) -> (m, n) in the accumulation dtype, as BLOCK-row partial GEMMs (a
    short K, which BLAS does not split between threads) summed by tree_sum."""
    acc = acc_dtype(a.dtype)
    a, b = a.to(acc), b.to(acc)
    rows = a.shape[0]
    pad = -rows % BLOCK
    if pad:
        a = torch.cat((a, a.new_zeros(pad, a.shape[1])))
        b = torch.cat((b, b.new_zeros(pad, b.shape[1])))
    n = a.shape[0] // BLOCK  # not -1: a width of 0 leaves the block count ambiguous to reshape
    parts = torch.bmm(a.reshape(n, BLOCK, a.shape[1]).transpose(1, 2), b.reshape(n, BLOCK, b.shape[1]))
    return tree_sum(parts)


def forward(hidden, attn_out, prompts, kt, log_scale, seed, dropout):
    M = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    w = torch.empty(M, dtype=acc, device=hidden.device)
    ex = torch.exp(log_scale.to(acc))
    for r0 in range(0, M, CHUNK):
        h = hidden[r0:r0 + CHUNK]
        _, a = _activation(h, kt, seed, dropout, r0)
        # max(A) and not max(S): NaN in a row must reach out, as it does through E = A P
        wc = a.amax(1).to(acc)
        e = (a @ prompts).to(acc)
        out[r0:r0 + CHUNK] = (ex * (attn_out[r0:r0 + CHUNK].to(acc) + wc[:, None] * e)).to(hidden.dtype)
        w[r0:r0 + CHUNK] = wc
    return out, w


def backward(grad, hidden, out, prompts, kt, log_scale, w, seed, dropout, need_h, need_y, need_p, need_kt, need_s):
    dtype, acc = grad.dtype, acc_dtype(grad.dtype)
    M, D = grad.shape
    ex = torch.exp(log_scale.to(acc))
    d_y = (ex * grad.to(acc)).to(dtype) if need_y else grad.new_empty(0)
    d_s = tree_sum((grad.to(acc) * out.to(acc)).reshape(-1)).reshape(1) if need_s else log_scale.new_empty(0)
    d_h = grad.new_empty((M, D) if need_h else (0,))
    d_p = torch.zeros(prompts.shape if need_p else (0,), dtype=acc, device=grad.device)
    d_kt = torch.zeros(kt.shape if need_kt else (0,), dtype=acc, device=grad.device)
    if need_h or need_p or need_kt:
        for r0 in range(0, M, CHUNK):
            h, g = hidden[r0:r0 + CHUNK], grad[r0:r0 + CHUNK]
            s, a = _activation(h, kt, seed, dropout, r0)
            de = (ex * w[r0:r0 + CHUNK, None] * g.to(acc)).to(dtype)
            ds = torch.where(s > 0, de @ prompts.t(), torch.zeros_like(s))
            if dropout > 0:
                ds = torch.where(a > 0, ds * (1.0 / (1.0 - dropout)), torch.zeros_like(ds))
            if need_h:
                d_h[r0:r0 + CHUNK] = ds @ kt
            if need_kt:
                d_kt += row_blocks_product(ds, h)
            if need_p:
                d_p += row_blocks_product(a, de)
    return d_h, d_y, d_p.to(dtype), d_kt.to(dtype), d_s.to(log_scale.dtype)
