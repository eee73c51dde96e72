"""Plain PyTorch statements of each op's maths (docs/design.md), differentiable by autograd.

They run in whatever dtype they are given: the tests call them on float64 copies as the ground truth and
on the test dtype as "the same maths in plain PyTorch", and the benchmarks time them (eager and under
torch.compile) as the baseline every kernel must beat.
"""
from typing import Optional

import torch


def gated_fusion(side: torch.Tensor, tap: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, gate=0.0, temperature: float = 0.1) -> torch.Tensor:
    """out = mu * s + (1 - mu) * (X W^T + b),  mu = sigmoid(alpha / T)."""
    z = tap @ weight.t()
    if bias is not None:
        z = z + bias
    mu = torch.sigmoid(torch.as_tensor(gate, dtype=side.dtype, device=side.device) / temperature)
    return mu * side + (1 - mu) * z


def assemble_prompts(prefix: torch.Tensor, suffix: torch.Tensor, base: torch.Tensor,
                     lowrank_a: Optional[torch.Tensor] = None, lowrank_b: Optional[torch.Tensor] = None,
                     scale: float = 1.0, pos: Optional[torch.Tensor] = None,
                     keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E[c] = concat(prefix[c], P[c], suffix[c]) (+ pos),  P = base + scale * keep * (A B).

    base (n, D) or (C, n, D); A (n, r) or (C, n, r); B (r, D); keep: the dropout multiplier (mask / (1 - p))
    shaped like A B, or None."""
    p = base
    if lowrank_a is not None:
        q = lowrank_a @ lowrank_b
        p = p + scale * (q if keep is None else q * keep.to(q.dtype))
    p = p.expand(prefix.shape[0], *p.shape[-2:])
    out = torch.cat((prefix, p, suffix), dim=1)
    return out if pos is None else out + pos


def apt_diffusion(hidden: torch.Tensor, attn_out: torch.Tensor, prompts: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor, log_scale, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """APT: out = exp(s) (Y + w * (A P)),  A = relu(H Kt^T) [* dropout_mask],  Kt = P + (P W1^T) W2^T,
    w = stopgrad(row max of A), after dropout as in APT's code. `dropout_mask` (..., p) holds 0 or
    1 / (1 - dropout)."""
    kt = prompts + (prompts @ w1.t()) @ w2.t()
    act = torch.relu(hidden @ kt.t())
    a = act if dropout_mask is None else act * dropout_mask.to(act.dtype)
    w = a.amax(-1, keepdim=True).detach()
    scale = torch.exp(torch.as_tensor(log_scale, dtype=hidden.dtype, device=hidden.device))
    return scale * (attn_out + w * (a @ prompts))
