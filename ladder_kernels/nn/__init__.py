"""nn.Modules around the ops."""
from .gated_fusion import GatedLadderFusion
from .low_rank_prompt import LowRankPrompt
from .apt_prompt import APTAttachment, APTPrompt, attach_apt

__all__ = ["APTAttachment", "APTPrompt", "attach_apt", "GatedLadderFusion", "LowRankPrompt"]
