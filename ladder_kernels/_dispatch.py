"""The one dispatcher: which backend runs an op, and its kernels (docs/design.md, "Backends").

Unless the caller's `backend=` or LADDER_KERNELS_BACKEND forces one, the first backend of the automatic
order for the tensors' device (ladder_kernels.backends.auto_order, from each backend folder's declaration)
that implements the op (ladder_kernels.backends.TABLE) and can run here: on a CUDA tensor Triton or CUDA,
then plain PyTorch; on a CPU tensor the C++ kernels, then plain PyTorch (Triton takes CPU tensors only when
forced, under TRITON_INTERPRET=1, which is how CI tests it). A choice is worked out once per (op, device
type, request) and remembered, so a call costs a dict lookup.
"""
import importlib
import os
import warnings
from typing import NamedTuple, Optional

import torch

from . import backends as _backends
from .backends import triton as _triton

BACKENDS = _backends.NAMES
_FOLDERS = _backends.FOLDERS  # each folder's __init__: its status and device rules


class BackendStatus(NamedTuple):
    available: bool
    detail: str


class _Statuses(dict):
    """lk.backends()'s answer; a renamed backend's old name still reads, with a DeprecationWarning."""

    def __missing__(self, key):
        if key in _backends.RENAMED:
            return self[_renamed(key)]
        raise KeyError(key)


def backends() -> dict:
    """Each backend of this install: whether it can run here, and why (not)."""
    return _Statuses((name, BackendStatus(*_FOLDERS[name].status())) for name in BACKENDS)


def _renamed(name: str) -> str:
    new = _backends.RENAMED[name]
    warnings.warn(f"ladder_kernels: backend {name!r} is now called {new!r}", DeprecationWarning, stacklevel=4)
    return new


def why_not(op: str, backend: str, device_type: str) -> Optional[str]:
    """None if `backend` can run `op` on tensors of `device_type`, else the reason it cannot."""
    row = _backends.TABLE[op]
    if backend not in row:
        return f"{op} has no {backend} implementation (it has: {', '.join(row)})"
    return _FOLDERS[backend].why_not(device_type, row[backend].kernel)


def _choose(op: str, device_type: str, requested: str, wide: bool = False, source: str = "argument 'backend'"
            ) -> str:
    if requested:
        if requested in _backends.RENAMED:
            requested = _renamed(requested)
        if requested not in BACKENDS:
            names = BACKENDS + tuple(_backends.RENAMED)
            what = "must be one of" if source.startswith("argument") else "must name a backend, one of"
            raise ValueError(f"{op}: {source} {what} {names} or None, got {requested!r}")
        reason = why_not(op, requested, device_type)
        if reason is not None:
            raise ValueError(f"{op}: backend {requested!r} cannot run here ({source}): {reason}")
        return requested
    order = _backends.auto_order(device_type)
    if wide:  # fp64 Triton tiles spill registers on a GPU (the static gate's fp64 rows): plain PyTorch
        order = tuple(b for b in order if b != "triton")
    return next(b for b in order if b in _backends.TABLE[op] and why_not(op, b, device_type) is None)


_CHOSEN: dict = {}


def resolve(op: str, device: torch.device, backend: Optional[str], dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs `op` on `device`: `backend` if given, else LADDER_KERNELS_BACKEND, else auto
    (on a GPU, float64 goes to plain PyTorch: the Triton tiles are sized for 16/32-bit registers). The
    variable is read on every call, not once: users and tests switch it while a process runs."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"{op}: argument 'backend' must be a str or None, got {type(backend).__name__}")
    source = "argument 'backend'" if backend else "LADDER_KERNELS_BACKEND"
    requested = backend or os.environ.get("LADDER_KERNELS_BACKEND", "")
    wide = dtype is torch.float64 and device.type == "cuda" and not requested
    if torch.compiler.is_compiling():  # traced: plain Python, no cache mutation in the graph
        return _choose(op, device.type, requested, wide, source)
    # Only a forced Triton depends on TRITON_INTERPRET (the automatic order never picks it on a CPU).
    key = (op, device.type, requested, requested == "triton" and _triton.interpreting(), wide)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _choose(op, device.type, requested, wide, source)
        if requested not in _backends.RENAMED:  # keep warning on every use of an old name
            _CHOSEN[key] = chosen
    return chosen


def backend_for(op: str, device, backend: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> str:
    """lk.backend_for("gated_fusion", "cpu"): the backend a call of `op` on tensors of `device` (and
    `dtype`, where it matters) runs on."""
    if op not in _backends.TABLE:
        raise ValueError(f"backend_for: argument 'op' must be one of {tuple(_backends.TABLE)}, got {op!r}")
    return resolve(op, torch.device(device), backend, dtype)


_KERNELS: dict = {}


def kernels(op: str, backend: str):
    """The module backends/<backend>/<op>.py (imported on first use: Triton's needs TRITON_INTERPRET set)."""
    mod = _KERNELS.get((op, backend))
    if mod is None:
        mod = _KERNELS[op, backend] = importlib.import_module(f"ladder_kernels.backends.{backend}.{op}")
    return mod
