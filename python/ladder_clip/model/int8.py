"""The frozen CLIP in int8, for the ladder methods (`--opt frozen=int8`).

The Prompt-Ladder never back-propagates into the frozen CLIP: only its taps' accuracy is at stake. Every
Linear of both encoders' layers (attention q/k/v, fused into one, and out projections, MLP fc1/fc2)
becomes torch's dynamic int8 Linear (torch.ao.quantization.quantize_dynamic): int8 weights with one
scale per output channel, activations quantised per call from their observed range. The text token
embedding (49408 rows: at the benchmark's CPU size most of the weights left after the Linears) is stored
in 8 bits per row with its own fp32 scale and offset (weight-only, the same function). LayerNorms,
position and patch embeddings and the two output projections stay fp32 (the projections' weights are what
a checkpoint's backbone signature hashes, so a checkpoint loads into an fp32 or an int8 backbone alike).

How the ladder runs the int8 encoders while it trains (the text encoder on disk between uses, the image
taps saved in bf16, image chunks on threads) is ladder_clip/methods/ladder/frozen.py; what int8 costs in
accuracy is measured by `python -m ladder_clip.apps.int8_report` (also `python -m ladder_clip.quantize
report`).

Why torch's own and not torchao: torchao's dynamic int8 config has no fast int8 CPU kernel here and ran
slower than fp32 (docs/int8.md); torch's path needs no new dependency. torch marks torch.ao.quantization
deprecated, so a torch without it gets one clear error.
On CUDA torch's dynamic int8 Linear does not run, and no GPU int8 path is wired (none could be tested
here): frozen='int8' on a CUDA backbone is refused.
"""
import copy
import warnings
from typing import List

import torch
from torch import nn
from torch.nn import functional as F

FROZEN = ("fp32", "int8")
# each layer's Linears once quantised: q, k and v as one (FusedAttention)
LINEARS = ("self_attn.qkv", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def check_available(backbone) -> None:
    """ValueError when the int8 path cannot run: the backbone is not on CPU, or this torch lacks it."""
    if backbone.device.type != "cpu":
        raise ValueError(f"frozen='int8' runs on CPU only (torch's dynamic int8 Linear); no int8 GPU path is "
                         f"wired for {backbone.device.type}: use frozen='fp32' with --precision bf16 there")
    quantizer()


def quantizer():
    """quantize_dynamic and the qconfigs per module type (per-channel int8 Linear, 8-bit per-row Embedding)."""
    try:
        from torch.ao.quantization import (float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig,
                                           quantize_dynamic)
    except ImportError as exc:  # torch marks the module deprecated: say what is missing, not a traceback
        raise ValueError(f"frozen='int8' needs torch.ao.quantization.quantize_dynamic, which torch "
                         f"{torch.__version__} does not have ({exc})") from None
    return quantize_dynamic, {nn.Linear: per_channel_dynamic_qconfig, nn.Embedding: float_qparams_weight_only_qconfig}


def is_int8(backbone) -> bool:
    return getattr(backbone, "frozen", "fp32") == "int8"


def quantize_backbone(backbone) -> None:
    """Both encoders' layer Linears -> dynamic int8, the token embedding -> 8 bits, in place (the fp32
    weights are freed); idempotent. Whatever reads the fp32 weights (the side network's pruning, Fisher
    scores) must run before."""
    if is_int8(backbone):
        return
    check_available(backbone)
    quantize_dynamic, qconfigs = quantizer()
    with warnings.catch_warnings():
        # torch's deprecation notices of torch.ao.quantization and of qint8 tensors: said once, in the
        # module docstring; on every run they would be a wall of warnings in front of the user's output
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        for layer in layers(backbone):
            fuse_layer(layer)
        targets = [(layer.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
                   for layer in layers(backbone) for name in LINEARS]
        targets.append((backbone.clip.text_model.embeddings, "token_embedding"))
        for owner, attr in targets:
            mod = getattr(owner, attr)
            if type(mod) in qconfigs:  # exact types only: a module something has replaced is left alone
                holder = nn.Sequential(mod)  # quantize_dynamic swaps children, not the module it is given
                quantize_dynamic(holder, {type(mod): qconfigs[type(mod)]}, inplace=True)
                setattr(owner, attr, holder[0])
    backbone.frozen = "int8"


def fuse_layer(layer: nn.Module) -> None:
    """CLIP's attention with q, k and v as one Linear, and its MLP's QuickGELU folded into one in-place
    SiLU (fold_quick_gelu): the frozen encoder then quantises each layer input once for the three
    projections (the int8 Linear quantises its input per call) and makes one GEMM of them. Per-channel
    weight scales and the per-tensor input scale are what the three Linears had, so the outputs are theirs.
    Layers of another structure are left as they are."""
    a = layer.self_attn
    if all(type(getattr(a, n, None)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj", "out_proj")):
        layer.self_attn = FusedAttention(a.q_proj, a.k_proj, a.v_proj, a.out_proj, a.num_heads, a.scale)
    fold_quick_gelu(layer.mlp)


QUICK_GELU = 1.702  # CLIP's QuickGELU: h * sigmoid(1.702 h)


def fold_quick_gelu(mlp: nn.Module) -> None:
    """fc2(quick_gelu(fc1 x)) rewritten as fc2'(silu(fc1' x)), fc1' = 1.702 fc1 and fc2' = fc2 / 1.702:
    quick_gelu(h) = silu(1.702 h) / 1.702, so it is the same function (to fp32 rounding), and the
    activation becomes one fused pass over the (N, 4D) hidden state, in place under no_grad, instead of
    three. The frozen weights only: per-channel int8 weight scales and the per-tensor input scale then
    absorb the constants. MLPs of another activation or structure are left as they are."""
    act, fc1, fc2 = (getattr(mlp, n, None) for n in ("activation_fn", "fc1", "fc2"))
    if type(act).__name__ != "QuickGELUActivation" or type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
        return
    with torch.no_grad():
        fc1.weight.mul_(QUICK_GELU)
        if fc1.bias is not None:
            fc1.bias.mul_(QUICK_GELU)
        fc2.weight.div_(QUICK_GELU)
    mlp.activation_fn = SiLUInPlace()


class FusedAttention(nn.Module):
    """Multi-head attention from one (D -> 3D) projection; the call signature and result of HF's CLIP
    attention ((output, None)); an additive mask as HF passes it (the text encoder's causal one)."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, out: nn.Linear, heads: int, scale: float):
        super().__init__()
        d = q.in_features
        self.qkv = nn.Linear(d, 3 * d, device=q.weight.device)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        self.qkv.requires_grad_(False)
        self.out_proj, self.num_heads, self.scale = out, heads, scale

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        b, n, d = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scale)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d)), None


class SiLUInPlace(nn.Module):
    """silu(x), overwriting x when nothing records it for backward: no second (N, 4D) buffer per frozen
    layer call."""

    def forward(self, x):
        return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


def layers(backbone) -> List[nn.Module]:
    return list(backbone.clip.text_model.encoder.layers) + list(backbone.clip.vision_model.encoder.layers)


def weight_bytes(backbone) -> int:
    """Bytes of the backbone's weights as stored: its parameters and buffers, plus each quantised module's
    packed weight (1 byte an element), per-channel scales and zero points, and fp32 bias."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    total = sum(size(t) for t in list(backbone.parameters()) + list(backbone.buffers()))
    for m in backbone.modules():
        if getattr(m, "_packed_params", None) is not None and callable(getattr(m, "weight", None)):
            w, b = m.weight(), m.bias() if callable(getattr(m, "bias", None)) else None
            total += w.numel() + size(w.q_per_channel_scales()) + size(w.q_per_channel_zero_points())
            total += 0 if b is None else size(b)
    return total


def int8_copy(backbone):
    """A quantised deep copy: the fp32 backbone stays as it is for comparison."""
    q = copy.deepcopy(backbone)
    quantize_backbone(q)
    return q
