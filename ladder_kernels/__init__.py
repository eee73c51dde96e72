"""ladder_kernels: fused kernels for memory-light prompt tuning of CLIP-style models.

    import ladder_kernels as lk
    lk.gated_fusion(side, tap, weight, bias, gate=alpha, temperature=0.1)   # docs/design.md, section 1
    lk.assemble_prompts(prefix, suffix, base, lowrank_a, lowrank_b)         # docs/design.md, section 2
    lk.apt_diffusion(hidden, attn_out, prompts, w1, w2, log_scale)          # docs/design.md, section 3
    lk.backends(), lk.backend_for(op, device)                               # what runs here, and why not
    lk.SavedTensors()                       # context manager: the bytes autograd keeps for backward
    lk.nn.GatedLadderFusion(tap_dim, side_dim), lk.nn.LowRankPrompt(init, rank=1), lk.nn.APTPrompt(dim)

Importing never touches CUDA and never imports triton: both happen on first use of a GPU/Triton path.
"""
from . import nn, reference
from ._dispatch import BACKENDS, BackendStatus, backend_for, backends
from .memory import SavedTensors
from .ops.gated_fusion import gated_fusion
from .ops.assemble_prompts import assemble_prompts
from .ops.apt_diffusion import apt_diffusion

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendStatus", "SavedTensors", "apt_diffusion", "assemble_prompts", "backend_for",
           "backends", "gated_fusion", "nn", "reference"]
