"""Which backend runs an op (DESIGN.md section 5), and lk.backends().

Order unless the caller's `backend=` or LADDER_KERNELS_BACKEND forces one: a CUDA tensor goes to the
op's Triton or CUDA kernel, a CPU tensor to its compiled C++ kernel, else to the plain PyTorch path.
Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1), which is how CI tests it.
"""
import importlib.util
import os
from typing import NamedTuple, Optional

import torch

from . import _ext

BACKENDS = ("triton", "cuda", "cpp", "torch")


class BackendStatus(NamedTuple):
    available: bool
    detail: str


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, without importing triton: the answers below are then plain Python that
# torch.compile traces (resolve() runs inside compiled code) without a graph break.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_status() -> BackendStatus:
    if not _TRITON_INSTALLED:
        return BackendStatus(False, "triton is not installed (pip install 'ladder_kernels[triton]')")
    if torch.cuda.is_available():
        return BackendStatus(True, "Triton kernels on CUDA tensors")
    if _interpreting():
        return BackendStatus(True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
    return BackendStatus(False, "no CUDA GPU; set TRITON_INTERPRET=1 to interpret Triton on CPU tensors")


def _cuda_status() -> BackendStatus:
    if _ext.LOAD_ERROR is not None:
        return BackendStatus(False, _ext.LOAD_ERROR)
    if not torch.backends.cuda.is_built():
        return BackendStatus(False, "this torch was built without CUDA")
    if not any(_ext.has_kernel(op, "CUDA") for op in _OPS_WITH_CUDA_KERNELS):
        return BackendStatus(False, _ext.CUDA_LOAD_ERROR or "ladder_kernels was built without its CUDA kernels")
    if not torch.cuda.is_available():
        return BackendStatus(False, "CUDA kernels built, but no CUDA GPU is visible")
    return BackendStatus(True, "CUDA C++ kernels from ladder_kernels._C")


def _cpp_status() -> BackendStatus:
    if _ext.LOAD_ERROR is not None:
        return BackendStatus(False, _ext.LOAD_ERROR)
    return BackendStatus(True, "C++ CPU kernels from ladder_kernels._C")


# Compiled kernel names per op and dispatch key, filled in by each op module via `register_op`.
_OP_BACKENDS: dict = {}
_OPS_WITH_CUDA_KERNELS: list = []


def register_op(op: str, backends: tuple, cpp_kernel: Optional[str] = None, cuda_kernel: Optional[str] = None):
    """Declare which backends `op` implements; `*_kernel` names its ladder_kernels_C kernel."""
    _OP_BACKENDS[op] = (backends, cpp_kernel, cuda_kernel)
    if cuda_kernel:
        _OPS_WITH_CUDA_KERNELS.append(cuda_kernel)


def backends() -> dict:
    """Each backend of this install: whether it can run here, and why (not)."""
    return {
        "triton": _triton_status(),
        "cuda": _cuda_status(),
        "cpp": _cpp_status(),
        "torch": BackendStatus(True, "plain PyTorch (always available)"),
    }


def _why_not(op: str, backend: str, device_type: str) -> Optional[str]:
    """None if `backend` can run `op` on tensors of `device_type`, else the reason it cannot."""
    supported, cpp_kernel, cuda_kernel = _OP_BACKENDS[op]
    if backend not in supported:
        return f"{op} has no {backend} implementation (it has: {', '.join(supported)})"
    if backend == "torch":
        return None
    if backend == "triton":
        status = _triton_status()
        if not status.available:
            return status.detail
        if device_type == "cpu" and not _interpreting():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on {device_type} tensors"
        return None
    if backend == "cpp":
        if device_type != "cpu":
            return f"the C++ kernels run on CPU tensors, got {device_type} tensors"
        if not _ext.has_kernel(cpp_kernel, "CPU"):
            return _ext.LOAD_ERROR or f"ladder_kernels._C has no {cpp_kernel} kernel: rebuild it"
        return None
    # backend == "cuda"
    if device_type != "cuda":
        return f"the CUDA kernels run on CUDA tensors, got {device_type} tensors"
    if not _ext.has_kernel(cuda_kernel, "CUDA"):
        return _cuda_status().detail
    return None


def _resolve(op: str, device_type: str, requested: str) -> str:
    if requested:
        if requested not in BACKENDS:
            raise ValueError(f"{op}: argument 'backend' must be one of {BACKENDS} or None, got {requested!r}")
        reason = _why_not(op, requested, device_type)
        if reason is not None:
            raise ValueError(f"{op}: backend {requested!r} cannot run here: {reason}")
        return requested
    order = ("triton", "cuda", "torch") if device_type == "cuda" else ("cpp", "torch")
    return next(b for b in order if b in _OP_BACKENDS[op][0] and _why_not(op, b, device_type) is None)


def resolve(op: str, device: torch.device, backend: Optional[str]) -> str:
    """The backend that runs `op` on `device`: `backend` if given, else LADDER_KERNELS_BACKEND, else auto."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"{op}: argument 'backend' must be a str or None, got {type(backend).__name__}")
    requested = backend or os.environ.get("LADDER_KERNELS_BACKEND", "")
    return _resolve(op, device.type, requested)
