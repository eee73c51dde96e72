"""The frozen CLIP in int8, for the ladder methods (`--opt frozen=int8`), and the measurement of what it costs.

The Prompt-Ladder never back-propagates into the frozen CLIP: only its taps' accuracy is at stake. Every
Linear of both encoders' layers (attention q/k/v, fused into one, and out projections, MLP fc1/fc2)
becomes torch's dynamic int8 Linear (torch.ao.quantization.quantize_dynamic): int8 weights with one
scale per output channel, activations quantised per call from their observed range. The text token
embedding (49408 rows: at the benchmark's CPU size most of the weights left after the Linears) is stored
in 8 bits per row with its own fp32 scale and offset (weight-only, the same function). LayerNorms,
position and patch embeddings and the two output projections stay fp32 (the projections' weights are what
a checkpoint's backbone signature hashes, so a checkpoint loads into an fp32 or an int8 backbone alike).

What an int8 ladder holds while it trains (issue 15's memory target): the text encoder is needed only to
compute the ladder's cached text taps, so between those builds its layers and token embedding are on disk
(`text_encoder`); the image taps autograd keeps for the side network's weight gradients are kept in bf16
(`saved_in_bf16`).

Why torch's own and not torchao: measured on the benchmark's CPU model (width 256, 6 layers, 197 tokens,
32 images in chunks of 8, taps kept; this 2-core CPU, medians of 4 alternated runs), the frozen image
forward took 3419 ms in fp32, 2068 ms with torch's dynamic int8 and 5956 ms with torchao 0.18's
Int8DynamicActivationInt8WeightConfig, which has no fast int8 CPU kernel here. torch's path needs no new
dependency; torch marks torch.ao.quantization deprecated, so a torch without it gets one clear error.
On CUDA torch's dynamic int8 Linear does not run, and no GPU int8 path is wired (none could be tested
here): frozen='int8' on a CUDA backbone is refused.

    python -m ladder_clip.quantize report [--epochs N] [--seeds S ...]

prints the relative error of every tap against fp32, per layer, and the zero-shot and few-shot accuracy
of fp32 and int8 on the learning demo's model (tiny-pretrained) and images (tests/test_pipeline_int8.py asserts the bounds).
"""
import argparse
import contextlib
import copy
import os
import sys
import tempfile
import warnings
import weakref
from typing import Dict, List

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


# ---- the frozen image forward's chunks on threads ---------------------------------------------------------
_POOL = {}  # worker count -> the threads of map_chunks, made on first use and kept


def map_chunks(fn, chunks) -> list:
    """[fn(c) for c in chunks] for the int8 frozen forward's independent image chunks, spread over as many
    threads as torch's intra-op pool has (this one and workers; at most one a chunk), each running its
    ops on its share of the intra-op threads; the pool's setting is restored after. Why: the int8
    forward is many small ops (a 1576-row int8 GEMM, one chunk's attention) that two intra-op threads
    speed up by only ~1.3x on a 2-core CPU, while whole chunks on two threads run side by side (torch's
    ops release the GIL). Measured on the benchmark's model (32 images in chunks of 8, 2 cores): 304 ->
    271 ms, min of 12 alternated runs. Each chunk's result is what the sequential loop gives, bit for
    bit (tested). The caller's no_grad and autocast are thread-local, so each worker enters no_grad and
    autocast-off itself (the int8 forward's own context); two chunks' transients are alive at once."""
    n = min(torch.get_num_threads(), len(chunks))
    if n < 2 or torch.is_grad_enabled():
        return [fn(c) for c in chunks]
    if n - 1 not in _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL[n - 1] = ThreadPoolExecutor(n - 1, thread_name_prefix="ladder-frozen")
    pool = _POOL[n - 1]

    threads = torch.get_num_threads()
    each = max(1, threads // n)  # a many-core machine splits its cores among the chunks

    def work(part):
        torch.set_num_threads(each)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return [fn(c) for c in part]

    futures = []
    try:
        futures = [pool.submit(work, chunks[i::n]) for i in range(1, n)]
        results = [work(chunks[0::n])] + [f.result() for f in futures]
    finally:
        for f in futures:  # none may still be running when the pool's size is set back
            f.cancel() or f.exception()
        torch.set_num_threads(threads)
    out = [None] * len(chunks)
    for i, part in enumerate(results):
        out[i::n] = part
    return out


# ---- the text encoder between uses ------------------------------------------------------------------------
@contextlib.contextmanager
def text_encoder(backbone):
    """The int8 text encoder (layers and token embedding) in memory for the duration, on disk outside it.

    The ladder needs the text encoder only to compute its cached text taps, once per class set; while it
    trains they are three quarters of the int8 weights (at the benchmark's size 17.5 of 23.5 MB, most of it
    the 49408-row embedding). After the first use they are written once to a temporary file (deleted with
    the backbone) and dropped; a new class set reads them back. Any other text forward meanwhile raises
    instead of running without them. An fp32 backbone is left as it is."""
    if not is_int8(backbone):
        yield
        return
    _restore_text(backbone)
    try:
        yield
    finally:
        _offload_text(backbone)


def _text_parts(backbone):
    tm = backbone.clip.text_model
    return tm.encoder, "layers", tm.embeddings, "token_embedding"


def _offload_text(backbone) -> None:
    enc, layers, emb, tok = _text_parts(backbone)
    if isinstance(getattr(emb, tok), _Offloaded):
        return
    if getattr(backbone, "_text_file", None) is None:  # the int8 weights never change: written once
        fd, path = tempfile.mkstemp(prefix="ladder-clip-text-", suffix=".pt")
        os.close(fd)
        weakref.finalize(backbone, _remove, path)
        torch.save({"layers": getattr(enc, layers), "embedding": getattr(emb, tok)}, path)
        backbone._text_file = path
    setattr(enc, layers, nn.ModuleList([_Offloaded()]))
    setattr(emb, tok, _Offloaded())


def _restore_text(backbone) -> None:
    enc, layers, emb, tok = _text_parts(backbone)
    if not isinstance(getattr(emb, tok), _Offloaded):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # qint8 tensors, as in quantize_backbone
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated")  # torch's own unpickling
        parts = torch.load(backbone._text_file, weights_only=False)  # our own file, written above
    setattr(enc, layers, parts["layers"])
    setattr(emb, tok, parts["embedding"])


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


class _Offloaded(nn.Module):
    """Stands where the int8 text encoder's parts were while they are on disk."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("the int8 text encoder is on disk between the ladder's text-cache builds; run text "
                           "forwards inside ladder_clip.quantize.text_encoder(backbone)")


@contextlib.contextmanager
def saved_in_bf16(taps):
    """Autograd keeps the frozen image taps for the side network's weight gradients (the fusions' and the
    down-projection's): at 4 bytes an element they were a third of an int8 ladder step's peak. Within this
    context a tensor saved for backward that is (a view of) one of `taps` is kept in bf16 and given back
    in fp32: the forward is untouched, those weight gradients see the taps rounded by 2^-9 (the int8
    encoder's own error is some 1 %). Text taps are not passed: they are cached, a copy would add memory."""
    ptrs = {t.untyped_storage().data_ptr() for t in taps if t.dtype == torch.float32}

    def pack(t):
        if t.dtype == torch.float32 and not t.requires_grad and t.untyped_storage().data_ptr() in ptrs:
            return _Bf16(t.to(torch.bfloat16))
        return t

    def unpack(t):
        return t.t.float() if isinstance(t, _Bf16) else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Bf16:
    """A packed tap: unpack tells it from a tensor saved in bf16 in the first place (under autocast)."""
    __slots__ = ("t",)

    def __init__(self, t):
        self.t = t


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


# ---- measurement -------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


@torch.no_grad()
def tap_errors(fp32, int8, pixels: torch.Tensor, ids: torch.Tensor) -> Dict[str, List[float]]:
    """Relative L2 error ||int8 - fp32|| / ||fp32|| of every layer's output (the taps) and of the projected
    features, for each encoder: {"vision": [layer 1, .., layer L, features], "text": [...]}."""
    out = {}
    (f, t), (qf, qt) = fp32.encode_image(pixels, taps=True), int8.encode_image(pixels, taps=True)
    out["vision"] = [_rel(q, r) for q, r in zip(qt[1:], t[1:])] + [_rel(qf, f)]
    (f, t), (qf, qt) = fp32.encode_text(ids, taps=True), int8.encode_text(ids, taps=True)
    out["text"] = [_rel(q, r) for q, r in zip(qt[1:], t[1:])] + [_rel(qf, f)]
    return out


def int8_copy(backbone):
    """A quantised deep copy: the fp32 backbone stays as it is for comparison."""
    q = copy.deepcopy(backbone)
    quantize_backbone(q)
    return q


def measure(epochs: int = 8, test_per_class: int = 64, seeds=(1, 2, 3), out: str = None) -> dict:
    """Tap errors on the learning demo's model (tiny-pretrained), and accuracy of fp32 vs int8 on its few-shot set:
    zero-shot CLIP; per seed, the ladder trained with an fp32 backbone and evaluated on fp32 and on int8
    (the same checkpoint), and the ladder trained and evaluated with frozen='int8'."""
    from . import checkpoint as ckpt
    from . import data as D
    from . import pretrain as P
    from .backbone import load_backbone
    from .config import TrainConfig
    from .evaluate import evaluate
    from .methods import build_method
    from .synthetic import make_imagefolder
    from .train import train

    tmp = tempfile.TemporaryDirectory(prefix="ladder-clip-int8-") if out is None else None
    root = tmp.name if tmp else out
    try:
        data = os.path.join(root, "data")
        # the learning demo's set: tiny-pretrained's four unseen classes, on the shifted background
        make_imagefolder(data, [n.replace(" ", "_") for n in P.UNSEEN], train_per_class=16,
                         test_per_class=test_per_class, background=P.SHIFTED_BACKGROUND)
        fp32 = load_backbone("tiny-pretrained")
        int8 = int8_copy(fp32)
        classnames, splits = D.load_data(data, None)
        test = D.readable(splits["test"], classnames, "test/")
        images = D.ImageDataset(test[::max(1, len(test) // 16)], D.Preprocess(fp32.preprocess))
        pixels = torch.stack([images[i][0] for i in range(len(images))])  # 16 test images of every class
        errors = tap_errors(fp32, int8, pixels, fp32.tokenize([f"a photo of a {c}." for c in classnames]))
        dev = torch.device("cpu")
        zero = {name: evaluate(build_method("zeroshot", b, classnames), test, dev)
                for name, b in (("fp32", fp32), ("int8", int8))}
        runs = []
        for seed in seeds:
            acc = {}
            for frozen in FROZEN:  # the ladder's default recipe (CoOp's), `epochs` of it, as the demo runs it
                run = os.path.join(root, f"{frozen}-{seed}")
                cfg = TrainConfig(model="tiny-pretrained", data=data, method="ladder", out=run, shots=16,
                                  epochs=epochs, seed=seed, quiet=True, method_options={"frozen": frozen})
                acc[frozen] = train(cfg)["accuracy"]
            # the fp32-trained prompts, loaded into an int8 backbone: what `eval --frozen int8` does
            header, tensors = ckpt.read_checkpoint(os.path.join(root, f"fp32-{seed}", "prompt.safetensors"))
            method = build_method("ladder", load_backbone("tiny-pretrained"), classnames,
                                  **{**header["config"], "frozen": "int8"})
            ckpt.load_into(method, tensors, "the fp32 checkpoint")
            acc["fp32 checkpoint on int8"] = evaluate(method, test, dev)
            runs.append({"seed": seed, **acc})
        return {"tap_errors": errors, "zero_shot": zero, "ladder": runs, "test_images": len(test), "epochs": epochs,
                "weight_bytes": {"fp32": weight_bytes(fp32), "int8": weight_bytes(int8)}}
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_report(r: dict) -> str:
    pts = lambda a, b: f"{100 * (a - b):+.2f}"  # noqa: E731
    lines = ["relative error of each tap (layer output) and of the features against fp32, frozen CLIP in int8:"]
    for enc, errs in r["tap_errors"].items():
        cells = " ".join(f"L{i + 1}={e:.4f}" for i, e in enumerate(errs[:-1]))
        lines.append(f"  {enc:<6} {cells} features={errs[-1]:.4f}")
    z = r["zero_shot"]
    lines.append(f"accuracy (%) on {r['test_images']} generated test images (tiny-pretrained, its unseen classes "
                 "on a shifted background: the learning demo's set):")
    lines.append(f"  zero-shot: fp32 {100 * z['fp32']:.2f}, int8 {100 * z['int8']:.2f} "
                 f"({pts(z['int8'], z['fp32'])} points)")
    lines.append(f"  ladder, {r['epochs']} epochs   fp32   trained int8 (change)   fp32 checkpoint on int8 (change)")
    for run in r["ladder"]:
        lines.append(f"  seed {run['seed']:<14} {100 * run['fp32']:6.2f}   {100 * run['int8']:6.2f} "
                     f"({pts(run['int8'], run['fp32'])})        {100 * run['fp32 checkpoint on int8']:6.2f} "
                     f"({pts(run['fp32 checkpoint on int8'], run['fp32'])})")
    keys = ("fp32", "int8", "fp32 checkpoint on int8")
    mean = {k: sum(run[k] for run in r["ladder"]) / len(r["ladder"]) for k in keys}
    lines.append(f"  mean {'':<14} {100 * mean['fp32']:6.2f}   {100 * mean['int8']:6.2f} "
                 f"({pts(mean['int8'], mean['fp32'])})        {100 * mean['fp32 checkpoint on int8']:6.2f} "
                 f"({pts(mean['fp32 checkpoint on int8'], mean['fp32'])})")
    w = r["weight_bytes"]
    lines.append(f"backbone weights: fp32 {w['fp32'] / 2**20:.2f} MiB, int8 {w['int8'] / 2**20:.2f} MiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ladder_clip.quantize", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help="tap errors and accuracy change of the int8 frozen CLIP (CPU, minutes)")
    rp.add_argument("--epochs", type=int, default=8, help="ladder training epochs per run (default: %(default)s)")
    rp.add_argument("--test-per-class", type=int, default=64, help="generated test images per class")
    rp.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds (default: 1 2 3)")
    a = ap.parse_args(argv)
    print(format_report(measure(a.epochs, a.test_per_class, a.seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
