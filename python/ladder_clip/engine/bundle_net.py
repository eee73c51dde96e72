"""The networks a bundle runs (engine/bundle.py), in plain torch: nothing here imports transformers, so an
exported model runs where only torch and this package are installed.

CLIP's image encoder keeps the parameter names of Hugging Face's CLIPVisionModel (embeddings.patch_embedding,
encoder.layers.N.self_attn.q_proj, ...) and computes what it computes (sdpa attention with the same scale,
the same LayerNorms and activations), so an export copies the state dict across and the logits are the
checkpoint path's. On top of it, what a method adds to the image side: deep visual prompts (VPT; MaPLe's,
whose coupling is constant once trained), APT beside each attention, or the Prompt-Ladder's side network.
An int8 backbone's layers are model/int8.py's (q/k/v fused, torch's dynamic int8 Linear, QuickGELU folded
into fc1/fc2), rebuilt from the stored int8 weights.
"""
import warnings
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

import ladder_kernels as lk

from ..model import int8 as Q


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name, self.fn = name, ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)


class Attention(nn.Module):
    """HF's CLIPAttention with sdpa: q, k, v, out projections, scale head_dim ** -0.5."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))
        self.num_heads, self.scale = heads, (width // heads) ** -0.5

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, width: int, inter: int, act: str):
        super().__init__()
        self.fc1, self.activation_fn, self.fc2 = nn.Linear(width, inter), Activation(act), nn.Linear(inter, width)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class Layer(nn.Module):
    """HF's CLIPEncoderLayer (pre-LN attention and MLP), with an optional APTPrompt on the attention's output
    (what lk.nn.attach_apt's hook does to HF's layer)."""

    def __init__(self, width: int, heads: int, inter: int, act: str, eps: float, apt: Optional[dict] = None):
        super().__init__()
        self.self_attn = Attention(width, heads)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, inter, act)
        self.apt = lk.nn.APTPrompt(width, apt["num_prompts"], apt["rank"]) if apt else None

    def forward(self, x, mask=None):
        h = self.layer_norm1(x)
        a = self.self_attn(h, mask)
        a = a[0] if isinstance(a, tuple) else a  # model/int8.py's FusedAttention returns HF's (output, None)
        if self.apt is not None:
            a = self.apt(h, a)
        x = x + a
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, width: int, patch: int, image_size: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.patch_embedding = nn.Conv2d(3, width, patch, patch, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch) ** 2 + 1, width)

    def forward(self, pixels):
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1)
        return x + self.position_embedding.weight[None]


class Encoder(nn.Module):
    def __init__(self, layers: List[Layer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class VisionModel(nn.Module):
    """CLIPVisionModel's vision_model: embeddings, pre-LayerNorm, the layers, post-LayerNorm."""

    def __init__(self, v: dict, apt: Optional[dict] = None):
        super().__init__()
        w = v["width"]
        self.embeddings = Embeddings(w, v["patch"], v["image_size"])
        self.pre_layrnorm, self.post_layernorm = nn.LayerNorm(w, eps=v["eps"]), nn.LayerNorm(w, eps=v["eps"])
        self.encoder = Encoder([Layer(w, v["heads"], v["intermediate"], v["act"], v["eps"], apt)
                                for _ in range(v["layers"])])


class ImageEncoder(nn.Module):
    """CLIP's image tower and projection: what CLIPBackbone.encode_image runs, with its hook, taps and insert."""

    def __init__(self, v: dict, apt: Optional[dict] = None):
        super().__init__()
        self.vision_model = VisionModel(v, apt)
        self.visual_projection = nn.Linear(v["width"], v["embed_dim"], bias=False)

    def forward(self, pixels, hook=None, taps=None, insert=None):
        vm = self.vision_model
        h = vm.embeddings(pixels)
        if insert is not None:
            h = insert(h)
        h = vm.pre_layrnorm(h)
        keep = set(taps or ())
        outs = {0: h} if 0 in keep else {}
        for i, layer in enumerate(vm.encoder.layers):
            if hook is not None:
                h = hook(i, h)
            h = layer(h)
            if i + 1 in keep:
                outs[i + 1] = h
        feats = self.visual_projection(vm.post_layernorm(h[:, 0]))
        return (feats, [outs[i] for i in taps]) if taps else feats


def insert_prompts(h: torch.Tensor, prompt: torch.Tensor, replace: int = 0) -> torch.Tensor:
    """[CLS, prompt, patches] from [CLS, (old prompts of length `replace`), patches] (methods/vpt.py's)."""
    return lk.assemble_prompts(h[:, :1], h[:, 1 + replace:], prompt.to(h.dtype))


class LadderSide(nn.Module):
    """The Prompt-Ladder's image side (methods/ladder/ladder.py, Ladder.image_features) from CLIP's image
    feature and taps: down-projection, the merged visual prompt after the class token, per block a gated
    fusion of the tap (prompt rows have none) then the pruned block, the final LayerNorm, and the gated
    blend of the up-projected class token with CLIP's feature."""

    def __init__(self, s: dict, tap_width: int, embed_dim: int):
        super().__init__()
        d, k = s["width"], len(s["v_layers"])
        apt = {"num_prompts": s["apt_prompts"], "rank": s["apt_rank"]} if s["apt"] else None
        self.n_visual = s["n_visual"]
        self.blocks = nn.ModuleList(Layer(d, s["heads"], s["intermediate"], s["act"], s["eps"], apt) for _ in range(k))
        self.ln = nn.LayerNorm(d, eps=s["ln_eps"])
        self.down_v = nn.Linear(tap_width, d, bias=False)
        self.fuse_v = nn.ModuleList(lk.nn.GatedLadderFusion(tap_width, d, temperature=s["temperature"])
                                    for _ in range(k))
        self.up_v = nn.Linear(d, embed_dim, bias=False)
        self.gate_v = nn.Parameter(torch.zeros(()))
        self.register_buffer("visual", torch.zeros(self.n_visual, d))

    def forward(self, clip_feat, taps):
        s0 = self.down_v(taps[0].to(self.down_v.weight.dtype))
        s = insert_prompts(s0, self.visual)
        a, b = 1, 1 + self.n_visual
        for blk, f, tap in zip(self.blocks, self.fuse_v, taps[1:]):
            fused = f(torch.cat([s[:, :a], s[:, b:]], 1), tap)  # prompt tokens have no tap
            s = blk(torch.cat([fused[:, :a], s[:, a:b], fused[:, a:]], 1))
        s = self.ln(s)
        g = torch.sigmoid(self.gate_v)
        return (1 - g) * clip_feat + g * self.up_v(s[:, 0]).to(clip_feat.dtype)


# ---- an int8 backbone's layers --------------------------------------------------------------------------
INT8_SUFFIXES = (".int8", ".scale", ".zero_point")


def int8_linears(layer_prefix: str):
    """The names of one int8 layer's quantised Linears (model/int8.py LINEARS)."""
    return [f"{layer_prefix}.{name}" for name in Q.LINEARS]


def quantised_linear(t: dict, name: str) -> nn.Module:
    """torch's dynamic int8 Linear from the stored int8 weight, per-channel scales and zero points, bias."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    w8 = t[name + ".int8"]
    with warnings.catch_warnings():  # torch's deprecation notices of qint8 tensors (model/int8.py says why)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        m = QLinear(w8.shape[1], w8.shape[0], dtype=torch.qint8)
        w = torch._make_per_channel_quantized_tensor(w8, t[name + ".scale"], t[name + ".zero_point"], 0)
        bias = t.get(name + ".bias")
        m.set_weight_bias(w, None if bias is None else bias.float())  # fp32, also from an fp16 bundle
    return m


def make_int8(layer: Layer, t: dict, prefix: str, folded: bool) -> None:
    """The layer as model/int8.py leaves it: FusedAttention over int8 q/k/v and out projections, int8 fc1 and
    fc2, and QuickGELU folded into them as one in-place SiLU when it was."""
    old = layer.self_attn
    att = Q.FusedAttention.__new__(Q.FusedAttention)
    nn.Module.__init__(att)
    att.qkv = quantised_linear(t, f"{prefix}.self_attn.qkv")
    att.out_proj = quantised_linear(t, f"{prefix}.self_attn.out_proj")
    att.num_heads, att.scale = old.num_heads, old.scale
    layer.self_attn = att
    layer.mlp.fc1 = quantised_linear(t, f"{prefix}.mlp.fc1")
    layer.mlp.fc2 = quantised_linear(t, f"{prefix}.mlp.fc2")
    if folded:
        layer.mlp.activation_fn = Q.SiLUInPlace()


def int8_tensors(module: nn.Module, prefix: str) -> dict:
    """The stored form of every dynamic int8 Linear in `module` (name.int8, .scale, .zero_point, .bias)."""
    out = {}
    for name, m in module.named_modules():
        if getattr(m, "_packed_params", None) is None or not callable(getattr(m, "weight", None)):
            continue
        w, b = m.weight(), m.bias()
        key = f"{prefix}{name}"
        out[key + ".int8"] = w.int_repr()
        out[key + ".scale"] = w.q_per_channel_scales()
        out[key + ".zero_point"] = w.q_per_channel_zero_points()
        if b is not None:
            out[key + ".bias"] = b.detach()
    return out
