"""Small launch-side helpers shared by the Triton kernel modules."""
import os

import torch
import triton
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def upcast_bf16(dtype: torch.dtype) -> bool:
    # Triton 3.6's interpreter multiplies bf16 dot operands as raw integers; widening them to fp32
    # first is exact (a bf16 x bf16 product fits in fp32), so the CPU tests check the same maths.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def block(n: int, lo: int = 16, hi: int = 128) -> int:
    """A power-of-two tile size covering n, clamped to [lo, hi] (tl.dot needs at least 16)."""
    return max(lo, min(hi, triton.next_power_of_2(n)))
