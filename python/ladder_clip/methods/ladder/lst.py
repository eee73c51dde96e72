"""`lst`: the plain Ladder Side-Tuning peer of the `ladder` method (LST: Sung, Cho and Bansal, "LST: Ladder
Side-Tuning for Parameter and Memory Efficient Transfer Learning", NeurIPS 2022; github.com/ylsung/
Ladder-Side-Tuning): the same Prompt-Ladder written the way a user writes LST in plain PyTorch, without
this package's ops or its text cache.

It is the Ladder (same side blocks, taps, prompts, parameters and initialisation, so a state dict moves
between the two and they compute the same logits: tests/benchmarks/test_bench_train_step.py and
tests/pipeline/test_methods_ablation.py check it), with four things done as LST's own code does them:
- the frozen text encoder runs under no_grad at every step (LST runs its backbone in every forward);
- each side block's fusion is `mu * s + (1 - mu) * Linear(tap)` through autograd, which keeps the tap
  and the Linear output for backward (with --opt fusion=sum, `s + Linear(tap)`, plain torch either way);
- prompts are placed with torch.cat after an explicit `A @ B`, and the visual ones expanded per image;
- side blocks keep their activations (no checkpointing) and the frozen image encoder takes the whole
  batch at once.
benchmarks/lst_peer.py measures it against the ladder; its recipe is LST's (engine/recipes.py).
"""
import torch
from torch.nn import functional as F

import ladder_kernels as lk

from .ladder import Ladder


class LST(Ladder):
    name = "lst"
    # LST keeps the side blocks' activations, and runs its backbone on the whole batch
    defaults = {**Ladder.defaults, "checkpoint": False, "frozen_chunk": 0}

    def fuse(self, f, s, tap):
        if not isinstance(f, lk.nn.GatedLadderFusion):  # fusion=sum: side.SumFusion is plain torch already
            return f(s, tap)
        mu = torch.sigmoid(f.gate / f.temperature)
        return mu * s + (1 - mu) * F.linear(tap.detach(), f.weight, f.bias).to(s.dtype)

    def text_prompts(self, s0):
        n = self.layout.n_ctx
        ctx = s0[:, 1:1 + n] + self.cfg["scale"] * (self.txt_a @ self.txt_b).to(s0.dtype)
        return torch.cat([s0[:, :1], ctx, s0[:, 1 + n:]], 1)

    def visual_prompts(self, s0):
        v = self.visual
        p = (v.base + v.scale * v.lowrank_a @ v.lowrank_b).to(s0.dtype)
        return torch.cat([s0[:, :1], p.expand(s0.shape[0], -1, -1), s0[:, 1:]], 1)

    def _frozen_text(self):
        taps_at = [0] + [i + 1 for i in self.t_layers]
        with torch.no_grad():
            return self.backbone.encode_text(self.layout.ids, taps=taps_at)
