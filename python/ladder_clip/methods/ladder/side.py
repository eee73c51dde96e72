"""Side blocks of the Prompt-Ladder initialised from structurally pruned CLIP layers (the ladder's side network).

A CLIP layer of width D is pruned to width d = D / r by keeping, by importance (weight magnitude):
- d residual channels, one set shared by all side blocks (the residual stream runs through them all);
- head_dim / r channels inside every attention head (the head count is kept);
- intermediate / r MLP neurons.
Importance is `score(weight)` summed over the weights touching a channel: |w| (magnitude, the default) or
the squared gradients of a few batches (Fisher, as LST offers; see fisher_scores).
The result is an ordinary HF CLIPEncoderLayer of width d, so APT hooks attach to it like to CLIP; its
attention runs torch's SDPA (the fused CPU/GPU kernel; eager attention was 2x slower at head dim 16), and its
quick_gelu MLP activation is QuickGELU below (docs/benchmarks/2026-12-04-cpu-2core/side_profile.md).

The ladder's ablations (ladder.py's --opt init=random, fusion=sum) use the two other things here:
`fresh_layer`, a layer of the pruned shape initialised as HF builds a new one (nothing copied), and
`SumFusion`, the fusion without its gate.
"""
import math

from typing import Callable, Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F

Score = Callable[[torch.Tensor], torch.Tensor]
QUICK_GELU = 1.702  # CLIP's quick_gelu: x sigmoid(1.702 x)


class _QuickGELU(torch.autograd.Function):
    """x sigmoid(a x) as silu(a x) / a, a = 1.702: torch's fused silu and silu_backward kernels instead of
    the three elementwise passes forward and five backward that autograd makes of HF's x * sigmoid(1.702 x),
    and one tensor saved (a x) instead of two. d/dx silu(a x) / a = silu'(a x), so the backward is one
    silu_backward. Equal to HF's up to float rounding (a few ulp)."""

    @staticmethod
    def forward(ctx, x):
        u = x * QUICK_GELU
        ctx.save_for_backward(u)
        return F.silu(u).div_(QUICK_GELU)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, u)


class QuickGELU(nn.Module):
    """The side blocks' MLP activation where CLIP's is quick_gelu (a fifth of the side step on a CPU before)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuickGELU.apply(x)


def magnitude(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs()


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest scores, in increasing order (kept channels stay in CLIP's order)."""
    return scores.topk(k).indices.sort().values


def residual_importance(layers: Sequence[nn.Module], score: Score = magnitude) -> torch.Tensor:
    """Importance of every weight that reads or writes each residual channel, summed over the layers."""
    total = 0
    for L in layers:
        a, m = L.self_attn, L.mlp
        total = total + sum(score(w.weight).sum(0) for w in (a.q_proj, a.k_proj, a.v_proj, m.fc1)) \
            + score(a.out_proj.weight).sum(1) + score(m.fc2.weight).sum(1) \
            + score(L.layer_norm1.weight) + score(L.layer_norm2.weight)
    return total


def fresh_layer(layer: nn.Module, width: int, reduction: int) -> nn.Module:
    """A new CLIPEncoderLayer of the shape `prune_layer` gives `layer` (width `width`, the head count kept,
    head dim and MLP / `reduction`), initialised as HF initialises a new layer: nn.Linear's default init
    from torch's generator, LayerNorms at one and zero."""
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    a, m = layer.self_attn, layer.mlp
    if a.head_dim % reduction:
        raise ValueError(f"ladder: head dim {a.head_dim} is not divisible by the reduction {reduction}; "
                         f"pass --opt reduction=N with N dividing {a.head_dim}")
    cfg = CLIPTextConfig(hidden_size=width, num_attention_heads=a.num_heads,
                         intermediate_size=m.fc1.out_features // reduction, hidden_act=layer.mlp.config.hidden_act,
                         layer_norm_eps=layer.layer_norm1.eps, attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    new = CLIPEncoderLayer(cfg).to(a.q_proj.weight.device).float().requires_grad_(True)
    if cfg.hidden_act == "quick_gelu":
        new.mlp.activation_fn = QuickGELU()
    return new


def prune_layer(layer: nn.Module, keep: torch.Tensor, reduction: int, score: Score = magnitude) -> nn.Module:
    """A new CLIPEncoderLayer of width len(keep), its weights copied from the kept channels of `layer`."""
    a, m = layer.self_attn, layer.mlp
    heads, hd = a.num_heads, a.head_dim
    new = fresh_layer(layer, len(keep), reduction)  # checks the reduction; its init is overwritten below
    hd_new, inter = hd // reduction, new.mlp.fc1.out_features
    head = (score(a.q_proj.weight).sum(1) + score(a.k_proj.weight).sum(1) + score(a.v_proj.weight).sum(1)
            + score(a.out_proj.weight).sum(0)).view(heads, hd)
    inner = torch.cat([h * hd + top_indices(head[h], hd_new) for h in range(heads)])
    neurons = top_indices(score(m.fc1.weight).sum(1) + score(m.fc2.weight).sum(0), inter)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            src, dst = getattr(a, name), getattr(new.self_attn, name)
            dst.weight.copy_(src.weight[inner][:, keep])
            dst.bias.copy_(src.bias[inner])
        new.self_attn.out_proj.weight.copy_(a.out_proj.weight[keep][:, inner])
        new.self_attn.out_proj.bias.copy_(a.out_proj.bias[keep])
        new.mlp.fc1.weight.copy_(m.fc1.weight[neurons][:, keep])
        new.mlp.fc1.bias.copy_(m.fc1.bias[neurons])
        new.mlp.fc2.weight.copy_(m.fc2.weight[keep][:, neurons])
        new.mlp.fc2.bias.copy_(m.fc2.bias[keep])
        for ln in ("layer_norm1", "layer_norm2"):
            getattr(new, ln).weight.copy_(getattr(layer, ln).weight[keep])
            getattr(new, ln).bias.copy_(getattr(layer, ln).bias[keep])
    return new


class SumFusion(nn.Module):
    """The ladder's fusion without its gate (--opt fusion=sum): out = side + tap @ weight.T + bias, the tap
    detached. Plain torch: lk.gated_fusion computes the gated blend, which has no gate-free form; here
    autograd keeps the tap for the weight's gradient (as the op does without tap_dtype) and nothing for
    the sum. Parameters are named as GatedLadderFusion's, less the gate, and initialised as nn.Linear."""

    def __init__(self, tap_dim: int, side_dim: int, device=None):
        super().__init__()
        self.tap_dim, self.side_dim = tap_dim, side_dim
        self.weight = nn.Parameter(torch.empty(side_dim, tap_dim, device=device))
        self.bias = nn.Parameter(torch.empty(side_dim, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -1 / math.sqrt(tap_dim), 1 / math.sqrt(tap_dim))

    def forward(self, side: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        dt = side.dtype  # under autocast the tap and the fp32 parameters follow the side state, as the op does
        return side + F.linear(tap.detach().to(dt), self.weight.to(dt), self.bias.to(dt))

    def extra_repr(self) -> str:
        return f"tap_dim={self.tap_dim}, side_dim={self.side_dim}, gate=none"


def evenly_spaced(n_layers: int, k: int) -> List[int]:
    """k layer indices spread over n_layers, always ending with the last layer."""
    return [round((i + 1) * n_layers / k) - 1 for i in range(k)]


def selection(rows: torch.Tensor, width: int) -> torch.Tensor:
    """A (len(rows), width) 0/1 matrix picking the channels `rows`: a down-projection that starts as pruning."""
    w = torch.zeros(len(rows), width, device=rows.device)
    w[torch.arange(len(rows), device=rows.device), rows] = 1.0
    return w


def fisher_scores(backbone, classnames: Sequence[str], batches) -> Score:
    """Squared gradients of the zero-shot CLIP loss over `batches` of (pixels, labels), for every encoder
    weight: LST's Fisher importance. It backpropagates through CLIP once, at initialisation only."""
    layers = list(backbone.clip.text_model.encoder.layers) + list(backbone.clip.vision_model.encoder.layers)
    params = [p for L in layers for p in L.parameters()]
    acc: Dict[int, torch.Tensor] = {id(p): torch.zeros_like(p) for p in params}
    ids = backbone.tokenize([f"a photo of a {c}." for c in classnames])
    for p in params:
        p.requires_grad_(True)
    try:
        for x, y in batches:
            txt = F.normalize(backbone.encode_text(ids), dim=-1)
            img = F.normalize(backbone.encode_image(x.to(backbone.device)), dim=-1)
            loss = F.cross_entropy(backbone.logit_scale * img @ txt.t(), y.to(backbone.device))
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc[id(p)] += g.detach() ** 2
    finally:
        for p in params:
            p.requires_grad_(False)
    return lambda w: acc[id(w)] if id(w) in acc else w.detach().abs()
