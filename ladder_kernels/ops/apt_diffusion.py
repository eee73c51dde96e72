"""lk.apt_diffusion: APT's approximated prompt attention (docs/design.md, section 3).

    Kt  = P + (P W1^T) W2^T          P: (p, D) prompts, W1: (r, D), W2: (D, r)
    A   = dropout(relu(H Kt^T))      H: (M, D) attention input (after its LayerNorm)
    w   = stopgrad(row max of A)     (M,), taken after dropout, as APT's code does
    out = exp(s) (Y + w (A P))       Y: (M, D) attention output, s: scalar log-scale

Kt is (p, D) and cheap, so it is formed here in plain PyTorch and autograd carries dKt on to P, W1, W2.
The core op takes H, Y, P, Kt, s and returns out and w. Its backward, with G = dL/dout:
dY = exp(s) G;  ds = sum(G out);  dE = exp(s) w G;  dS = (dE P^T) [S > 0] * keep / (1 - dropout);
dH = dS Kt;  dKt = dS^T H;  dP_direct = A^T dE.  No gradient flows through w.

Memory: nothing of size (M, p) is saved or written by the forward. Backward keeps H (the caller holds it
anyway), `out` only if s is trainable, w (M floats), P and Kt, and recomputes A from H and Kt.
Dropout is the row-col stream of ladder_kernels/_dropout.py, seeded per call from torch's generator, so
the backward (and every backend) regenerates exactly the forward's mask. Kernels:
backends/<backend>/apt_diffusion.py.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import _dispatch, _dropout, _validate
from .._common import acc_dtype, cast
from . import _autograd

OP = "apt_diffusion"
dropout_keep = _dropout.row_col_keep  # the mask of a seed, for tests and users who replay it


def _forward(hidden: Tensor, attn_out: Tensor, prompts: Tensor, kt: Tensor, log_scale: Tensor,
             seed: Tensor, dropout: float, backend: str) -> tuple[Tensor, Tensor]:
    """(out, w): out = exp(s) (Y + w (A P)), w = row max of A in the accumulation dtype."""
    return tuple(_dispatch.kernels(OP, backend).forward(hidden, attn_out, prompts, kt, log_scale, seed, dropout))


def _backward_body(grad: Tensor, hidden: Optional[Tensor], out: Optional[Tensor], prompts: Tensor,
                   kt: Tensor, log_scale: Tensor, w: Optional[Tensor], seed: Tensor, dropout: float,
                   need_h: bool, need_y: bool, need_p: bool, need_kt: bool, need_s: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dH, dY, dP_direct, dKt, ds); a gradient that is not needed comes back empty."""
    grads = _dispatch.kernels(OP, backend).backward(grad.contiguous(), hidden, out, prompts, kt, log_scale, w,
                                                    seed, dropout, need_h, need_y, need_p, need_kt, need_s)
    needed = (need_h, need_y, need_p, need_kt, need_s)
    return tuple(g if n else g.new_empty(0) for g, n in zip(grads, needed))  # fresh empties: outputs may not alias


_backward_op = torch.library.custom_op("ladder_kernels::apt_diffusion_core_backward", _backward_body,
                                       mutates_args=())


@_backward_op.register_fake
def _(grad, hidden, out, prompts, kt, log_scale, w, seed, dropout, need_h, need_y, need_p, need_kt,
      need_s, backend):
    return (grad.new_empty(grad.shape) if need_h else grad.new_empty(0),
            grad.new_empty(grad.shape) if need_y else grad.new_empty(0),
            prompts.new_empty(prompts.shape) if need_p else prompts.new_empty(0),
            kt.new_empty(kt.shape) if need_kt else kt.new_empty(0),
            log_scale.new_empty(1) if need_s else log_scale.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, _, prompts, kt, log_scale, seed, dropout, backend = inputs
    out, w = output
    need = ctx.needs_input_grad
    recompute = need[0] or need[2] or need[3]  # dH, dP and dKt all need A, recomputed from H and Kt
    ctx.dropout, ctx.backend = dropout, backend
    if not _autograd.eager(ctx):  # the eager path returns out alone; w stays on ctx
        ctx.mark_non_differentiable(w)
    ctx.save_for_backward(hidden if recompute else None, out if need[4] else None, prompts, kt, log_scale,
                          w if recompute else None, seed)


def _backward(ctx, grad_out, _grad_w):
    hidden, out, prompts, kt, log_scale, w, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    body = _backward_body if _autograd.eager(ctx) else _backward_op
    grads = _autograd.once_differentiable(OP, ctx.backend, lambda: body(
        grad_out, hidden, out, prompts, kt, log_scale, w, seed, ctx.dropout,
        need[0], need[1], need[2], need[3], need[4], ctx.backend))
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None, None, None)


def _composite(hidden, attn_out, prompts, kt, log_scale, seed, dropout, backend):
    """out in plain PyTorch, for forward-mode AD and torch.func (ops/_autograd.py). Not the torch
    backend's forward: that one writes row chunks into a preallocated output (no batching under vmap)
    and leaves w attached. The same dropout mask as the kernels; (M, p) is materialised here."""
    acc = acc_dtype(hidden.dtype)
    _, act = _dispatch.kernels(OP, "torch")._activation(hidden, kt, seed, dropout, 0)
    w = act.amax(-1, keepdim=True).detach().to(acc)  # APT's stop-gradient: no tangent, no gradient
    out = torch.exp(log_scale.to(acc)) * (attn_out.to(acc) + w * (act @ prompts).to(acc))
    return out.to(hidden.dtype)


_op, _apply = _autograd.register("ladder_kernels::apt_diffusion_core", _forward, _setup_context, _backward,
                                 _composite)


@_op.register_fake
def _(hidden, attn_out, prompts, kt, log_scale, seed, dropout, backend):
    return hidden.new_empty(hidden.shape), hidden.new_empty(hidden.shape[0], dtype=acc_dtype(hidden.dtype))


def _check_inputs(hidden, attn_out, prompts, w1, w2, log_scale, dropout) -> float:
    _validate.tensor(OP, "hidden", hidden, min_dims=1)
    _validate.tensor(OP, "attn_out", attn_out, min_dims=1)
    _validate.tensor(OP, "prompts", prompts, dims=(2,))
    _validate.tensor(OP, "w1", w1, dims=(2,))
    _validate.tensor(OP, "w2", w2, dims=(2,))
    big_d = hidden.shape[-1]
    _validate.shape(OP, "attn_out", attn_out, tuple(hidden.shape), "hidden's shape")
    _validate.shape(OP, "prompts", prompts, (None, big_d), "p prompts of hidden's width")
    if prompts.shape[0] < 1:
        raise ValueError(f"{OP}: argument 'prompts' must hold at least 1 prompt, got shape {tuple(prompts.shape)}")
    rank = w1.shape[0]
    _validate.shape(OP, "w1", w1, (rank, big_d), "rank, hidden's width")
    _validate.shape(OP, "w2", w2, (big_d, rank), "hidden's width, w1.shape[0]")
    _validate.same_dtype(OP, "hidden", hidden, attn_out=attn_out, prompts=prompts, w1=w1, w2=w2)
    if isinstance(log_scale, Tensor):
        _validate.tensor(OP, "log_scale", log_scale)
        if log_scale.numel() != 1:
            raise ValueError(f"{OP}: argument 'log_scale' must have one element, got shape {tuple(log_scale.shape)}")
    elif not isinstance(log_scale, (int, float)) or isinstance(log_scale, bool):
        raise TypeError(f"{OP}: argument 'log_scale' must be a float or a tensor, got {type(log_scale).__name__}")
    _validate.same_device(OP, "hidden", hidden, attn_out=attn_out, prompts=prompts, w1=w1, w2=w2,
                          log_scale=log_scale if isinstance(log_scale, Tensor) else None)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"{OP}: argument 'dropout' must be a float, got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{OP}: argument 'dropout' must be in [0, 1), got {dropout}")
    return float(dropout)


def apt_diffusion(hidden: Tensor, attn_out: Tensor, prompts: Tensor, w1: Tensor, w2: Tensor, log_scale,
                  dropout: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """APT's independent prompt diffusion beside ordinary attention.

    out = exp(s) * (Y + w * (A @ P)),  A = dropout(relu(H @ Kt.T)),  Kt = P + (P @ W1.T) @ W2.T,
    w = row max of A (after dropout), detached.

    Args:
        hidden: (..., D) H, the attention sub-layer's input (after its LayerNorm).
        attn_out: (..., D) Y, the ordinary attention output (after its projection), same shape as hidden.
        prompts: (p, D) P, p >= 1.   w1: (r, D).   w2: (D, r).
        log_scale: s, a float or a one-element tensor (any float dtype).
        dropout: probability in [0, 1) of dropping an activation of A (counter-based, seeded per call
            from torch's generator, regenerated identically in backward).
        backend: "triton", "cpu", "torch" or None (automatic, see lk.backends()).
    Returns: (..., D) in hidden's dtype. Double backward is not supported.
    """
    dropout = _check_inputs(hidden, attn_out, prompts, w1, w2, log_scale, dropout)
    chosen = _dispatch.resolve(OP, hidden.device, backend, hidden.dtype)
    big_d, rows = hidden.shape[-1], _validate.rows(hidden)
    if rows == 0 or big_d == 0:
        chosen = "torch"  # nothing for a kernel to do: the plain path handles empty extents natively
    acc = acc_dtype(hidden.dtype)
    if dropout > 0:
        seed = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64, device=hidden.device)
    else:
        seed = _dropout.no_seed(hidden.device)
    if isinstance(log_scale, Tensor):  # (1,) in the accumulation dtype, with no torch call that is not needed
        s = log_scale if log_scale.shape == (1,) else log_scale.reshape(1)
        s = cast(s, acc)
    else:
        s = torch.full((1,), float(log_scale), dtype=acc, device=hidden.device)
    kt = prompts + F.linear(F.linear(prompts, w1), w2)  # P + (P W1^T) W2^T, with no transposed views
    grad_on = torch.is_grad_enabled()
    needs_grad = grad_on and (hidden.requires_grad or attn_out.requires_grad or kt.requires_grad or s.requires_grad)
    flat = hidden.dim() != 2  # a view costs an autograd node per call: only when there are leading dims
    out = _apply(needs_grad, hidden.reshape(rows, big_d) if flat else hidden,
                 attn_out.reshape(rows, big_d) if flat else attn_out, prompts, kt, s, seed, dropout, chosen)
    return out.reshape(hidden.shape) if flat else out
