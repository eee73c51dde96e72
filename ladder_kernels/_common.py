"""The one definition of the accumulation dtype, shared by every op and backend (C++: `acc_type` in
csrc/common.h), and the cast the ops' host path uses."""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs accumulate in fp64; fp32, bf16 and fp16 inputs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`: `t` itself when it already is, without the torch call `t.to(dtype)` would make (on
    the ops' host path, at small sizes, each call costs as much as the maths; C++: `widened`)."""
    return t if t.dtype == dtype else t.to(dtype)
