"""Gated fusion in plain PyTorch: the same primitives as the compiled kernels, fp32 accumulation.

    out = mu s + (1 - mu) (X W^T + b);  diff = s - Z;  backward rows: mu G, sum_rows G, sum_rows G diff;
    dW: (1 - mu) G^T X (the float8 tap dequantised 8192 rows at a time, never as a whole copy).
The backward is ladder_kernels/backends/_compose.py's composition of this module's row pass and dW GEMM
(Triton composes its own the same way); the C++ backend has it as one kernel.
"""

from ..._common import acc_dtype
from .._compose import compose_backward

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


backward = compose_backward(grad_rows, grad_weight)
