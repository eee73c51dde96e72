"""Bundles: one safetensors file holding all that inference needs, written by `ladder-clip export`, read by
`predict` and `eval`. Reading one needs torch and this package only (not transformers, not the training
data): the image side runs on engine/bundle_net.py's plain-torch networks.

What it holds (metadata key "ladder_clip_bundle", a JSON header; docs in the header's own fields):
- format "ladder_clip_bundle", version 1; method and its config; class names; source (the checkpoint's
  name, epoch and backbone signature); precision ({"weights": "fp32" | "fp16" (CLIP's image weights, fp16
  only when that is lossless, as for OpenAI's fp16 checkpoints), "frozen": "fp32" | "int8"});
- "vision": CLIP's image-tower config, "preprocess": its eval transform, "kind" + "info": how the method's
  image side runs: "plain" (CLIP's encoder: zeroshot, coop, rlp), "deep_prompts" (vpt, maple: per-layer
  visual prompts), "apt" (an APTPrompt beside each attention), "ladder" (the side network);
- tensors: "class_features" (C, E), the normalised class text features (every method here computes them
  without the image, so no text encoder is stored: CoOp's prompt, RLP's merged one, the ladder's text
  side, MaPLe's deep text prompts all end there), "logit_scale", the image tower under "image." (int8 Linears
  as .int8 / .scale / .zero_point / .bias), and the method's image-side tensors ("prompts", "side.*").
A file is checked field by field and tensor by tensor (names and shapes against the network its header
describes, built on the meta device first) before anything is allocated or run.
"""
import contextlib
import json
import os
import time
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..base import files
from ..base.errors import UserError
from ..base.runtime import check_device
from ..model import int8 as Q
from . import bundle_net as N
from .bundle_file import CHECKPOINT_KEY, META_KEY, is_bundle, safetensors_metadata  # noqa: F401

FORMAT, VERSION = "ladder_clip_bundle", 1
KINDS = ("plain", "deep_prompts", "apt", "ladder")


# ---- writing ----------------------------------------------------------------------------------------------
def vision_config(backbone) -> dict:
    vc = backbone.clip.config.vision_config
    v = dict(width=vc.hidden_size, layers=vc.num_hidden_layers, heads=vc.num_attention_heads,
             intermediate=vc.intermediate_size, patch=vc.patch_size, image_size=vc.image_size,
             act=vc.hidden_act, eps=vc.layer_norm_eps, embed_dim=backbone.embed_dim, folded=False)
    if v["act"] not in N.ACTIVATIONS:
        raise UserError(f"export: the model's image activation {v['act']!r} is not one a bundle runs "
                        f"({', '.join(N.ACTIVATIONS)})")
    if Q.is_int8(backbone):
        v["folded"] = isinstance(backbone.clip.vision_model.encoder.layers[0].mlp.activation_fn, Q.SiLUInPlace)
    return v


def bundle_contents(method, source: dict):
    """(header, tensors) of `method`'s bundle. The class features are computed here, in fp32 and eval mode
    (for an int8 ladder that quantises the backbone, as its first eval forward would)."""
    b = method.backbone
    method.eval()
    with torch.no_grad():
        class_features = method.class_features()
        state = method.inference_state()
        if method.cfg.get("frozen") == "int8":
            Q.quantize_backbone(b)
    kind, info, own = state["kind"], dict(state["info"]), state["tensors"]
    int8 = Q.is_int8(b)
    tensors = {"class_features": class_features, "logit_scale": b.logit_scale.detach().float().reshape(())}
    vm = b.clip.vision_model
    quantised = tuple(f"{n}." for n, m in vm.named_modules() if getattr(m, "_packed_params", None) is not None)
    for k, t in vm.state_dict().items():  # APT's prompts come from the method, int8 Linears in their own form
        if isinstance(t, torch.Tensor) and not k.startswith(("apt_prompts.",) + quantised):
            tensors[f"image.vision_model.{k}"] = t
    tensors["image.visual_projection.weight"] = b.clip.visual_projection.weight
    if int8:
        tensors.update(N.int8_tensors(vm, "image.vision_model."))
    if kind == "deep_prompts":
        tensors["prompts"] = own["prompts"]
        info.update(depth=own["prompts"].shape[0], n_prompts=own["prompts"].shape[1])
    elif kind == "apt":  # "<layer>.<tensor>" -> the layer's own APT
        for k, v in own.items():
            i, rest = k.split(".", 1)
            tensors[f"image.vision_model.encoder.layers.{i}.apt.{rest}"] = v
    elif kind == "ladder":
        for k, v in own.items():
            if k.startswith("apt."):  # apt.<block>.<tensor> -> that block's own APT
                _, i, rest = k.split(".", 2)
                k = f"blocks.{i}.apt.{rest}"
            tensors[f"side.{k}"] = v
    elif kind != "plain":
        raise ValueError(f"export: method {method.name!r} has an image side of unknown kind {kind!r}")
    tensors = {k: (v.float() if v.is_floating_point() and v.dtype != torch.float64 else v).detach().cpu()
               .contiguous().clone() for k, v in tensors.items()}
    # CLIP's weights in fp16 when that loses nothing (OpenAI's checkpoints are fp16): half the bytes, same logits
    image = [k for k, v in tensors.items() if k.startswith("image.") and v.dtype == torch.float32]
    weights = "fp16" if all(torch.equal(tensors[k], tensors[k].half().float()) for k in image) else "fp32"
    if weights == "fp16":
        tensors.update({k: tensors[k].half() for k in image})
    header = {"format": FORMAT, "version": VERSION, "method": method.name, "config": method.config(),
              "classnames": list(method.classnames), "kind": kind, "info": info, "vision": vision_config(b),
              "preprocess": dict(b.preprocess), "precision": {"weights": weights, "frozen": "int8" if int8 else "fp32"},
              "source": {**source, "backbone": b.signature()}}
    check_tensors(header, tensors, "export")  # the exporter's own consistency: the loader expects exactly these
    return header, tensors


def write_bundle(path: str, method, source: dict) -> dict:
    """The bundle of `method` at `path`, atomically (a kill leaves the old file or none, never half of one)."""
    from safetensors.torch import save_file

    header, tensors = bundle_contents(method, source)
    files.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(header)}))
    return header


# ---- the network a header describes -----------------------------------------------------------------------
class BundleModel(nn.Module):
    """Logits of images against the stored class features: the method's forward, from the bundle."""

    def __init__(self, header: dict):
        super().__init__()
        v, kind, info = header["vision"], header["kind"], header["info"]
        self.header, self.kind, self.classnames = header, kind, list(header["classnames"])
        self.method, self.frozen = header["method"], header["precision"]["frozen"]
        self.preprocess = header["preprocess"]  # what data.loader reads (as it reads a backbone's)
        self.image = N.ImageEncoder(v, apt=info if kind == "apt" else None)
        if kind == "deep_prompts":
            self.register_buffer("prompts", torch.zeros(info["depth"], info["n_prompts"], v["width"]))
        if kind == "ladder":
            self.side = N.LadderSide(info, v["width"], v["embed_dim"])
        self.register_buffer("class_features", torch.zeros(len(self.classnames), v["embed_dim"]))
        self.register_buffer("logit_scale", torch.zeros(()))

    def int8_prefixes(self):
        if self.frozen != "int8":
            return []
        return [f"image.vision_model.encoder.layers.{i}" for i in range(len(self.image.vision_model.encoder.layers))]

    def _frozen(self):
        """int8: autocast off (the int8 Linear takes fp32), as the ladder runs its frozen int8 forward."""
        return torch.autocast("cpu", enabled=False) if self.frozen == "int8" else contextlib.nullcontext()

    def image_features(self, pixels):
        if self.kind == "deep_prompts":
            p = self.prompts
            n, depth = p.shape[1], p.shape[0]

            def hook(i, h):
                return N.insert_prompts(h, p[i], n) if 0 < i < depth else h

            with self._frozen():
                return self.image(pixels, hook=hook, insert=lambda h: N.insert_prompts(h, p[0]))
        if self.kind != "ladder":
            with self._frozen():
                return self.image(pixels)
        clip_feat, taps = self._ladder_taps(pixels)
        return self.side(clip_feat, taps)

    def _ladder_taps(self, pixels):
        """CLIP's features and the taps, `frozen_chunk` images at a time (methods/ladder/ladder.py's
        _frozen_image, whose chunking an int8 forward's per-call activation scales depend on)."""
        from ..methods.ladder.frozen import map_chunks
        from ..methods.ladder.ladder import FROZEN_CHUNK_CPU

        at = [0] + [i + 1 for i in self.header["info"]["v_layers"]]
        chunk = self.header["info"]["frozen_chunk"]
        if chunk == "auto":
            chunk = 0 if pixels.is_cuda else FROZEN_CHUNK_CPU
        chunks = pixels.split(chunk or len(pixels))
        with torch.no_grad(), self._frozen():
            if self.frozen == "int8":
                parts = map_chunks(lambda c: self.image(c, taps=at), chunks)
            else:
                parts = [self.image(c, taps=at) for c in chunks]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), [torch.cat([p[1][i] for p in parts]) for i in range(len(at))]

    def text_features(self):
        return self.class_features

    def forward(self, pixels, text=None):
        text = self.class_features if text is None else text
        img = F.normalize(self.image_features(pixels).float(), dim=-1)
        return self.logit_scale.float() * img @ F.normalize(text.float(), dim=-1).t()


def _expected(header: dict) -> dict:
    """{name: shape} of every tensor the header's network needs, from the network built on the meta device
    (nothing allocated): the int8 layers' Linears replaced by their stored int8 form."""
    with torch.device("meta"):
        model = BundleModel(header)
    want = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for prefix in model.int8_prefixes():
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                want.pop(f"{prefix}.{name}.{p}")
        w, inter = header["vision"]["width"], header["vision"]["intermediate"]
        for name, (out, inp) in zip(N.int8_linears(prefix), ((3 * w, w), (w, w), (inter, w), (w, inter))):
            want.update({name + ".int8": (out, inp), name + ".scale": (out,), name + ".zero_point": (out,),
                         name + ".bias": (out,)})
    return want


def check_tensors(header: dict, tensors: dict, where: str) -> None:
    want = _expected(header)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise UserError(f"{where}: its tensors do not fit its header (missing {missing[:3]}, unexpected {extra[:3]})")
    weights = torch.float16 if header["precision"]["weights"] == "fp16" else torch.float32
    for k, shape in want.items():
        t = tensors[k]
        parts = k.split(".")
        dtype = weights if k.startswith("image.") else torch.float32
        if len(parts) > 2 and parts[-2] in _QNAMES:
            dtype = _INT8_DTYPES.get(parts[-1], dtype)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise UserError(f"{where}: tensor {k} is {t.dtype} {tuple(t.shape)}, its header needs {dtype} {shape}")


_QNAMES = ("qkv", "out_proj", "fc1", "fc2")  # an int8 layer's Linears (their fp32 names are other tensors')
_INT8_DTYPES = {"int8": torch.int8, "scale": torch.float64, "zero_point": torch.int64}


# ---- reading ----------------------------------------------------------------------------------------------
_INT_FIELDS = {"width": 1 << 14, "layers": 256, "heads": 1024, "intermediate": 1 << 16, "patch": 1024,
               "image_size": 1 << 14, "embed_dim": 1 << 14}


def _check_header(h, where: str) -> dict:
    from ..methods import METHODS

    if not isinstance(h, dict):
        raise UserError(f"{where}: its {META_KEY} metadata must be a JSON object")
    if h.get("format") != FORMAT or h.get("version") != VERSION:
        raise UserError(f"{where} is a bundle of format {h.get('format')!r} version {h.get('version')!r}; this "
                        f"ladder-clip reads {FORMAT!r} version {VERSION}: export it again with this version")
    for key, kind in (("method", str), ("config", dict), ("classnames", list), ("kind", str), ("info", dict),
                      ("vision", dict), ("preprocess", dict), ("precision", dict)):
        if not isinstance(h.get(key), kind):
            raise UserError(f"{where}: header field {key!r} must be a {kind.__name__}")
    names = h["classnames"]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{where}: header field 'classnames' must list class names")
    if h["method"] not in METHODS or h["kind"] not in KINDS:
        raise UserError(f"{where}: unknown method {h['method']!r} or image side {h['kind']!r}")
    v = h["vision"]
    for k, top in _INT_FIELDS.items():
        if isinstance(v.get(k), bool) or not isinstance(v.get(k), int) or not 1 <= v[k] <= top:
            raise UserError(f"{where}: vision field {k!r} must be an integer in 1..{top}, got {v.get(k)!r}")
    if v["width"] % v["heads"] or v.get("act") not in N.ACTIVATIONS or h["precision"].get("frozen") not in Q.FROZEN \
            or h["precision"].get("weights") not in ("fp32", "fp16"):
        raise UserError(f"{where}: its vision config or precision is not one this version runs")
    info = h["info"]
    if h["kind"] == "ladder" and not (
            isinstance(info.get("v_layers"), list) and info["v_layers"]
            and all(isinstance(i, int) and 0 <= i < v["layers"] for i in info["v_layers"])
            and all(isinstance(info.get(k), int) and info[k] > 0 for k in ("width", "heads", "n_visual"))
            and info["width"] % info["heads"] == 0 and info.get("act") in N.ACTIVATIONS):
        raise UserError(f"{where}: its ladder info (tapped layers, side width, heads, activation) is not valid")
    return h


def read_bundle(path: str):
    """(header, tensors) of a bundle; one UserError for a missing, corrupt, foreign or other-version file."""
    from safetensors import safe_open

    where = f"bundle {path!r}"
    if not os.path.isfile(path):
        raise UserError(f"{where} does not exist")
    meta = safetensors_metadata(path)
    if meta is None:
        raise UserError(f"{where} is not a safetensors file (expected a file written by ladder-clip export)")
    if META_KEY not in meta:
        what = "a prompt checkpoint" if CHECKPOINT_KEY in meta else "not written by ladder-clip"
        raise UserError(f"{where} is {what}, not a bundle (ladder-clip export makes one from a checkpoint)")
    try:
        header = _check_header(json.loads(meta[META_KEY]), where)
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        check_tensors(header, tensors, where)  # builds the header's network on the meta device
    except UserError:
        raise
    except Exception as exc:  # a truncated file, bad JSON, a header field of the wrong type: one line
        raise UserError(f"{where} is damaged ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
    return header, tensors


def load_bundle(path: str, device="cpu") -> BundleModel:
    header, tensors = read_bundle(path)
    device = torch.device(device)
    if header["precision"]["frozen"] == "int8" and device.type != "cpu":
        raise UserError(f"bundle {path!r} holds an int8 backbone, which runs on CPU only (torch's dynamic int8 "
                        "Linear); pass --device cpu, or export with --frozen fp32")
    for k, t in tensors.items():  # what was learned (CLIP's own weights are trusted as the checkpoint path does)
        if not k.startswith("image.") and t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"bundle {path!r}: {k} holds non-finite values")
    with torch.device("meta"):
        model = BundleModel(header)
    quantised = {n + s for p in model.int8_prefixes() for n in N.int8_linears(p) for s in N.INT8_SUFFIXES + (".bias",)}
    own = {k: v.float() if v.dtype == torch.float16 else v for k, v in tensors.items() if k not in quantised}
    model.load_state_dict(own, strict=False, assign=True)  # the file's tensors become the weights: no copy
    for prefix, layer in zip(model.int8_prefixes(), model.image.vision_model.encoder.layers):
        N.make_int8(layer, tensors, prefix, header["vision"]["folded"])  # replaces the fp32 Linears left on meta
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # check_tensors makes it impossible
        raise UserError(f"bundle {path!r}: its tensors do not fill the network its header describes")
    return model.to(device).eval().requires_grad_(False)


# ---- using one --------------------------------------------------------------------------------------------
def evaluate_bundle(cfg, info: Optional[dict] = None) -> float:
    """`eval` of a bundle: cfg is an EvalConfig (its --model is not used: the bundle holds the model). The
    data is eval's (eval_data.py): an ImageNet variant scored by an imagenet export uses the stored text
    features of the variant's classes."""
    from .. import data as D
    from .eval_data import accuracy, eval_data

    check_device(cfg.device)
    dev = torch.device(cfg.device)
    t0 = time.perf_counter()
    model = load_bundle(cfg.checkpoint, dev)
    load_s = time.perf_counter() - t0
    if cfg.frozen is not None and cfg.frozen != model.frozen:
        raise UserError(f"--frozen {cfg.frozen}: bundle {cfg.checkpoint!r} holds a {model.frozen} backbone; "
                        f"export the checkpoint again with --frozen {cfg.frozen}")
    classnames, splits, subset = eval_data(cfg, model.classnames)
    if subset:  # the stored text features of the classes present, in the data's label order
        rows = [model.classnames.index(c) for c in classnames]
        model.class_features, model.classnames = model.class_features[rows], list(classnames)
    if classnames != model.classnames:
        raise UserError(f"--data {cfg.data!r}: its {len(classnames)} classes are not the {len(model.classnames)} "
                        f"the bundle was exported with (first: {model.classnames[:3]}); a bundle stores its "
                        "classes' text features and scores those only: evaluate the checkpoint for other classes")
    test = D.readable(splits["test"], classnames, f"--data {cfg.data!r} test/")
    t0 = time.perf_counter()
    acc = accuracy(model, model, test, dev, cfg.precision, cfg.batch_size, cfg.workers, cfg.quiet)
    if info is not None:
        info.update(method=model.method, images=len(test), classes=len(classnames), load_s=load_s,
                    eval_s=time.perf_counter() - t0)
    return acc


def load_method(path: str, model: str, device, tokenizer=None, activation=None, frozen=None):
    """The method of a prompt checkpoint on its CLIP, for its own classes (engine/evaluate.py's build; needs
    transformers, as every checkpoint path does)."""
    from ..methods import build_method
    from ..model.load import load_backbone
    from . import checkpoint as ckpt

    header, tensors = ckpt.read_checkpoint(path)
    backbone = load_backbone(model, torch.device(device), tokenizer, activation)
    ckpt.check_compatible(header, path, backbone)
    config = header["config"]
    if frozen is not None:
        if "frozen" not in config:
            raise UserError(f"--frozen: method {header['method']!r} has no frozen-backbone option (the ladder "
                            "methods have)")
        config = {**config, "frozen": frozen}
    try:
        method = build_method(header["method"], backbone, header["classnames"], **config)
    except ValueError as exc:
        raise UserError(f"checkpoint {path!r}: config: {exc}")
    ckpt.load_into(method, tensors, path)
    return method.eval(), header


class MethodPredictor:
    """A checkpoint's method behind a bundle's interface (classnames, preprocess, logits of pixels): the
    class features are computed once, at the first call, under the caller's autocast."""

    def __init__(self, method):
        self.m, self.classnames, self.method = method, method.classnames, method.name
        self.preprocess, self._text = method.backbone.preprocess, None

    @torch.no_grad()
    def prepare(self):
        if self._text is None:
            self._text = self.m.text_features()

    @torch.no_grad()
    def __call__(self, pixels):
        self.prepare()
        return self.m(pixels, self._text)
