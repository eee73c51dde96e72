"""The one definition of the accumulation dtype, shared by every op and backend (C++: `acc_type` in
csrc/common.h)."""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs accumulate in fp64; fp32, bf16 and fp16 inputs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
