"""The backends, as siblings: one folder each, one module per op inside it.

    backends/torch/    plain PyTorch, runs anywhere (the fallback)
    backends/cpu/      C++ CPU kernels of the compiled extension ladder_kernels._C (csrc/cpu)
    backends/cuda/     CUDA C++ kernels of ladder_kernels._C_cuda (csrc/cuda)
    backends/triton/   Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)

A module `backends/<backend>/<op>.py` implements the op's interface (ladder_kernels/backends/interface.py:
a few primitives with fixed signatures; the op module in ladder_kernels/ops/ composes them into the
autograd op, so the memory contract and validation are written once). `TABLE` below says which backend
implements which op and, for compiled backends, which registered kernel proves the build has it; the
folder's own `__init__.py` says on which devices the backend runs and why it cannot here. The dispatcher
(ladder_kernels/_dispatch.py) reads nothing else, so adding a backend for an op is one file and one entry
(docs/backends.md walks through it).
"""
from typing import NamedTuple, Optional


class Entry(NamedTuple):
    kernel: Optional[str] = None  # for compiled backends: a kernel of torch.ops.ladder_kernels_C it needs


# op -> {backend: Entry}; the order of each row is the automatic choice's preference on a device.
TABLE = {
    "gated_fusion": {"triton": Entry(), "cpu": Entry("gated_fusion_fwd"), "torch": Entry()},
    "assemble_prompts": {"cuda": Entry("assemble_prompts_fwd"), "cpu": Entry("assemble_prompts_fwd"),
                         "torch": Entry()},
    "apt_diffusion": {"triton": Entry(), "cpu": Entry("apt_diffusion_fwd"), "torch": Entry()},
}
NAMES = ("triton", "cuda", "cpu", "torch")
RENAMED = {"cpp": "cpu"}  # old name -> new name, accepted with a DeprecationWarning
