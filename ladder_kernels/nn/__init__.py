"""nn.Modules around the ops."""
from .gated_fusion import GatedLadderFusion
from .low_rank_prompt import LowRankPrompt

__all__ = ["GatedLadderFusion", "LowRankPrompt"]
