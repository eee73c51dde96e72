"""Gated fusion's C++ CPU kernels (csrc/cpu/gated_fusion.cpp): BLAS GEMMs per row block, the bias, gate
and blend fused into the epilogue while the block is in cache; the whole backward in one call, its row
reductions in block order. `.default`: the overload itself, which skips the packet's per-call lookup."""
import torch

_ops = torch.ops.ladder_kernels_C
forward = _ops.gated_fusion_fwd.default
backward = _ops.gated_fusion_bwd.default
