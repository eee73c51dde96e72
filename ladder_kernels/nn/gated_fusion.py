"""GatedLadderFusion: the entry of a ladder side block (LST / Prompt-Ladder, docs/design.md, section 1)."""
import math
from typing import Optional

import torch
from torch import nn

from .. import _validate
from ..ops.gated_fusion import gated_fusion


class GatedLadderFusion(nn.Module):
    """Blends the side state with a down-projection of a detached backbone tap through a sigmoid gate.

        out = mu * side + (1 - mu) * (tap @ weight.T + bias),   mu = sigmoid(gate / temperature)

    `gate` is the gate's logit alpha (the trainable parameter), `gate_value` is mu. LST's defaults: a
    scalar alpha = 0 and T = 0.1, so mu starts at 0.5. `per_channel_gate=True`
    learns one alpha per side channel. The tap is detached here, so backward never enters the backbone.
    `tap_dtype=torch.float8_e4m3fn` keeps the tap for the weight's gradient as float8 (see lk.gated_fusion).
    """

    def __init__(self, tap_dim: int, side_dim: int, bias: bool = True, per_channel_gate: bool = False,
                 temperature: float = 0.1, gate_init: float = 0.0, tap_dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        temperature = _validate.positive_float("GatedLadderFusion", "temperature", temperature)
        self.tap_dim, self.side_dim = tap_dim, side_dim
        self.temperature, self.tap_dtype, self.backend = float(temperature), tap_dtype, backend
        self.weight = nn.Parameter(torch.empty(side_dim, tap_dim, **factory))
        self.bias = nn.Parameter(torch.empty(side_dim, **factory)) if bias else None
        self.gate = nn.Parameter(torch.full((side_dim,) if per_channel_gate else (), float(gate_init),
                                            device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, so the down-projection starts like the layer it replaces.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.tap_dim) if self.tap_dim > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def gate_value(self) -> torch.Tensor:
        """mu = sigmoid(gate / temperature): the current weight(s) of the side state in the blend."""
        return torch.sigmoid(self.gate.detach() / self.temperature)

    mu = gate_value  # the formula's name for it

    def forward(self, side: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        """out in side's dtype. Under autocast the side state, the tap and the fp32 parameters can differ
        in dtype; the op wants one, so tap, weight and bias are cast to side's (the gate stays fp32)."""
        dt = side.dtype
        bias = self.bias.to(dt) if self.bias is not None else None
        return gated_fusion(side, tap.detach().to(dt), self.weight.to(dt), bias, gate=self.gate,
                            temperature=self.temperature, tap_dtype=self.tap_dtype, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"tap_dim={self.tap_dim}, side_dim={self.side_dim}, bias={self.bias is not None}, "
                f"gate={'per-channel' if self.gate.dim() else 'scalar'}, temperature={self.temperature}")
