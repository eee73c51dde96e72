"""C++ CPU kernels (csrc/cpu, OpenMP + BLAS), from the compiled extension ladder_kernels._C."""
from typing import Optional

from ... import _ext

DEVICES = ("cpu",)  # the tensors' device types it runs on
AUTOMATIC = DEVICES  # the automatic choice picks it on these
PRIORITY = 2  # tried after Triton and CUDA (which run on other devices), before plain PyTorch


def status():
    if _ext.LOAD_ERROR is not None:
        return False, _ext.LOAD_ERROR
    return True, "C++ CPU kernels from ladder_kernels._C"


def why_not(device_type: str, kernel: Optional[str]) -> Optional[str]:
    if device_type not in DEVICES:
        return f"the C++ CPU kernels run on CPU tensors, got {device_type} tensors"
    if not _ext.has_kernel(kernel, "CPU"):
        return _ext.LOAD_ERROR or f"ladder_kernels._C has no {kernel} kernel: rebuild it"
    return None
