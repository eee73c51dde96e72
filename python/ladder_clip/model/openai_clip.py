"""CLIP checkpoints in OpenAI's layout -> a transformers CLIPModel, and back.

CoOp-family users hold CLIP as OpenAI's `clip` package caches it (`ViT-B-16.pt`, a TorchScript archive)
or as open_clip saves it (a state dict, often as {"state_dict": ...} with "module." prefixes). Both name
the weights alike (`visual.conv1.weight`, `transformer.resblocks.N.attn.in_proj_weight`, ...), so one
renaming serves both. Nothing in the file is run: plain pickles go through torch.load(weights_only=True),
and TorchScript archives through a restricted unpickler that can only rebuild tensors (no torch.jit.load,
which would execute the archive's code and unpickle with the stock unpickler).
"""
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from ..base.errors import UserError
from .tokenizer import bpe_tokenizer, find_clip_merges, load_tokenizer

# non-weights an OpenAI state dict may hold (OpenAI's build_model drops the first three too)
IGNORED = ("input_resolution", "context_length", "vocab_size")
_LAYER = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
          ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
_TOP = (("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("logit_scale", "logit_scale"))
_NORMS = (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
          ("ln_final", "text_model.final_layer_norm"))
_TRANSPOSED = (("visual.proj", "visual_projection.weight"), ("text_projection", "text_projection.weight"))


# ---- reading a file ---------------------------------------------------------------------------------------
class _ScriptObject:
    """Stands in for a TorchScript module class (`__torch__.*`): keeps its attributes, runs nothing."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, *_):  # torch._utils._rebuild_tensor_v2's arguments
    return torch.as_strided(storage, size, stride, offset)


def _same(value, *_):  # torch.jit._pickle's list builders and type tags only restore static types
    return value


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}
_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("collections", "OrderedDict"): OrderedDict,
            **{("torch.jit._pickle", n): _same for n in
               ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")},
            **{("torch", n): dtype for n, dtype in _STORAGE_DTYPES.items()}}  # a storage type: only its dtype


class _WeightsUnpickler(pickle.Unpickler):
    """data.pkl of a TorchScript archive: module objects, tensors, plain values. Any other global is
    refused before it is looked up, so a crafted __reduce__ never runs."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str, path: str):
        super().__init__(file)
        self.archive, self.root, self.path, self.storages = archive, root, path, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UserError(f"--model {self.path!r}: refusing to load {module}.{name} from the archive "
                        "(only tensors and TorchScript module attributes are read)")

    def persistent_load(self, pid):
        # ('storage', storage type (here its dtype), key, location, element count): bytes in <root>/data/<key>
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise UserError(f"--model {self.path!r}: unexpected storage reference {pid!r} in the archive")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
            self.storages[key] = torch.frombuffer(data, dtype=dtype, count=numel) if numel else \
                torch.empty(0, dtype=dtype)
        return self.storages[key]


def _collect(obj, prefix: str, out: Dict[str, torch.Tensor]) -> None:
    """The module tree's tensors under dotted names, as state_dict() would name them."""
    for name, value in obj.state.items():
        if torch.is_tensor(value):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out)


def _read_torchscript(archive: zipfile.ZipFile, root: str, path: str) -> Dict[str, torch.Tensor]:
    order = f"{root}/byteorder"  # absent in archives from before torch wrote it: those are little-endian
    if order in archive.namelist() and archive.read(order).strip() != b"little":
        raise UserError(f"--model {path!r}: a big-endian archive; only little-endian ones are read")
    try:
        with archive.open(f"{root}/data.pkl") as f:
            top = _WeightsUnpickler(f, archive, root, path).load()
    except UserError:
        raise
    except Exception as exc:  # a damaged archive: a missing storage, a tensor past its storage's end, ...
        raise UserError(f"--model {path!r}: a damaged TorchScript archive ({type(exc).__name__}: "
                        f"{str(exc).strip()[:200]})")
    if not isinstance(top, _ScriptObject):
        raise UserError(f"--model {path!r}: the TorchScript archive holds no module")
    out = {}
    _collect(top, "", out)
    return out


def _torchscript_root(path: str) -> Optional[str]:
    """The archive's top folder if `path` is a TorchScript zip (it has code/ or constants.pkl), else None
    (torch.save's own zip files have data.pkl too, and torch.load reads those)."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    roots = [n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) == 1 and any(n.startswith(roots[0] + "/code/") or n == roots[0] + "/constants.pkl"
                               for n in names):
        return roots[0]
    return None


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The named tensors in `path`: a TorchScript archive, a torch.save'd state dict (bare, or as
    {"state_dict": ...} / {"model": ...} with "module." prefixes from DataParallel), or a .safetensors file."""
    root = _torchscript_root(path)
    if root is not None:
        with zipfile.ZipFile(path) as z:
            sd = _read_torchscript(z, root, path)
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd = load_file(path)
        except Exception as exc:
            raise UserError(f"--model {path!r}: not a readable safetensors file ({str(exc).splitlines()[0]})")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            text = str(exc).strip()
            if isinstance(exc, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
                # say what weights_only refused, not torch's advice to lift the check
                parts = [p.strip() for p in text.split("\n\n") if p.strip()]
                text = next((p for p in parts[1:] if not p.startswith("Check the documentation")), parts[0])
                if "GLOBAL" in text:  # a class or function to call: code, not weights
                    raise UserError(f"--model {path!r}: refused, it holds more than weights ({text[:200]})")
            raise UserError(f"--model {path!r}: not a checkpoint this can read (expected a TorchScript archive, a "
                            f"torch.save'd state dict or a .safetensors file; {type(exc).__name__}: {text[:200]})")
    for wrapper in ("state_dict", "model"):  # open_clip's and common training checkpoints
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"--model {path!r}: expected a state dict (names -> tensors), got {type(sd).__name__}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ---- OpenAI layout <-> transformers CLIPModel ------------------------------------------------------------
def _count_layers(sd, prefix: str) -> int:
    found = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def _heads(width: int) -> int:
    # the weights do not say; OpenAI's rule is 64 channels a head, and a tiny width gets a divisor of it
    h = max(1, width // 64)
    while width % h:
        h -= 1
    return h


def clip_config(sd, bos: int, eos: int, heads: Optional[Tuple[int, int]] = None, hidden_act: str = "quick_gelu",
                where: str = "--model"):
    """The CLIPConfig of an OpenAI-layout ViT state dict, inferred as OpenAI's build_model does.
    `heads` = (text, vision) overrides the head counts (64 channels a head otherwise); `where` starts
    the error messages."""
    from transformers import CLIPConfig

    if "visual.proj" not in sd:
        if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
            raise UserError(f"{where}: a ResNet (ModifiedResNet) CLIP; only ViT CLIP checkpoints are supported")
        raise UserError(f"{where}: not a CLIP checkpoint in OpenAI's layout (no visual.proj; expected keys "
                        f"like visual.conv1.weight, got {', '.join(list(sd)[:3])}, ...)")
    need = ("visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
            "token_embedding.weight", "ln_final.weight", "visual.transformer.resblocks.0.mlp.c_fc.weight",
            "transformer.resblocks.0.mlp.c_fc.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise UserError(f"{where}: an incomplete CLIP checkpoint: no {', '.join(missing)}")
    vw, _, patch, _ = sd["visual.conv1.weight"].shape
    positions = sd["visual.positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise UserError(f"{where}: visual.positional_embedding has {positions} rows; expected a square grid + 1")
    tw = sd["ln_final.weight"].shape[0]
    th, vh = heads or (_heads(tw), _heads(vw))
    common = dict(hidden_act=hidden_act, layer_norm_eps=1e-5)
    return CLIPConfig(
        text_config=dict(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=tw,
                         intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                         num_hidden_layers=_count_layers(sd, "transformer.resblocks."), num_attention_heads=th,
                         max_position_embeddings=sd["positional_embedding"].shape[0], bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos, **common),
        vision_config=dict(hidden_size=vw,
                           intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                           num_hidden_layers=_count_layers(sd, "visual.transformer.resblocks."),
                           num_attention_heads=vh, image_size=patch * grid, patch_size=patch, **common),
        projection_dim=sd["text_projection"].shape[1])


def _names(text_layers: int, vision_layers: int):
    """(OpenAI name, HF name) of every weight copied as is; the transposed projections and the fused
    q/k/v are handled by the callers."""
    pairs = list(_TOP) + [(f"{o}.{p}", f"{h}.{p}") for o, h in _NORMS for p in ("weight", "bias")]
    for o, h, n in (("transformer", "text_model", text_layers), ("visual.transformer", "vision_model", vision_layers)):
        for i in range(n):
            pairs += [(f"{o}.resblocks.{i}.{a}.{p}", f"{h}.encoder.layers.{i}.{b}.{p}")
                      for a, b in _LAYER for p in ("weight", "bias")]
    return pairs


def _qkv(text_layers: int, vision_layers: int):
    for o, h, n in (("transformer", "text_model", text_layers), ("visual.transformer", "vision_model", vision_layers)):
        for i in range(n):
            for p in ("weight", "bias"):
                yield f"{o}.resblocks.{i}.attn.in_proj_{p}", [f"{h}.encoder.layers.{i}.self_attn.{x}_proj.{p}"
                                                              for x in "qkv"]


def from_openai_state_dict(sd, config, where: str = "--model"):
    """A CLIPModel of `config` holding the OpenAI-layout weights `sd`; every weight must be used and every
    model weight filled (UserError naming the keys otherwise)."""
    from transformers import CLIPModel

    n_text, n_vision = config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers
    hf, used = {}, set()
    try:
        for o, h in _names(n_text, n_vision):
            hf[h] = sd[o]
            used.add(o)
        for o, h in _TRANSPOSED:
            hf[h] = sd[o].t()
            used.add(o)
        for o, hs in _qkv(n_text, n_vision):
            hf.update(zip(hs, sd[o].chunk(3)))
            used.add(o)
    except KeyError as exc:
        raise UserError(f"{where}: the checkpoint lacks {exc.args[0]!r}, which a ViT CLIP has")
    extra = sorted(k for k in sd if k not in used and k not in IGNORED and not k.endswith("attn_mask"))
    if extra:
        raise UserError(f"{where}: {len(extra)} weights this CLIP architecture does not use: "
                        f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}")
    model = CLIPModel(config)
    try:
        model.load_state_dict(hf, strict=True)
    except RuntimeError as exc:  # shapes disagree with the inferred config, or keys HF adds
        raise UserError(f"{where}: the weights do not fit the inferred architecture "
                        f"({' '.join(str(exc).split())[:300]})")
    return model.eval()


def to_openai_state_dict(model) -> Dict[str, torch.Tensor]:
    """A transformers CLIPModel's weights under OpenAI's names (what OpenAI's build_model and open_clip
    load), cloned."""
    hf = model.state_dict()
    n_text = model.config.text_config.num_hidden_layers
    n_vision = model.config.vision_config.num_hidden_layers
    out = {o: hf[h].clone() for o, h in _names(n_text, n_vision)}
    out.update({o: hf[h].t().contiguous() for o, h in _TRANSPOSED})
    out.update({o: torch.cat([hf[h] for h in hs]) for o, hs in _qkv(n_text, n_vision)})
    return out


# ---- the whole load --------------------------------------------------------------------------------------
def load_clip_file(path: str, tokenizer: Optional[str] = None, heads: Optional[Tuple[int, int]] = None,
                   hidden_act: str = "quick_gelu"):
    """(CLIPModel, tokenizer) from an OpenAI / open_clip ViT checkpoint file. The tokenizer is `tokenizer`
    (a folder or merges file) if given, else CLIP's BPE from an installed open_clip / clip package."""
    where = f"--model {path!r}"
    sd = read_state_dict(path)
    clip_config(sd, 0, 0, where=where)  # a ResNet or a non-CLIP file is told as such before the tokenizer
    vocab = sd["token_embedding.weight"].shape[0]
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        merges = find_clip_merges()
        if merges is None:
            raise UserError(f"--model {path!r}: no CLIP vocabulary found for its {vocab} tokens: pip install "
                            "open_clip_torch (or OpenAI's clip), or pass --tokenizer with a tokenizer folder")
        tok = bpe_tokenizer(merges)
    if len(tok) != vocab:
        raise UserError(f"--model {path!r}: its token embedding has {vocab} rows but the tokenizer has "
                        f"{len(tok)} tokens; pass the tokenizer it was trained with (--tokenizer)")
    config = clip_config(sd, tok.bos_token_id, tok.eos_token_id, heads, hidden_act, where)
    return from_openai_state_dict(sd, config, where), tok
