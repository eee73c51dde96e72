"""APT's C++ CPU kernels (csrc/cpu/apt_diffusion.cpp): row blocks of 128 (forward) and 256 (backward)
rows, scores held transposed, the activation recomputed in backward; per-block partials in block order."""
import torch

_ops = torch.ops.ladder_kernels_C
forward = _ops.apt_diffusion_fwd
backward = _ops.apt_diffusion_bwd
