"""lk.gated_fusion: the ladder's gated fusion (docs/design.md, section 1).

    Z   = X W^T + b               X: (M, D) detached backbone tap, W: (d, D), b: (d,)
    mu  = sigmoid(alpha / T)      alpha ("gate"): scalar or (d,);  mu: the weight of the side state
    out = mu * s + (1 - mu) * Z   s: (M, d) side state

The core op takes alpha and T and forms mu itself (d numbers, in the accumulation dtype), so the call
builds no autograd nodes for it; the kernels see mu as a (d,) vector and only do the blend. Backward,
with G = dL/dout:  ds = mu G;  dmu = sum_rows G (s - Z);  dalpha = dmu mu (1 - mu) / T (summed for a
scalar alpha);  db = (1 - mu) sum_rows G;  dW = (1 - mu) G^T X;  dX = ((1 - mu) G) W, the last only
when the tap requires grad.

What is kept for backward is the point of the op:
- s - Z (M, d), only when the gate is trainable;
- the tap X, only when W is trainable, optionally as float8 with one fp32 scale per row (`tap_dtype`);
- W itself only when the tap requires grad (it is a parameter, alive anyway).
Nothing the size of the tap is kept when W is frozen. Kernels: backends/<backend>/gated_fusion.py.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _validate
from .._common import acc_dtype, cast
from . import _autograd

OP = "gated_fusion"
_FP8 = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
_FP8_DTYPE = {v: k for k, v in _FP8.items()}
_QUANT_ROWS = 8192  # rows quantised at a time: bounds the fp32 scratch of the float8 tap copy


def _quantize_rows(tap: Tensor, fp8: str):
    """A float8 copy of the tap with one fp32 scale per row: tap ~= q * scale[:, None]."""
    dtype = _FP8_DTYPE[fp8]
    q = torch.empty(tap.shape, dtype=dtype, device=tap.device)
    scale = torch.empty(tap.shape[0], dtype=torch.float32, device=tap.device)
    for r in range(0, tap.shape[0], _QUANT_ROWS):
        x = tap[r:r + _QUANT_ROWS].float()
        amax = x.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))
        scale[r:r + _QUANT_ROWS] = s
        q[r:r + _QUANT_ROWS] = (x / s[:, None]).to(dtype)
    return q, scale


def _mu(gate: Tensor, temperature: float, d: int, dtype: torch.dtype) -> Tensor:
    """mu = sigmoid(alpha / T) as a contiguous (d,) vector in the accumulation dtype, in two torch calls
    (at small sizes each call costs as much as the maths): the product of an expanded gate is contiguous."""
    acc = acc_dtype(dtype)
    g = cast(gate, acc)
    if g.shape != (d,):
        g = g.reshape(1).expand(d)
    inv_t = 1.0 / temperature
    if inv_t > torch.finfo(acc).max:  # gate 0 times an infinite 1 / T is NaN; in float64 0 / T is 0
        return g.double().div(temperature).sigmoid_().to(acc)
    return torch.mul(g, inv_t).sigmoid_()


def _forward(side: Tensor, tap: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor,
             temperature: float, save_diff: bool, keep_tap: bool, tap_fp8: str, backend: str
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, s - Z or empty, the float8 tap's bytes or empty, its row scales or empty, mu (d,))."""
    kernels = _dispatch.kernels(OP, backend)
    # mu formed inside the backend's forward kernel where it can (Triton: None where it cannot)
    fused = kernels.forward_gate(side, tap, weight, bias, gate, temperature, save_diff) \
        if hasattr(kernels, "forward_gate") else None
    if fused is not None:
        out, diff, mu = fused
    else:
        mu = _mu(gate, temperature, weight.shape[0], side.dtype)
        out, diff = kernels.forward(side, tap, weight, bias, mu, save_diff)
    if keep_tap and tap_fp8:
        tap_q, tap_scale = _quantize_rows(tap, tap_fp8)
        # float8 crosses the op boundary as its bytes: opcheck's schema check does arithmetic on
        # outputs, which CPU float8 lacks. setup_context views the bytes as float8 again (no copy).
        tap_q = tap_q.view(torch.uint8)
    else:
        tap_q, tap_scale = tap.new_empty(0), mu.new_empty(0)
    return out, diff, tap_q, tap_scale, mu


def _backward_body(grad: Tensor, diff: Optional[Tensor], tap: Optional[Tensor], tap_scale: Optional[Tensor],
                   weight: Optional[Tensor], mu: Tensor, temperature: float, scalar_gate: bool, need_side: bool,
                   need_tap: bool, need_weight: bool, need_bias: bool, need_gate: bool, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d_side, d_tap, d_weight, d_bias, d_gate): the backend's backward, one call; unneeded ones empty."""
    return tuple(_dispatch.kernels(OP, backend).backward(
        grad.contiguous(), diff, tap, tap_scale, weight, mu, temperature, scalar_gate, need_side, need_tap,
        need_weight, need_bias, need_gate))


_backward_op = torch.library.custom_op("ladder_kernels::gated_fusion_core_backward", _backward_body,
                                       mutates_args=())


@_backward_op.register_fake
def _(grad, diff, tap, tap_scale, weight, mu, temperature, scalar_gate, need_side, need_tap, need_weight,
      need_bias, need_gate, backend):
    m, d = grad.shape
    return (grad.new_empty(m, d) if need_side else grad.new_empty(0),
            grad.new_empty(m, weight.shape[1]) if need_tap else grad.new_empty(0),
            grad.new_empty(d, tap.shape[1]) if need_weight else grad.new_empty(0),
            grad.new_empty(d) if need_bias else grad.new_empty(0),
            mu.new_empty(1 if scalar_gate else d) if need_gate else mu.new_empty(0))


def _setup_context(ctx, inputs, output):
    side, tap, weight, bias, gate, temperature, save_diff, keep_tap, tap_fp8, backend = inputs
    _, diff, tap_q, tap_scale, mu = output
    # The flags say what the forward precomputed, autograd's needs say what must be kept. Through
    # gated_fusion() they agree; a direct caller whose flags say less still gets correct gradients,
    # at the cost of keeping side, tap and bias to recompute s - Z.
    need_weight, need_mu = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
    kept, kept_scale = None, None
    if need_weight:
        quantized = keep_tap and bool(tap_fp8)
        kept, kept_scale = (tap_q.view(_FP8_DTYPE[tap_fp8]), tap_scale) if quantized else (tap, None)
    rec = ctx.recompute = need_mu and not save_diff
    ctx.backend, ctx.temperature = backend, temperature
    # The aux outputs (s - Z, the float8 tap) never get gradients: don't let autograd fill (M, d) zeros.
    ctx.set_materialize_grads(False)
    ctx.scalar_gate = gate.numel() == 1
    ctx.save_for_backward(diff if need_mu and save_diff else None, kept, kept_scale,
                          weight if tap.requires_grad or rec else None, gate, mu,
                          side if rec else None, tap if rec else None, bias if rec else None)


def _backward(ctx, grad_out, _grad_diff, _grad_tap_q, _grad_scale, _grad_mu):
    diff, tap, tap_scale, weight, gate, mu, side, raw_tap, bias = ctx.saved_tensors
    if grad_out is None:  # the output was not used
        return (None,) * 10
    need = ctx.needs_input_grad
    body, forward = (_backward_body, _forward) if _autograd.eager(ctx) else (_backward_op, _op)

    def compute():
        nonlocal diff
        if ctx.recompute:
            diff = forward(side, raw_tap, weight, bias, gate, ctx.temperature, True, False, "", ctx.backend)[1]
        grads = body(grad_out, diff, tap, tap_scale, weight, mu, ctx.temperature, ctx.scalar_gate, need[0],
                     need[1], need[2], need[3], need[4], ctx.backend)
        if not need[4]:
            return grads
        d_gate = grads[4]  # (1,) or (d,) in the accumulation dtype: the gate's own shape and dtype
        if d_gate.shape != gate.shape:
            d_gate = d_gate.reshape(gate.shape)
        return grads[:4] + (cast(d_gate, gate.dtype),)

    grads = _autograd.once_differentiable(OP, ctx.backend, compute)
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None,) * 5


def _composite(side, tap, weight, bias, gate, temperature, *_):
    """The output in plain PyTorch, for forward-mode AD and torch.func (ops/_autograd.py): the torch
    backend's forward, whose every step autograd differentiates. Float8 taps change only what the
    kernels keep for dW, so here dW is exact."""
    mu = _mu(gate, temperature, weight.shape[0], side.dtype)  # the kernels' own mu, stable for a tiny T
    return _dispatch.kernels(OP, "torch").forward(side, tap, weight, bias, mu, False)[0]


_op, _apply = _autograd.register("ladder_kernels::gated_fusion_core", _forward, _setup_context, _backward,
                                 _composite)


@_op.register_fake
def _(side, tap, weight, bias, gate, temperature, save_diff, keep_tap, tap_fp8, backend):
    m, d = side.shape
    diff = side.new_empty(m, d) if save_diff else side.new_empty(0)
    mu = side.new_empty(weight.shape[0], dtype=acc_dtype(side.dtype))
    if keep_tap and tap_fp8:
        return side.new_empty(m, d), diff, tap.new_empty(tap.shape, dtype=torch.uint8), \
            side.new_empty(m, dtype=torch.float32), mu
    return side.new_empty(m, d), diff, tap.new_empty(0), mu.new_empty(0), mu


def _gate_logits(gate, side: Tensor, d: int) -> Tensor:
    if isinstance(gate, Tensor):
        _validate.tensor(OP, "gate", gate)
        _validate.same_device(OP, "side", side, gate=gate)
        if gate.numel() != 1:
            _validate.shape(OP, "gate", gate, (d,), "a scalar or one alpha per side channel")
        return gate
    if isinstance(gate, (int, float)) and not isinstance(gate, bool):
        return torch.full((1,), float(gate), dtype=acc_dtype(side.dtype), device=side.device)
    raise TypeError(f"{OP}: argument 'gate' must be a float or a tensor, got {type(gate).__name__}")


def gated_fusion(side: Tensor, tap: Tensor, weight: Tensor, bias: Optional[Tensor] = None, gate=0.0,
                 temperature: float = 0.1, tap_dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None) -> Tensor:
    """Blend the side state with a down-projection of the backbone tap through a sigmoid gate.

    out = mu * side + (1 - mu) * (tap @ weight.T + bias),  mu = sigmoid(gate / temperature)

    Args:
        side: (..., d) side-network state.
        tap: (..., D) backbone activation with the same leading dims (detach it: the ladder never
            back-propagates into the backbone).
        weight: (d, D) down-projection;  bias: (d,) or None.
        gate: the gate's logit alpha: a float, a 1-element tensor, or a (d,) tensor (one per channel);
            mu = sigmoid(alpha / T) is the weight of the side state.
        temperature: T > 0 (LST uses 0.1).
        tap_dtype: torch.float8_e4m3fn or torch.float8_e5m2 to keep the tap for dW as float8 with one
            scale per row when the weight is trainable; None keeps it as is.
        backend: "triton", "cpu", "torch" or None (automatic, see lk.backends()).
    Returns: (..., d), in side's dtype. Double backward is not supported.
    """
    _validate.tensor(OP, "side", side, min_dims=1)
    _validate.tensor(OP, "tap", tap, min_dims=1)
    _validate.tensor(OP, "weight", weight, dims=(2,))
    if bias is not None:
        _validate.tensor(OP, "bias", bias)
    d, big_d = weight.shape
    _validate.shape(OP, "side", side, (*tap.shape[:-1], d), "tap's leading dims, weight.shape[0]")
    _validate.shape(OP, "tap", tap, (*side.shape[:-1], big_d), "side's leading dims, weight.shape[1]")
    _validate.same_dtype(OP, "side", side, tap=tap, weight=weight, bias=bias)
    _validate.same_device(OP, "side", side, tap=tap, weight=weight, bias=bias)
    if bias is not None:
        _validate.shape(OP, "bias", bias, (d,), "weight.shape[0]")
    temperature = _validate.positive_float(OP, "temperature", temperature)
    if tap_dtype is not None and tap_dtype not in _FP8:
        raise TypeError(f"{OP}: argument 'tap_dtype' must be None, torch.float8_e4m3fn or "
                        f"torch.float8_e5m2, got {tap_dtype}")
    alpha = _gate_logits(gate, side, d)
    chosen = _dispatch.resolve(OP, side.device, backend, side.dtype)
    rows = _validate.rows(side)
    if rows == 0 or d == 0 or big_d == 0:
        chosen = "torch"  # nothing for a kernel to do: the plain path handles empty extents natively

    grad_on = torch.is_grad_enabled()
    keep_tap = grad_on and weight.requires_grad
    tap_fp8 = _FP8[tap_dtype] if (keep_tap and tap_dtype is not None) else ""
    gate_trains = grad_on and alpha.requires_grad
    needs_grad = grad_on and (side.requires_grad or tap.requires_grad or keep_tap or gate_trains
                              or (bias is not None and bias.requires_grad))
    flat = side.dim() != 2  # a view costs an autograd node per call: only when there are leading dims
    out = _apply(needs_grad, side.reshape(rows, d) if flat else side, tap.reshape(rows, big_d) if flat else tap,
                 weight, bias, alpha, temperature, gate_trains, keep_tap, tap_fp8, chosen)
    return out.reshape(side.shape) if flat else out
