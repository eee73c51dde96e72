"""Prompt assembly's C++ CPU kernels (csrc/cpu/assemble_prompts.cpp): E written in one pass, the prompt
rows built in a small scratch per class chunk; the class reduction splits elements, never classes."""
import torch

_ops = torch.ops.ladder_kernels_C
forward = _ops.assemble_prompts_fwd
reduce_classes = _ops.assemble_prompts_reduce
