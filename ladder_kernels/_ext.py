"""Loads the compiled extensions and remembers why when one cannot load.

ladder_kernels._C declares the ops of torch.ops.ladder_kernels_C and holds their CPU kernels;
ladder_kernels._C_cuda, built only against a CUDA torch, adds the CUDA kernels. Loading a library
creates no CUDA context, so importing the package on a CPU-only machine stays cheap.
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


CUDA_LOAD_ERROR = None
if LOAD_ERROR is None and torch.backends.cuda.is_built():
    try:
        from . import _C_cuda  # noqa: F401  (imported for its CUDA kernel registrations)
    except ImportError as exc:  # LADDER_KERNELS_CUDA=0, no nvcc at build time, or a failed CUDA compile
        CUDA_LOAD_ERROR = f"the CUDA kernels (ladder_kernels._C_cuda) did not load ({exc})"


def _registered() -> frozenset:
    """(kernel, dispatch key) pairs the extension registered, read once: lookups are then plain Python,
    which torch.compile traces without a graph break."""
    if LOAD_ERROR is not None:
        return frozenset()
    return frozenset(
        (name.split("::", 1)[1].split(".", 1)[0], key)
        for key in ("CPU", "CUDA")
        for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
        if name.startswith("ladder_kernels_C::")
    )


KERNELS = _registered()


def has_kernel(name: str, dispatch_key: str) -> bool:
    """True if the extension registered `ladder_kernels_C::name` for `dispatch_key` ("CPU", "CUDA")."""
    return (name, dispatch_key) in KERNELS
