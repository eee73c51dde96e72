"""Gated fusion's backward composed from two primitives, for the backends that have a row pass and a dW GEMM
rather than one fused call (plain PyTorch and Triton): shared here so that no backend imports another."""
import torch


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
