"""Triton kernels, one module per op. Imported only when a Triton backend runs, so that importing
ladder_kernels never imports triton nor touches CUDA, and so that TRITON_INTERPRET=1 (set by the caller
before first use) decides whether the kernels are compiled for the GPU or interpreted on CPU tensors."""
