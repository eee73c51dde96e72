"""Argument checks shared by the ops: every message names the op, the argument, what was expected and
what was received, so bad input fails loudly in Python instead of crashing or hanging in a kernel."""
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(op: str, name: str, value, *, dims: Optional[Sequence[int]] = None, min_dims: int = 0,
           dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """`value` must be a tensor of one of `dtypes`, with a rank in `dims` (or at least `min_dims`)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:  # the kernels read memory by strides; sparse layouts have none
        raise TypeError(f"{op}: argument '{name}' must be a dense (strided) tensor, got layout "
                        f"{str(value.layout).replace('torch.', '')}")
    if value.dtype not in dtypes:
        raise TypeError(
            f"{op}: argument '{name}' must have dtype in {_names(dtypes)}, got {_name(value.dtype)}"
        )
    if dims is not None and value.dim() not in dims:
        raise ValueError(
            f"{op}: argument '{name}' must have {' or '.join(map(str, dims))} dimensions, "
            f"got shape {tuple(value.shape)}"
        )
    if value.dim() < min_dims:
        raise ValueError(
            f"{op}: argument '{name}' must have at least {min_dims} dimensions, got shape {tuple(value.shape)}"
        )
    return value


def shape(op: str, name: str, value: torch.Tensor, expected: Sequence, what: str = "") -> None:
    """`value.shape` must equal `expected` (entries of None match any size)."""
    got = value.shape
    if got == expected:  # the common case, one comparison (a torch.Size equals a tuple of ints)
        return
    got = tuple(got)
    ok = len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        note = f" ({what})" if what else ""
        raise ValueError(f"{op}: argument '{name}' must have shape {want}{note}, got {got}")


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    dtype = ref.dtype
    for name, value in others.items():
        if value is not None and value.dtype != dtype:
            raise TypeError(
                f"{op}: argument '{name}' must have the dtype of '{ref_name}' ({_name(ref.dtype)}), "
                f"got {_name(value.dtype)}"
            )


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    device = ref.device
    for name, value in others.items():
        if value is not None and value.device != device:
            raise ValueError(
                f"{op}: argument '{name}' must be on the device of '{ref_name}' ({ref.device}), got {value.device}"
            )


def positive_float(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: argument '{name}' must be a float, got {type(value).__name__}")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{op}: argument '{name}' must be a finite number > 0, got {value}")
    return float(value)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return "{" + ", ".join(_name(d) for d in dtypes) + "}"


def rows(value: torch.Tensor) -> int:
    """The number of rows M of a (..., width) tensor, also when width is 0 (where reshape(-1, 0) fails)."""
    m = 1
    for s in value.shape[:-1]:
        m *= s
    return m
