"""Loads the compiled extension ladder_kernels._C and remembers why when it cannot.

Importing it registers the kernels under torch.ops.ladder_kernels_C (CPU always, CUDA when built with
it). Nothing here touches CUDA, so importing the package on a CPU-only machine stays cheap.
"""
import torch

try:
    from . import _C  # noqa: F401  (imported for its op registrations)

    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = (
        f"the compiled extension ladder_kernels._C did not load ({exc}); rebuild it with "
        "`pip install --no-build-isolation -e .` and read the compiler's output"
    )


def has_kernel(name: str, dispatch_key: str) -> bool:
    """True if the extension registered `ladder_kernels_C::name` for `dispatch_key` ("CPU", "CUDA")."""
    if LOAD_ERROR is not None:
        return False
    qualified = f"ladder_kernels_C::{name}"
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key)
