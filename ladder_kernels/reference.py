"""Plain PyTorch statements of each op's maths (DESIGN.md), differentiable by autograd.

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
