"""Prompt assembly's CUDA kernels (csrc/cuda/assemble_prompts.cu): the same schema as the CPU kernels,
registered for the CUDA dispatch key by ladder_kernels._C_cuda."""
import torch

_ops = torch.ops.ladder_kernels_C
forward = _ops.assemble_prompts_fwd
reduce_classes = _ops.assemble_prompts_reduce
