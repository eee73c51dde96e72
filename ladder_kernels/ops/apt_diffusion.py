"""lk.apt_diffusion: APT's approximated prompt attention (DESIGN.md section 3) as a torch.library custom op.

    Kt  = P + (P W1^T) W2^T          P: (p, D) prompts, W1: (r, D), W2: (D, r)
    A   = dropout(relu(H Kt^T))      H: (M, D) attention input (after its LayerNorm)
    w   = stopgrad(row max of relu(H Kt^T))      (M,), before dropout (issue 4's statement)
    out = exp(s) (Y + w (A P))       Y: (M, D) attention output, s: scalar log-scale

Kt is (p, D) and cheap, so it is formed here in plain PyTorch and autograd carries dKt on to P, W1, W2.
The custom op takes H, Y, P, Kt, s and returns out and w. Its backward, with G = dL/dout:
dY = exp(s) G;  ds = sum(G out);  dE = exp(s) w G;  dS = (dE P^T) [S > 0] * keep / (1 - dropout);
dH = dS Kt;  dKt = dS^T H;  dP_direct = A^T dE.  No gradient flows through w.

Memory: nothing of size (M, p) is saved or written by the forward. Backward keeps H (the caller holds it
anyway), `out` only if s is trainable, w (M floats), P and Kt, and recomputes A from H and Kt.

Dropout uses a counter-based stream: keep(m, j) = hash(seed, m, j) >= threshold, the same 32-bit hash in
every backend (see `dropout_keep`), with the seed drawn from torch's generator per call, so the backward
(and every backend) regenerates exactly the forward's mask.

Every backend implements two primitives, `forward` and `backward` (see _TorchKernels).
"""
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _validate

OP = "apt_diffusion"
_CHUNK = 4096  # rows per step of the plain PyTorch path: bounds its (rows, p) scratch

_dispatch.register_op(OP, ("triton", "cpp", "torch"), cpp_kernel="apt_diffusion_fwd")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_threshold(dropout: float) -> int:
    """An element is dropped when the top 24 bits of its hash are below this."""
    return min(1 << 24, int(dropout * (1 << 24) + 0.5))


_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2^32 on int64 without overflowing it: split c into 16-bit halves.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_keep(seed: Tensor, row0: int, rows: int, cols: int, dropout: float) -> Tensor:
    """(rows, cols) bool: which activations of rows row0.. survive dropout for this seed.

    h = fmix32(fmix32(row * 0x9E3779B1 ^ seed) ^ (col * 0x85EBCA77)), all mod 2^32;  keep = (h >> 8) >= t.
    """
    dev = seed.device
    r = (torch.arange(row0, row0 + rows, device=dev, dtype=torch.int64) & _M32)[:, None]
    c = torch.arange(cols, device=dev, dtype=torch.int64)[None, :]
    h = _fmix32(_fmix32(_mul32(r, 0x9E3779B1) ^ (seed.reshape(()) & _M32)) ^ _mul32(c, 0x85EBCA77))
    return (h >> 8) >= dropout_threshold(dropout)


def _draw_seed(device) -> Tensor:
    return torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64, device=device)


class _TorchKernels:
    """The plain PyTorch path: the same primitives as the compiled kernels, rows in chunks."""

    @staticmethod
    def _activation(h, kt, seed, dropout, row0):
        s = h @ kt.t()
        act = torch.relu(s)
        if dropout > 0:
            keep = dropout_keep(seed, row0, h.shape[0], kt.shape[0], dropout)
            return s, act, torch.where(keep, act * (1.0 / (1.0 - dropout)), torch.zeros_like(act))
        return s, act, act

    @staticmethod
    def forward(hidden, attn_out, prompts, kt, log_scale, seed, dropout):
        M = hidden.shape[0]
        acc = _acc(hidden.dtype)
        out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        w = torch.empty(M, dtype=acc, device=hidden.device)
        ex = torch.exp(log_scale.to(acc))
        for r0 in range(0, M, _CHUNK):
            h = hidden[r0:r0 + _CHUNK]
            _, act, a = _TorchKernels._activation(h, kt, seed, dropout, r0)
            wc = act.amax(1).to(acc) if act.shape[1] else act.new_zeros(h.shape[0], dtype=acc)
            e = (a @ prompts).to(acc)
            out[r0:r0 + _CHUNK] = (ex * (attn_out[r0:r0 + _CHUNK].to(acc) + wc[:, None] * e)).to(hidden.dtype)
            w[r0:r0 + _CHUNK] = wc
        return out, w

    @staticmethod
    def backward(grad, hidden, out, prompts, kt, log_scale, w, seed, dropout,
                 need_h, need_y, need_p, need_kt, need_s):
        dtype, acc = grad.dtype, _acc(grad.dtype)
        M, D = grad.shape
        ex = torch.exp(log_scale.to(acc))
        d_y = (ex * grad.to(acc)).to(dtype) if need_y else grad.new_empty(0)
        d_s = (grad.to(acc) * out.to(acc)).sum().reshape(1) if need_s else log_scale.new_empty(0)
        d_h = grad.new_empty((M, D) if need_h else (0,))
        d_p = torch.zeros(prompts.shape if need_p else (0,), dtype=acc, device=grad.device)
        d_kt = torch.zeros(kt.shape if need_kt else (0,), dtype=acc, device=grad.device)
        if need_h or need_p or need_kt:
            for r0 in range(0, M, _CHUNK):
                h, g = hidden[r0:r0 + _CHUNK], grad[r0:r0 + _CHUNK]
                s, _, a = _TorchKernels._activation(h, kt, seed, dropout, r0)
                de = (ex * w[r0:r0 + _CHUNK, None] * g.to(acc)).to(dtype)
                ds = torch.where(s > 0, de @ prompts.t(), torch.zeros_like(s))
                if dropout > 0:
                    ds = torch.where(a > 0, ds * (1.0 / (1.0 - dropout)), torch.zeros_like(ds))
                if need_h:
                    d_h[r0:r0 + _CHUNK] = ds @ kt
                if need_kt:
                    d_kt += (ds.t() @ h).to(acc)
                if need_p:
                    d_p += (a.t() @ de).to(acc)
        return d_h, d_y, d_p.to(dtype), d_kt.to(dtype), d_s.to(log_scale.dtype)


def _cpp_kernels():
    ops = torch.ops.ladder_kernels_C
    return SimpleNamespace(forward=ops.apt_diffusion_fwd, backward=ops.apt_diffusion_bwd)


def _kernels(backend: str):
    if backend == "triton":
        # imported late: TRITON_INTERPRET must be set first
        from ..triton import apt_diffusion as triton_kernels

        return triton_kernels
    if backend == "cpp":
        return _cpp_kernels()
    return _TorchKernels


@torch.library.custom_op("ladder_kernels::apt_diffusion", mutates_args=())
def _apt_diffusion(hidden: Tensor, attn_out: Tensor, prompts: Tensor, kt: Tensor, log_scale: Tensor,
                   seed: Tensor, dropout: float, backend: str) -> tuple[Tensor, Tensor]:
    """(out, w): out = exp(s) (Y + w (A P)), w = row max of relu(H Kt^T) in the accumulation dtype."""
    return tuple(_kernels(backend).forward(hidden, attn_out, prompts, kt, log_scale, seed, dropout))


@_apt_diffusion.register_fake
def _(hidden, attn_out, prompts, kt, log_scale, seed, dropout, backend):
    return hidden.new_empty(hidden.shape), hidden.new_empty(hidden.shape[0], dtype=_acc(hidden.dtype))


@torch.library.custom_op("ladder_kernels::apt_diffusion_backward", mutates_args=())
def _apt_diffusion_backward(grad: Tensor, hidden: Optional[Tensor], out: Optional[Tensor], prompts: Tensor,
                            kt: Tensor, log_scale: Tensor, w: Optional[Tensor], seed: Tensor, dropout: float,
                            need_h: bool, need_y: bool, need_p: bool, need_kt: bool, need_s: bool,
                            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dH, dY, dP_direct, dKt, ds); a gradient that is not needed comes back empty."""
    grads = _kernels(backend).backward(grad.contiguous(), hidden, out, prompts, kt, log_scale, w, seed,
                                       dropout, need_h, need_y, need_p, need_kt, need_s)
    needed = (need_h, need_y, need_p, need_kt, need_s)
    return tuple(g if n else g.new_empty(0) for g, n in zip(grads, needed))  # fresh empties: outputs may not alias


@_apt_diffusion_backward.register_fake
def _(grad, hidden, out, prompts, kt, log_scale, w, seed, dropout, need_h, need_y, need_p, need_kt,
      need_s, backend):
    empty = grad.new_empty(0)
    return (grad.new_empty(grad.shape) if need_h else empty,
            grad.new_empty(grad.shape) if need_y else grad.new_empty(0),
            prompts.new_empty(prompts.shape) if need_p else prompts.new_empty(0),
            kt.new_empty(kt.shape) if need_kt else kt.new_empty(0),
            log_scale.new_empty(1) if need_s else log_scale.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, _, prompts, kt, log_scale, seed, dropout, backend = inputs
    out, w = output
    need = ctx.needs_input_grad
    recompute = need[0] or need[2] or need[3]  # dH, dP and dKt all need A, recomputed from H and Kt
    ctx.dropout, ctx.backend, ctx.recompute = dropout, backend, recompute
    ctx.mark_non_differentiable(w)
    ctx.save_for_backward(hidden if recompute else None, out if need[4] else None, prompts, kt, log_scale,
                          w if recompute else None, seed)


def _backward(ctx, grad_out, _grad_w):
    hidden, out, prompts, kt, log_scale, w, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_h, d_y, d_p, d_kt, d_s = _apt_diffusion_backward(
        grad_out, hidden, out, prompts, kt, log_scale, w, seed, ctx.dropout,
        need[0], need[1], need[2], need[3], need[4], ctx.backend)
    return (d_h if need[0] else None, d_y if need[1] else None, d_p if need[2] else None,
            d_kt if need[3] else None, d_s if need[4] else None, None, None, None)


_apt_diffusion.register_autograd(_backward, setup_context=_setup_context)


def apt_diffusion(hidden: Tensor, attn_out: Tensor, prompts: Tensor, w1: Tensor, w2: Tensor, log_scale,
                  dropout: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """APT's independent prompt diffusion beside ordinary attention.

    out = exp(s) * (Y + w * (A @ P)),  A = dropout(relu(H @ Kt.T)),  Kt = P + (P @ W1.T) @ W2.T,
    w = row max of relu(H @ Kt.T), detached.

    Args:
        hidden: (..., D) H, the attention sub-layer's input (after its LayerNorm).
        attn_out: (..., D) Y, the ordinary attention output (after its projection), same shape as hidden.
        prompts: (p, D) P, p >= 1.   w1: (r, D).   w2: (D, r).
        log_scale: s, a float or a one-element tensor (any float dtype).
        dropout: probability in [0, 1) of dropping an activation of A (counter-based, seeded per call
            from torch's generator, regenerated identically in backward).
        backend: "triton", "cpp", "torch" or None (automatic, see lk.backends()).
    Returns: (..., D) in hidden's dtype.
    """
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
    chosen = _dispatch.resolve(OP, hidden.device, backend)

    acc = _acc(hidden.dtype)
    dropout = float(dropout)
    seed = _draw_seed(hidden.device) if dropout > 0 else torch.zeros(1, dtype=torch.int64, device=hidden.device)
    if isinstance(log_scale, Tensor):
        s = log_scale.reshape(1).to(acc)
    else:
        s = torch.full((1,), float(log_scale), dtype=acc, device=hidden.device)
    kt = prompts + (prompts @ w1.t()) @ w2.t()
    out = _apt_diffusion(hidden.reshape(-1, big_d), attn_out.reshape(-1, big_d), prompts, kt, s, seed,
                         dropout, chosen)[0]
    return out.reshape(hidden.shape)
