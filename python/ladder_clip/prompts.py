"""CoOp's text layout: [start] [n prompt tokens] [class name tokens] [end] [padding], built once per set of
class names; the prompt tokens are written in by lk.assemble_prompts."""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

import ladder_kernels as lk

TEMPLATE_INIT = "a photo of a"


@dataclass
class TextLayout:
    ids: torch.Tensor      # (C, L) ids with the init prompt words (or a placeholder) in the prompt slots
    eot: torch.Tensor      # (C,) pooling position
    n_ctx: int             # prompt tokens, at positions 1 .. n_ctx

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


def text_layout(backbone, classnames: Sequence[str], ctx_ids: Sequence[int]) -> TextLayout:
    """The class names after the prompt, ending with a full stop as CoOp does; sequences are cut at the
    longest end position + 1 (later tokens never reach a pooled feature of a causal encoder)."""
    middle = [list(ctx_ids) + backbone.token_ids(name + ".") for name in classnames]
    ids = backbone.build_ids(middle)
    eot = backbone.eot_index(ids)
    ids = ids[:, : int(eot.max()) + 1]
    return TextLayout(ids, eot, len(ctx_ids))


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
