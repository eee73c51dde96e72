"""Gated fusion's C++ CPU kernels (csrc/cpu/gated_fusion.cpp): BLAS GEMMs per row block, the bias, gate
and blend fused into the epilogue while the block is in cache; row reductions in block order."""
import torch

from ..torch.gated_fusion import finish_weight

_ops = torch.ops.ladder_kernels_C
forward = _ops.gated_fusion_fwd
grad_rows = _ops.gated_fusion_bwd_rows


def grad_weight(grad, tap, tap_scale, row_scale=None, out_dtype=None):
    return finish_weight(_ops.gated_fusion_bwd_weight(grad, tap, tap_scale), row_scale, out_dtype)
