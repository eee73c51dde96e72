"""The backends, as siblings: one folder each, one module per op inside it.

    backends/torch/    plain PyTorch, runs anywhere (the fallback)
    backends/cpu/      C++ CPU kernels of the compiled extension ladder_kernels._C (csrc/cpu)
    backends/cuda/     CUDA C++ kernels of ladder_kernels._C_cuda (csrc/cuda)
    backends/triton/   Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)

A module `backends/<backend>/<op>.py` implements the op's interface (ladder_kernels/backends/interface.py:
a few primitives with fixed signatures; the op module in ladder_kernels/ops/ composes them into the
autograd op, so the memory contract and validation are written once). `TABLE` below says which backend
implements which op and, for compiled backends, which registered kernel proves the build has it. Each
folder's own `__init__.py` declares the backend: `DEVICES` (the tensors' device types it runs on, None for
any), `AUTOMATIC` (those on which the automatic choice may pick it), `PRIORITY` (lower is tried first),
and answers `status()` and `why_not()`. `NAMES` and `auto_order()` (the automatic order per device type)
below are derived from those folders; the dispatcher (ladder_kernels/_dispatch.py) reads nothing else, so adding a
backend for an op is one file and one entry (docs/backends.md walks through it). `_compose.py` holds the
backward composition that backends with a row pass and a dW GEMM share (a backend never imports another).
"""
import importlib
import pkgutil
from typing import NamedTuple, Optional


class Entry(NamedTuple):
    kernel: Optional[str] = None  # for compiled backends: a kernel of torch.ops.ladder_kernels_C it needs


# op -> {backend: Entry}: who implements the op (the automatic choice's order is the folders' PRIORITY).
TABLE = {
    "gated_fusion": {"triton": Entry(), "cpu": Entry("gated_fusion_fwd"), "torch": Entry()},
    "assemble_prompts": {"cuda": Entry("assemble_prompts_fwd"), "cpu": Entry("assemble_prompts_fwd"),
                         "torch": Entry()},
    "apt_diffusion": {"triton": Entry(), "cpu": Entry("apt_diffusion_fwd"), "torch": Entry()},
}
RENAMED = {"cpp": "cpu"}  # old name -> new name, accepted with a DeprecationWarning

# Each folder's __init__, imported now: they are light (no triton, no CUDA context).
FOLDERS = {info.name: importlib.import_module(f"{__name__}.{info.name}")
           for info in pkgutil.iter_modules(__path__) if info.ispkg}
# ("triton", "cuda", "cpu", "torch"): the order of lk.backends() and of the messages, and the automatic one.
NAMES = tuple(sorted(FOLDERS, key=lambda name: (FOLDERS[name].PRIORITY, name)))


def auto_order(device_type: str) -> tuple:
    """The backends the automatic choice tries on tensors of `device_type`, in order: on "cuda" Triton,
    CUDA, plain PyTorch; on "cpu" the C++ kernels, plain PyTorch; elsewhere plain PyTorch."""
    return tuple(name for name in NAMES
                 if FOLDERS[name].AUTOMATIC is None or device_type in FOLDERS[name].AUTOMATIC)
