"""lk.assemble_prompts: RLP low-rank prompts written into every sequence (docs/design.md, section 2).

    P    = base + scale * dropout(A B)          base: (n, D) or (C, n, D); A: (n, r) or (C, n, r); B: (r, D)
    E[c] = concat(prefix[c], P[c], suffix[c]) (+ pos)   prefix: (C, a, D), suffix: (C, L-a-n, D), pos: (L, D)

One op serves the text layout (C classes x 77 tokens) and the vision layout (batch x [CLS, prompts,
patches]). The compiled forwards build E in one pass over memory: A B, the expanded P and the
concatenation never exist as tensors of their own.

Dropout acts on the low-rank product Q = A B only. Its mask is the flat stream of ladder_kernels/_dropout.py,
a hash of (seed, flat index of the element in Q), so the backward regenerates it instead of storing it, and every
backend (C++, CUDA, PyTorch) draws the same mask for the same seed. The seed is drawn from the generator of
the tensors' device in `assemble_prompts` (as APT's is) and crosses the op boundary as a one-element int64
tensor on that device: a tensor, so torch.compile(fullgraph=True) keeps the draw in its graph (a new mask
per call) with no .item(); on the device, so the CUDA kernel reads it from memory (no sync) and a captured
CUDA graph replays the draw itself, a new mask per replay (a CPU seed read by value at capture would
replay one mask forever). The backward regenerates the mask from the same tensor, never through int().

Backward, with G = dL/dE and Q's gradient dQ = scale * keep * (the part of G at the prompt rows):
    d_prefix = G[:, :a],  d_suffix = G[:, a+n:],  d_pos = sum_c G[c]
    d_base   = sum_c G[c, a:a+n]   (G[:, a:a+n] when base is per class)
    dA = dQ B^T,  dB = sum_c A[c]^T dQ[c]
Sums over classes are the backends' deterministic `reduce_classes` (no atomics), and each gradient is
computed only when its input requires it. Only A and B are saved for backward (parameters, alive anyway).

Kernels: backends/<backend>/assemble_prompts.py (`forward`, `reduce_classes`; see backends/interface.py).
"""
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import _dispatch, _dropout, _validate
from .._common import acc_dtype, cast
from . import _autograd

OP = "assemble_prompts"
_MAX_INDEX = 2 ** 32  # the mask is indexed by a uint32 counter
dropout_keep = _dropout.flat_keep  # the mask of a seed, for tests and users who replay it


def _keep_multiplier(shape, seed, p, device, dtype) -> Tensor:
    return _dropout.flat_keep(shape, seed, p, device).to(dtype) * (1.0 / (1.0 - p))


def _forward(prefix: Tensor, suffix: Tensor, base: Tensor, lowrank_a: Optional[Tensor],
             lowrank_b: Optional[Tensor], pos: Optional[Tensor], scale: float, dropout: float,
             seed: Tensor, backend: str) -> Tensor:
    return _dispatch.kernels(OP, backend).forward(prefix, suffix, base, lowrank_a, lowrank_b, pos, scale,
                                                  dropout, seed)


def _gradients(grad: Tensor, lowrank_a: Optional[Tensor], lowrank_b: Optional[Tensor], prefix_len: int, n: int,
               base_per_class: bool, scale: float, dropout: float, seed: Tensor, need_prefix: bool,
               need_suffix: bool, need_base: bool, need_a: bool, need_b: bool, need_pos: bool, backend: str) -> list:
    """[d_prefix, d_suffix, d_base, d_a, d_b, d_pos], None where not needed (the eager path's backward)."""
    kernels = _dispatch.kernels(OP, backend)  # its reduce_classes takes any strides (a sum's grad is expanded)
    dtype, acc = grad.dtype, acc_dtype(grad.dtype)
    a, (_, length, d) = prefix_len, grad.shape
    outs = [None] * 6
    if need_prefix:
        outs[0] = grad[:, :a].clone()
    if need_suffix:
        outs[1] = grad[:, a + n:].clone()
    need_lowrank = need_a or need_b
    a_per_class = lowrank_a is not None and lowrank_a.dim() == 3
    # The prompt rows' gradient summed over classes, when a shared tensor needs it; from d_pos if it exists.
    d_pos = kernels.reduce_classes(grad, 0, length) if need_pos else None
    if d_pos is not None:
        outs[5] = d_pos.to(dtype)
    want_sum = (need_base and not base_per_class) or (need_lowrank and not a_per_class)
    dp_sum = None
    if want_sum:
        dp_sum = d_pos[a:a + n] if d_pos is not None else kernels.reduce_classes(grad, a, a + n)
    if need_base:
        outs[2] = grad[:, a:a + n].clone() if base_per_class else dp_sum.to(dtype, copy=True)
    if need_lowrank:
        # Few torch calls (each costs as much as this maths at a prompt's size): no cast of a tensor
        # already in the accumulation dtype, no reshape of a shared (2-D) factor.
        dq = (grad[:, a:a + n].to(acc) if a_per_class else dp_sum) * scale
        if dropout > 0:
            dq = dq * _keep_multiplier(dq.shape, seed, dropout, dq.device, acc)
        a_acc = cast(lowrank_a, acc)
        b_acc = cast(lowrank_b, acc)
        if need_a:  # dQ B^T, as F.linear: no transposed view
            outs[3] = cast(F.linear(dq, b_acc), dtype)
        if need_b:  # sum_c A[c]^T dQ[c]: one GEMM over the stacked classes
            if a_per_class:  # explicit row count: reshape(-1, 0) fails when r = 0
                a_acc, dq = a_acc.reshape(_validate.rows(a_acc), a_acc.shape[-1]), dq.reshape(-1, d)
            outs[4] = cast(a_acc.t() @ dq, dtype)
    return outs


def _backward_body(grad: Tensor, lowrank_a: Optional[Tensor], lowrank_b: Optional[Tensor], prefix_len: int, n: int,
                   base_per_class: bool, scale: float, dropout: float, seed: Tensor, need_prefix: bool,
                   need_suffix: bool, need_base: bool, need_a: bool, need_b: bool, need_pos: bool, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The custom op's (torch.compile's) backward: tensors only, a fresh empty one where not needed
    (outputs may not alias)."""
    outs = _gradients(grad, lowrank_a, lowrank_b, prefix_len, n, base_per_class, scale, dropout, seed,
                      need_prefix, need_suffix, need_base, need_a, need_b, need_pos, backend)
    return tuple(grad.new_empty(0) if g is None else g for g in outs)



_backward_op = torch.library.custom_op("ladder_kernels::assemble_prompts_core_backward", _backward_body,
                                       mutates_args=())


@_backward_op.register_fake
def _(grad, lowrank_a, lowrank_b, prefix_len, n, base_per_class, scale, dropout, seed,
      need_prefix, need_suffix, need_base, need_a, need_b, need_pos, backend):
    c, length, d = grad.shape
    e = grad.new_empty(0)
    return (grad.new_empty(c, prefix_len, d) if need_prefix else e,
            grad.new_empty(c, length - prefix_len - n, d) if need_suffix else grad.new_empty(0),
            grad.new_empty(*((c,) if base_per_class else ()), n, d) if need_base else grad.new_empty(0),
            grad.new_empty(lowrank_a.shape) if need_a else grad.new_empty(0),
            grad.new_empty(lowrank_b.shape) if need_b else grad.new_empty(0),
            grad.new_empty(length, d) if need_pos else grad.new_empty(0))


def _setup_context(ctx, inputs, output):
    prefix, suffix, base, lowrank_a, lowrank_b, pos, scale, dropout, seed, backend = inputs
    need = ctx.needs_input_grad
    lowrank = need[3] or need[4]
    ctx.prefix_len, ctx.n, ctx.base_per_class = prefix.shape[1], base.shape[-2], base.dim() == 3
    ctx.scale, ctx.dropout, ctx.backend = scale, dropout, backend
    ctx.a_shape = None if lowrank_a is None else lowrank_a.shape
    # Nothing the size of E: only the low-rank factors, and only when they are trained (and the 8-byte
    # seed, when dropout regenerates its mask).
    ctx.save_for_backward(lowrank_a if lowrank else None, lowrank_b if lowrank else None,
                          seed if lowrank and dropout > 0 else None)


def _backward(ctx, grad_out):
    lowrank_a, lowrank_b, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    eager = _autograd.eager(ctx)
    if seed is None:  # no dropout in the backward: any seed does (a fresh one where a graph is traced)
        seed, dropout = _dropout.no_seed() if eager else torch.zeros(1, dtype=torch.int64), 0.0
    else:
        dropout = ctx.dropout
    body = _gradients if eager else _backward_op
    grads = _autograd.once_differentiable(OP, ctx.backend, lambda: body(
        grad_out, lowrank_a, lowrank_b, ctx.prefix_len, ctx.n, ctx.base_per_class, ctx.scale, dropout,
        seed, need[0], need[1], need[2], need[3], need[4], need[5], ctx.backend))
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None, None, None, None)


def _composite(prefix, suffix, base, lowrank_a, lowrank_b, pos, scale, dropout, seed, backend):
    """E in plain PyTorch, for forward-mode AD and torch.func (ops/_autograd.py): the torch backend's
    maths, with the kernels' dropout mask. The seed stays a tensor: under vmap(randomness="different") it
    is batched, one mask per sample."""
    acc = acc_dtype(prefix.dtype)
    prompt = base.to(acc)
    if lowrank_a is not None:
        q = lowrank_a.to(acc) @ lowrank_b.to(acc)
        if dropout > 0:
            q = q * _keep_multiplier(q.shape, seed, dropout, q.device, acc)
        prompt = prompt + scale * q
    c, n, d = prefix.shape[0], prompt.shape[-2], prompt.shape[-1]
    out = torch.cat((prefix.to(acc), prompt.expand(c, n, d), suffix.to(acc)), dim=1)
    return (out if pos is None else out + pos.to(acc)).to(prefix.dtype)


_op, _apply = _autograd.register("ladder_kernels::assemble_prompts_core", _forward, _setup_context, _backward,
                                 _composite)


@_op.register_fake
def _(prefix, suffix, base, lowrank_a, lowrank_b, pos, scale, dropout, seed, backend):
    return prefix.new_empty(prefix.shape[0], prefix.shape[1] + base.shape[-2] + suffix.shape[1], prefix.shape[2])


def _check_number(name: str, value, low: float, high: float, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{OP}: argument '{name}' must be a float, got {type(value).__name__}")
    ok = low <= value < high if high_open else low <= value <= high
    ok = ok and abs(value) != float("inf")
    if not ok:
        raise ValueError(f"{OP}: argument '{name}' must be in [{low}, {high}{')' if high_open else ']'}, got {value}")
    return float(value)


def assemble_prompts(prefix: Tensor, suffix: Tensor, base: Tensor, lowrank_a: Optional[Tensor] = None,
                     lowrank_b: Optional[Tensor] = None, scale: float = 1.0, pos: Optional[Tensor] = None,
                     dropout: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """Write the prompt P = base + scale * dropout(A B) between prefix and suffix of every sequence.

    E[c] = concat(prefix[c], P[c], suffix[c]) (+ pos)

    Args:
        prefix: (C, a, D) tokens before the prompt (text: the start token; vision: the class token).
        suffix: (C, s, D) tokens after it (text: class name, end token, padding; vision: patch tokens).
        base: (n, D) shared or (C, n, D) class-specific frozen prompt init P0.
        lowrank_a: (n, r) or (C, n, r);  lowrank_b: (r, D). Both or neither.
        scale: multiplies the low-rank term.
        pos: (L, D) positional embedding added to every sequence, L = a + n + s; or None.
        dropout: probability of zeroing an element of A B (training only; the caller turns it off in eval).
        backend: "cuda", "cpu", "torch" or None (automatic, see lk.backends()).
    Returns: (C, L, D) in prefix's dtype.
    """
    _validate.tensor(OP, "prefix", prefix, dims=(3,))
    _validate.tensor(OP, "suffix", suffix, dims=(3,))
    _validate.tensor(OP, "base", base, dims=(2, 3))
    c, a, d = prefix.shape
    n = base.shape[-2]
    _validate.shape(OP, "suffix", suffix, (c, None, d), "prefix's classes and width")
    if base.dim() == 3:
        _validate.shape(OP, "base", base, (c, None, d), "prefix's classes and width")
    else:
        _validate.shape(OP, "base", base, (None, d), "prefix's width")
    if (lowrank_a is None) != (lowrank_b is None):
        missing = "lowrank_b" if lowrank_b is None else "lowrank_a"
        raise ValueError(f"{OP}: argument '{missing}' must be given with the other low-rank factor, got None")
    if lowrank_a is not None:
        _validate.tensor(OP, "lowrank_a", lowrank_a, dims=(2, 3))
        _validate.tensor(OP, "lowrank_b", lowrank_b, dims=(2,))
        r = lowrank_b.shape[0]
        _validate.shape(OP, "lowrank_b", lowrank_b, (None, d), "prefix's width")
        lead = (c,) if lowrank_a.dim() == 3 else ()
        _validate.shape(OP, "lowrank_a", lowrank_a, (*lead, n, r), "base's prompt length, lowrank_b.shape[0]")
        if lowrank_a.numel() >= _MAX_INDEX or n * d * (c if lowrank_a.dim() == 3 else 1) >= _MAX_INDEX:
            raise ValueError(f"{OP}: argument 'lowrank_a' gives a low-rank product of 2^32 or more elements")
    length = a + n + suffix.shape[1]
    if pos is not None:
        _validate.tensor(OP, "pos", pos, dims=(2,))
        _validate.shape(OP, "pos", pos, (length, d), "L = prefix + prompt + suffix tokens, width")
    _validate.same_dtype(OP, "prefix", prefix, suffix=suffix, base=base, lowrank_a=lowrank_a,
                         lowrank_b=lowrank_b, pos=pos)
    _validate.same_device(OP, "prefix", prefix, suffix=suffix, base=base, lowrank_a=lowrank_a,
                          lowrank_b=lowrank_b, pos=pos)
    scale = _check_number("scale", scale, float("-inf"), float("inf"), True)
    dropout = _check_number("dropout", dropout, 0.0, 1.0, True)
    chosen = _dispatch.resolve(OP, prefix.device, backend, prefix.dtype)
    if dropout > 0 and lowrank_a is not None:
        # on the tensors' device: graph-safe (see the module docstring)
        seed = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64, device=prefix.device)
    else:
        seed, dropout = _dropout.no_seed(prefix.device), 0.0
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (prefix, suffix, base, lowrank_a, lowrank_b, pos))
    return _apply(needs_grad, prefix, suffix, base, lowrank_a, lowrank_b, pos, scale, dropout, seed, chosen)
