"""The prompt-tuning methods, by CLI name."""
from .apt import APT
from .base import PromptMethod
from .coop import CoOp
from .ladder import LST, Ladder, LadderAPT
from .linear_probe import LinearProbe
from .maple import MaPLe
from .rlp import RLP
from .vpt import VPT
from .zeroshot import ZeroShot

METHODS = {m.name: m for m in (ZeroShot, CoOp, VPT, MaPLe, RLP, APT, Ladder, LadderAPT, LST, LinearProbe)}


def build_method(name: str, backbone, classnames, **cfg) -> PromptMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](backbone, classnames, **cfg)


__all__ = ["METHODS", "PromptMethod", "build_method"]
