"""Triton kernels, one module per op. A module here is imported only when the Triton backend runs, so that
importing ladder_kernels never imports triton nor touches CUDA, and so that TRITON_INTERPRET=1 (set by
the caller before first use) decides whether the kernels are compiled for the GPU or interpreted on CPU
tensors. This file itself only answers whether Triton can run, without importing it."""
import importlib.util
import os
from typing import Optional

import torch

DEVICES = ("cuda", "cpu")  # CPU tensors under TRITON_INTERPRET=1 only
AUTOMATIC = ("cuda",)  # on CPU tensors only when forced (the interpreter is how CI tests the kernels)
PRIORITY = 0  # first on a GPU

_INSTALLED = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def status():
    if not _INSTALLED:
        return False, "triton is not installed (pip install 'ladder_kernels[triton]')"
    if torch.cuda.is_available():
        return True, "Triton kernels on CUDA tensors"
    if interpreting():
        return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
    return False, "no CUDA GPU; set TRITON_INTERPRET=1 to interpret Triton on CPU tensors"


def why_not(device_type: str, kernel: Optional[str]) -> Optional[str]:
    ok, detail = status()
    if not ok:
        return detail
    if device_type == "cpu" and not interpreting():
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if device_type not in DEVICES:
        return f"Triton does not run on {device_type} tensors"
    return None
