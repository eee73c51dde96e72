"""Gated fusion in plain PyTorch: the same primitives as the compiled kernels, fp32 accumulation.

    out = mu s + (1 - mu) (X W^T + b);  diff = s - Z;  backward rows: mu G, sum_rows G, sum_rows G diff;
    dW: (1 - mu) G^T X (the float8 tap dequantised 8192 rows at a time, never as a whole copy).
`compose_backward` builds the whole backward from a backend's row pass and dW GEMM (this one's and
Triton's); the C++ backend has it as one kernel.
"""

import torch

from ..._common import acc_dtype

QUANT_ROWS = 8192  # rows (de)quantised at a time: bounds the fp32 scratch of the float8 tap


def forward(side, tap, weight, bias, mu, save_diff):
    z = (tap @ weight.t()).to(mu.dtype)
    if bias is not None:
        z = z + bias.to(mu.dtype)
    s = side.to(mu.dtype)
    out = (mu * s + (1 - mu) * z).to(side.dtype)
    diff = (s - z).to(side.dtype) if save_diff else side.new_empty(0)
    return out, diff


def grad_rows(grad, diff, mu, need_side):
    g = grad.to(mu.dtype)
    d_side = (mu * g).to(grad.dtype) if need_side else grad.new_empty(0, grad.shape[1])
    col_gd = (g * diff.to(mu.dtype)).sum(0) if diff is not None else mu.new_empty(0)
    return d_side, g.sum(0), col_gd


def grad_weight(grad, tap, tap_scale, row_scale=None, out_dtype=None):
    acc = acc_dtype(grad.dtype)
    if tap_scale is None:
        dw = (grad.t() @ tap).to(acc)
    else:
        dw = grad.new_zeros(grad.shape[1], tap.shape[1], dtype=acc)
        for r in range(0, tap.shape[0], QUANT_ROWS):
            g = grad[r:r + QUANT_ROWS].to(acc) * tap_scale[r:r + QUANT_ROWS, None]
            dw.addmm_(g.t(), tap[r:r + QUANT_ROWS].to(acc))
    return finish_weight(dw, row_scale, out_dtype)


def finish_weight(dw, row_scale, out_dtype):
    """row_scale[:, None] dW in out_dtype: the step Triton fuses into its fold kernel."""
    if row_scale is not None:
        dw = dw * row_scale[:, None]
    return dw.to(out_dtype) if out_dtype is not None else dw


def compose_backward(grad_rows, grad_weight):
    """The interface's backward from the two primitives: ds = mu G, db = (1 - mu) sum_rows G,
    dalpha = sum_rows(G (s - Z)) mu (1 - mu) / T (one element for a scalar gate), dW = (1 - mu) G^T X,
    dX = G ((1 - mu) W)."""

    def backward(grad, diff, tap, tap_scale, weight, mu, temperature, scalar_gate, need_side, need_tap,
                 need_weight, need_bias, need_gate):
        d_side, d_tap, d_weight, d_bias = (grad.new_empty(0) for _ in range(4))  # distinct: no aliasing
        d_gate = mu.new_empty(0)
        one_minus_mu = 1 - mu
        if need_side or need_bias or need_gate:
            rows_side, col_g, col_gd = grad_rows(grad, diff if need_gate else None, mu, need_side)
            if need_side:
                d_side = rows_side
            if need_bias:
                d_bias = (one_minus_mu * col_g).to(grad.dtype)
            if need_gate:
                d_gate = col_gd * mu * one_minus_mu
                if 1.0 / temperature <= torch.finfo(d_gate.dtype).max:
                    d_gate = d_gate * (1.0 / temperature)
                    d_gate = d_gate.sum().reshape(1) if scalar_gate else d_gate
                else:  # a tiny T: summed, then divided in float64: a zero stays 0 (0 * inf is NaN), no inf - inf
                    wide = d_gate.double()
                    d_gate = ((wide.sum().reshape(1) if scalar_gate else wide) / temperature).to(d_gate.dtype)
        if need_weight:
            d_weight = grad_weight(grad, tap, tap_scale, row_scale=one_minus_mu, out_dtype=grad.dtype)
        if need_tap:
            d_tap = grad @ (one_minus_mu[:, None] * weight.to(mu.dtype)).to(grad.dtype)
        return d_side, d_tap, d_weight, d_bias, d_gate

    return backward


backward = compose_backward(grad_rows, grad_weight)
