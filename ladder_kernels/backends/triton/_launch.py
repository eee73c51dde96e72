"""Launch-side helpers shared by the Triton kernel modules (the accumulation dtype itself is
ladder_kernels._common.acc_dtype)."""
import os

import torch
import triton
import triton.language as tl


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def upcast_bf16(dtype: torch.dtype) -> bool:
    # Triton 3.6's interpreter multiplies bf16 dot operands as raw integers; widening them to fp32
    # first is exact (a bf16 x bf16 product fits in fp32), so the CPU tests check the same maths.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def block(n: int, lo: int = 16, hi: int = 128) -> int:
    """A power-of-two tile size covering n, clamped to [lo, hi] (tl.dot needs at least 16)."""
    return max(lo, min(hi, triton.next_power_of_2(n)))


def num_programs_target(device: torch.device) -> int:
    """How many programs fill the device: two waves of its SMs on a GPU; a few under the interpreter,
    which keeps the CPU tests quick."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def dropout_args(dropout: float):
    """(threshold, 1 / (1 - p)) of the dropout stream (ladder_kernels._dropout), (0, 1) without dropout."""
    from ..._dropout import threshold

    return (threshold(dropout), 1.0 / (1.0 - dropout)) if dropout > 0 else (0, 1.0)
