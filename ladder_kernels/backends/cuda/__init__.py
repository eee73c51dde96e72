"""CUDA C++ kernels (csrc/cuda), from the compiled extension ladder_kernels._C_cuda."""
from typing import Optional

import torch

from ... import _ext

DEVICES = ("cuda",)  # the tensors' device types it runs on
AUTOMATIC = DEVICES  # the automatic choice picks it on these
PRIORITY = 1  # after Triton, before plain PyTorch


def status():
    if _ext.LOAD_ERROR is not None:
        return False, _ext.LOAD_ERROR
    if not torch.backends.cuda.is_built():
        return False, "this torch was built without CUDA"
    if not any(key == "CUDA" for _, key in _ext.KERNELS):
        return False, _ext.CUDA_LOAD_ERROR or "ladder_kernels was built without its CUDA kernels"
    if not torch.cuda.is_available():
        return False, "CUDA kernels built, but no CUDA GPU is visible"
    return True, "CUDA C++ kernels from ladder_kernels._C_cuda"


def why_not(device_type: str, kernel: Optional[str]) -> Optional[str]:
    if device_type not in DEVICES:
        return f"the CUDA kernels run on CUDA tensors, got {device_type} tensors"
    if not _ext.has_kernel(kernel, "CUDA"):
        return status()[1]
    return None
