"""ladder_clip: CLIP prompt tuning on ladder_kernels (CoOp, VPT, MaPLe, RLP, APT, Prompt-Ladder).

    ladder-clip demo
    ladder-clip train --model tiny --data DIR --method ladder --shots 4 --epochs 2 --out runs/x
    ladder-clip eval --model tiny --data DIR --checkpoint runs/x/prompt.safetensors

The names below are imported on first use: `ladder-clip` starts with the standard library only, so a
Ctrl-C during the torch / transformers import is caught by the CLI (one line, no traceback).
"""
import importlib

_LAZY = {"CLIPBackbone": ".backbone", "load_backbone": ".backbone", "METHODS": ".methods",
         "build_method": ".methods"}

__all__ = ["CLIPBackbone", "METHODS", "build_method", "load_backbone"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ladder_clip' has no attribute {name!r}")
