"""The Prompt-Ladder: the method (ladder.py), its side network pruned from CLIP's layers (side.py), and how
it runs the frozen encoders (frozen.py)."""
from .ladder import Ladder, LadderAPT

__all__ = ["Ladder", "LadderAPT"]
