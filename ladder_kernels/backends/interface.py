"""The interface every backend module implements, one Protocol per op. Tensors arrive 2-D (rows
flattened), validated, on one device and in one dtype; gradients that are not needed come back as empty
tensors. The accumulation dtype is ladder_kernels._common.acc_dtype of the inputs' dtype. The maths and
the memory contract are in docs/design.md; ladder_kernels/ops/<op>.py composes these primitives.
"""
from typing import Optional, Protocol, Tuple

from torch import Tensor


class GatedFusionKernels(Protocol):
    """out = mu s + (1 - mu) Z,  Z = X W^T + b;  mu (d,) in the accumulation dtype."""

    def forward(self, side: Tensor, tap: Tensor, weight: Tensor, bias: Optional[Tensor], mu: Tensor,
                save_diff: bool) -> Tuple[Tensor, Tensor]:
        """(out (M, d) in side's dtype, s - Z (M, d) when save_diff else empty)."""

    def backward(self, grad: Tensor, diff: Optional[Tensor], tap: Optional[Tensor], tap_scale: Optional[Tensor],
                 weight: Optional[Tensor], mu: Tensor, temperature: float, scalar_gate: bool, need_side: bool,
                 need_tap: bool, need_weight: bool, need_bias: bool, need_gate: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(ds = mu G, dX = G ((1 - mu) W), dW = (1 - mu) G^T X, db = (1 - mu) sum_rows G, dalpha =
        sum_rows(G diff) mu (1 - mu) / T) with diff = s - Z, X = tap * tap_scale[:, None] when tap is float8;
        dalpha is (1,) summed over channels when scalar_gate, else (d,), in the acc dtype; the others in
        grad's dtype. One call, so a backend can do it in one kernel launch (or one C++ call)."""


class AssemblePromptsKernels(Protocol):
    """E[c] = concat(prefix[c], base + scale * dropout(A B), suffix[c]) (+ pos)."""

    def forward(self, prefix: Tensor, suffix: Tensor, base: Tensor, lowrank_a: Optional[Tensor],
                lowrank_b: Optional[Tensor], pos: Optional[Tensor], scale: float, dropout: float,
                seed: Tensor) -> Tensor:
        """E (C, L, D) in prefix's dtype. prefix and suffix may be strided views (any class stride)."""

    def reduce_classes(self, grad: Tensor, start: int, end: int) -> Tensor:
        """sum_c grad[c, start:end] (end - start, D) in the acc dtype, summed in class order."""


class AptDiffusionKernels(Protocol):
    """out = exp(s) (Y + w (A P)),  A = dropout(relu(H Kt^T)),  w = row max of A (no gradient)."""

    def forward(self, hidden: Tensor, attn_out: Tensor, prompts: Tensor, kt: Tensor, log_scale: Tensor,
                seed: Tensor, dropout: float) -> Tuple[Tensor, Tensor]:
        """(out (M, D) in hidden's dtype, w (M,) in the acc dtype)."""

    def backward(self, grad: Tensor, hidden: Optional[Tensor], out: Optional[Tensor], prompts: Tensor,
                 kt: Tensor, log_scale: Tensor, w: Optional[Tensor], seed: Tensor, dropout: float,
                 need_h: bool, need_y: bool, need_p: bool, need_kt: bool, need_s: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(dH, dY, dP through A P only, dKt, ds (1,)); A is recomputed from H, Kt and the seed."""


INTERFACES = {"gated_fusion": GatedFusionKernels, "assemble_prompts": AssemblePromptsKernels,
              "apt_diffusion": AptDiffusionKernels}
