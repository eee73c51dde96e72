"""CoOp's text layout: [start] [n prompt tokens] [class name tokens] [end] [padding], built once per set of
class names; the prompt tokens are written in by lk.assemble_prompts."""
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

import ladder_kernels as lk

from ..base.errors import UserError

TEMPLATE_INIT = "a photo of a"

# CoOp's zero-shot templates per dataset (trainers/zsclip.py CUSTOM_TEMPLATES), keyed by the dataset names
# of its split files (split_zhou_<Name>.json) and Dassl dataset classes
TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
}
# CUSTOM_TEMPLATES gives the four test-only ImageNet variants ImageNet's template
IMAGENET_VARIANTS = ("ImageNetSketch", "ImageNetV2", "ImageNetA", "ImageNetR")
_ALIASES = {"dtd": "DescribableTextures", "flowers": "OxfordFlowers", "flowers102": "OxfordFlowers",
            "pets": "OxfordPets", "aircraft": "FGVCAircraft", "cars": "StanfordCars"}


def dataset_template(split_json: str) -> Optional[str]:
    """CoOp's template for the dataset a split file names (split_zhou_OxfordPets.json -> OxfordPets);
    None when the name is not one of CoOp's 11 datasets."""
    stem = os.path.splitext(os.path.basename(split_json))[0]
    for prefix in ("split_zhou_", "split_"):
        if stem.lower().startswith(prefix):
            stem = stem[len(prefix):]
            break
    by_lower = {k.lower(): k for k in TEMPLATES}
    key = by_lower.get(stem.lower()) or _ALIASES.get(stem.lower())
    return TEMPLATES[key] if key else None


def coop_template(coop_name: str) -> str:
    """CoOp's template of its dataset class `coop_name` (data.coop_datasets Spec.coop: OxfordPets, ImageNetA)."""
    return TEMPLATES["ImageNet" if coop_name in IMAGENET_VARIANTS else coop_name]


@dataclass
class TextLayout:
    ids: torch.Tensor      # (C, L) ids with the init prompt words (or a placeholder) in the prompt slots
    eot: torch.Tensor      # (C,) pooling position
    n_ctx: int             # prompt tokens, at positions 1 .. n_ctx (class token at the end)
    ctx_pos: Optional[torch.Tensor] = None  # (C, n) their positions when the class token is elsewhere

    def split(self, embeds: torch.Tensor):
        """(C, L, D) -> prefix (C, 1, D), prompt (C, n, D), suffix (C, L-1-n, D)."""
        return embeds[:, :1], embeds[:, 1:1 + self.n_ctx], embeds[:, 1 + self.n_ctx:]


def init_tokens(backbone, init: Optional[str], n_ctx: int) -> List[int]:
    """Token ids for the prompt slots: the words of `init`, or `n_ctx` placeholder 'X' tokens."""
    room = backbone.context_length - 3  # start, end and at least one class-name token
    if init:
        ids = backbone.token_ids(init)
        if not ids:
            raise ValueError(f"ctx_init: prompt init {init!r} has no tokens")
        if len(ids) > room:
            raise ValueError(f"ctx_init: this model has room for {room} prompt tokens, {init[:40]!r} has {len(ids)}")
        return ids
    if n_ctx > room:
        raise ValueError(f"n_ctx: this model has room for at most {room} prompt tokens, got {n_ctx}")
    x = backbone.token_ids("X")[:1]
    return x * n_ctx


def text_layout(backbone, classnames: Sequence[str], ctx_ids: Sequence[int], position: str = "end") -> TextLayout:
    """The class names after the prompt, ending with a full stop as CoOp does; sequences are cut at the
    longest end position + 1 (later tokens never reach a pooled feature of a causal encoder). CoOp's
    other class-token positions: 'front' = [name, prompt, '.'], 'middle' = [first n//2 prompt tokens,
    name, the rest, '.']; their prompt positions per class are in `ctx_pos`."""
    ctx = list(ctx_ids)
    if position == "end":
        middle = [ctx + backbone.token_ids(name + ".") for name in classnames]
    else:
        half = len(ctx) // 2 if position == "middle" else 0
        names = [backbone.token_ids(name) for name in classnames]
        middle = [ctx[:half] + n + ctx[half:] + backbone.token_ids(".") for n in names]
        pos = [list(range(1, 1 + half)) + list(range(1 + half + len(n), 1 + len(ctx) + len(n))) for n in names]
    ids = backbone.build_ids(middle)
    eot = backbone.eot_index(ids)
    ids = ids[:, : int(eot.max()) + 1]
    if position == "end":
        return TextLayout(ids, eot, len(ctx))
    return TextLayout(ids, eot, len(ctx), torch.tensor(pos, dtype=torch.long, device=ids.device))


def place(layout: TextLayout, embeds: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """The prompt (n, D) or (C, n, D) written at `layout.ctx_pos` (class token at the front or middle:
    the fused assembly only covers prompts right after the start token)."""
    c, n = layout.ctx_pos.shape
    rows = torch.arange(c, device=embeds.device)[:, None].expand(c, n)
    return embeds.index_put((rows, layout.ctx_pos), prompt.to(embeds.dtype).expand(c, n, -1))


def assemble(layout: TextLayout, embeds: torch.Tensor, prompt: torch.Tensor, pos=None) -> torch.Tensor:
    """The fused prompt assembly (docs/design.md, section 2) with a dense prompt (n, D) or (C, n, D)."""
    prefix, _, suffix = layout.split(embeds)
    return lk.assemble_prompts(prefix, suffix, prompt.to(prefix.dtype), pos=pos)


def template_features(backbone, classnames: Sequence[str], template: str = "a photo of a {}.") -> torch.Tensor:
    """Frozen zero-shot class features, normalised (C, E)."""
    with torch.no_grad():
        ids = backbone.tokenize([template.format(c) for c in classnames])
        f = backbone.encode_text(ids)
    return f / f.norm(dim=-1, keepdim=True)


def _rows(method) -> torch.Tensor:
    """The token ids each class's prompt starts from: the method's layout, else its template's."""
    layout = getattr(method, "layout", None)
    if layout is not None:
        return layout.ids
    template = method.cfg.get("template", "a photo of a {}.")
    return method.backbone.tokenize([template.format(c) for c in method.classnames])


def check_distinct(method, classnames: Sequence[str], where: str) -> None:
    """Refuses classes whose prompts the model would read as identical (the tokenizer folds case, and
    cuts at the context length: one of them could never be predicted); warns when a prompt fills the
    context, as its name is then cut. The method keeps its own class names."""
    own = list(method.classnames)
    if list(classnames) != own:
        method.set_classnames(classnames)
    try:
        rows = _rows(method).tolist()
    finally:
        if list(classnames) != own:
            method.set_classnames(own)
    length = method.backbone.context_length
    # rows end in the end token, padded with it: a prompt fills the context when its first one is last
    full = [c for c, r in zip(classnames, rows) if len(r) >= length and r.index(r[-1], 1) == length - 1]
    if full:
        warnings.warn(f"{where}: the prompt of class(es) {', '.join(repr(c[:40]) for c in full[:3])}"
                      f"{' ...' if len(full) > 3 else ''} fills the model's {length}-token context; the rest "
                      "of the name is cut")
    first = {}
    for c, r in zip(classnames, rows):
        other = first.setdefault(tuple(r), c)
        if other != c:
            raise UserError(f"{where}: classes {other!r} and {c!r} get identical prompts ({_why(other, c, full)}), "
                            "so one of them could never be predicted; rename or merge them")


def _why(a: str, b: str, full) -> str:
    if a.lower() == b.lower():
        return "they differ only in letter case, which the tokenizer folds"
    if a in full and b in full:
        return "they differ only past the model's context length, where names are cut"
    return "the tokenizer gives them the same tokens"
