"""LowRankPrompt: RLP's re-parameterised low-rank prompt (docs/design.md, section 2)."""
import math
from typing import Optional

import torch
from torch import nn

from ..ops.assemble_prompts import assemble_prompts


class LowRankPrompt(nn.Module):
    """A frozen prompt init P0 plus a trainable low-rank term:  P = P0 + scale * dropout(A B).

    init: (n, D) shared prompt (e.g. the token embeddings of "a photo of a") or (C, n, D) per class;
    A: (n, r) or (C, n, r) and B: (r, D) are the only trainable numbers (n r + r D: 516 for n=4, r=1, D=512).

    init_mode:
      "zero": A = 0 and B ~ N(0, 1/D) (LoRA's choice), so P starts at P0 and A gets a non-zero gradient.
      "svd":  A B is the rank-r truncated SVD of P0 (A = U sqrt(S), B = sqrt(S) V^T) and the frozen base holds
              the residual P0 - scale A B, so P still starts exactly at P0 while both factors start in P0's
              principal subspace with non-zero gradients.
    Dropout acts on A B in training mode only. `merge()` gives the dense prompt for inference; the
    state_dict holds the frozen base and the two factors, all that is needed to restore it.
    """

    def __init__(self, init: torch.Tensor, rank: int = 1, scale: float = 1.0, dropout: float = 0.0,
                 init_mode: str = "zero", backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        if not isinstance(init, torch.Tensor) or init.dim() not in (2, 3) or not init.is_floating_point():
            got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
            raise ValueError(f"{name}: argument 'init' must be a floating (n, D) or (C, n, D) tensor, got {got}")
        n, d = init.shape[-2:]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{name}: argument 'rank' must be an int >= 1, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: argument 'dropout' must be in [0, 1), got {dropout}")
        if init_mode not in ("zero", "svd"):
            raise ValueError(f"{name}: argument 'init_mode' must be 'zero' or 'svd', got {init_mode!r}")
        self.rank, self.scale, self.dropout, self.backend = rank, float(scale), float(dropout), backend
        lead = tuple(init.shape[:-2])
        p0 = init.detach().clone()
        if init_mode == "zero":
            a = torch.zeros(*lead, n, rank, dtype=init.dtype, device=init.device)
            b = torch.randn(rank, d, dtype=init.dtype, device=init.device) / math.sqrt(d)
            base = p0
        else:
            if rank > min(n * (lead[0] if lead else 1), d):
                raise ValueError(f"{name}: argument 'rank' must be <= min(rows, D) of init for 'svd', got {rank}")
            u, s, vh = torch.linalg.svd(p0.reshape(-1, d).double(), full_matrices=False)
            root = s[:rank].sqrt()
            a = (u[:, :rank] * root).reshape(*lead, n, rank).to(init.dtype)
            b = (root[:, None] * vh[:rank]).to(init.dtype)
            base = (p0.double() - self.scale * (a.double() @ b.double())).to(init.dtype)
        self.register_buffer("base", base)
        self.lowrank_a = nn.Parameter(a)
        self.lowrank_b = nn.Parameter(b)

    def merge(self) -> torch.Tensor:
        """The dense prompt P0 + scale A B, (n, D) or (C, n, D), detached: the inference-time prompt."""
        with torch.no_grad():
            return self.base + self.scale * (self.lowrank_a @ self.lowrank_b)

    def forward(self, prefix: torch.Tensor, suffix: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C, a + n + s, D) sequences: concat(prefix, P, suffix) (+ pos), in prefix's dtype."""
        dtype = prefix.dtype if isinstance(prefix, torch.Tensor) else None
        cast = (lambda t: t) if dtype is None or not dtype.is_floating_point else (lambda t: t.to(dtype))
        return assemble_prompts(prefix, suffix, cast(self.base), cast(self.lowrank_a), cast(self.lowrank_b),
                                self.scale, pos, self.dropout if self.training else 0.0, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"prompt={tuple(self.base.shape)}, rank={self.rank}, scale={self.scale}, "
                f"dropout={self.dropout}")
