"""ladder_clip: CLIP prompt tuning on ladder_kernels (CoOp, VPT, MaPLe, RLP, APT, Prompt-Ladder).

    ladder-clip demo
    ladder-clip train --model tiny --data DIR --method ladder --shots 4 --epochs 2 --out runs/x
    ladder-clip eval --model tiny --data DIR --checkpoint runs/x/prompt.safetensors
"""
from .backbone import CLIPBackbone, load_backbone
from .methods import METHODS, build_method

__all__ = ["CLIPBackbone", "METHODS", "build_method", "load_backbone"]
