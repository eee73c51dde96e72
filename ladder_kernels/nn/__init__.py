"""nn.Modules around the ops."""
from .gated_fusion import GatedLadderFusion

__all__ = ["GatedLadderFusion"]
