"""Moved to ladder_clip.model.backbone and ladder_clip.model.load (the layers: ladder_clip/__init__.py); this
path stays."""
from ._alias import alias

alias(__name__, "ladder_clip.model.backbone", "ladder_clip.model.load")
