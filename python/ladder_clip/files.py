"""Moved to ladder_clip.base.files (the layers: ladder_clip/__init__.py); this path stays."""
from ._alias import alias

alias(__name__, "ladder_clip.base.files")
