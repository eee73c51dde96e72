"""Prompt assembly in plain PyTorch: E = concat(prefix, base + scale * dropout(A B), suffix) (+ pos), and
the deterministic class reduction of the backward. fp32 accumulation."""
import torch

from ... import _dropout
from ..._common import acc_dtype


def forward(prefix, suffix, base, lowrank_a, lowrank_b, pos, scale, dropout, seed):
    acc = acc_dtype(prefix.dtype)
    prompt = base.to(acc)
    if lowrank_a is not None:
        q = lowrank_a.to(acc) @ lowrank_b.to(acc)
        if dropout > 0:
            q = q * (_dropout.flat_keep(q.shape, seed, dropout, q.device).to(acc) / (1.0 - dropout))
        prompt = prompt + scale * q
    c, n, d = prefix.shape[0], prompt.shape[-2], prompt.shape[-1]
    out = torch.cat((prefix.to(acc), prompt.expand(c, n, d), suffix.to(acc)), dim=1)
    if pos is not None:
        out = out + pos.to(acc)
    return out.to(prefix.dtype)


def reduce_classes(grad, start, end):
    return grad[:, start:end].to(acc_dtype(grad.dtype)).sum(0)
