"""The Prompt-Ladder: the method (ladder.py), its side network pruned from CLIP's layers (side.py), and how
it runs the frozen encoders (frozen.py); `lst`, its plain-PyTorch LST peer (lst.py)."""
from .ladder import Ladder, LadderAPT
from .lst import LST

__all__ = ["LST", "Ladder", "LadderAPT"]
