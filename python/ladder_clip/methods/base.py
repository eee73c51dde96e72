"""What every method is: class features from text, image features, and scaled cosine logits."""
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .prompts import template_features, text_layout
from .options import check_options


class PromptMethod(nn.Module):
    """Subclasses set `name`, `defaults`, `options` (each option's type and range, methods/options.py), and
    implement `build_text`, `text_features`, `image_features`. The backbone is frozen; whatever else
    requires grad is the method's trainable state. Checks that need the backbone (a width a reduction
    must divide, a layer count) are made in `setup`, before anything large is allocated."""

    name = "?"
    defaults: dict = {}
    options: dict = {}

    @classmethod
    def check_options(cls, given: dict, where: Optional[str] = None) -> dict:
        """The full option dict (defaults filled in), each value checked; ValueError naming the option."""
        return check_options(cls.name, cls.options, cls.defaults, given, where)

    # (tensor name, dim, option): the option sets that size of the saved tensor; a checkpoint's config is
    # checked against its tensors with these before the method is built (checkpoint.check_sizes)
    sized_by: tuple = ()
    # tensors added to the method after checkpoints without them were written: those load keeping the
    # fresh method's value, which reproduces how they were trained
    added_later: tuple = ()

    @classmethod
    def expected_size(cls, cfg: dict, option: str, backbone: dict):
        """The size an option gives its tensor; None when it does not fix one (e.g. n_ctx with ctx_init)."""
        return cfg[option]

    def __init__(self, backbone, classnames: Sequence[str], **cfg):
        super().__init__()
        self.backbone = backbone
        self.cfg = self.check_options(cfg)
        self._text_cache = None
        self.setup()
        self.set_classnames(classnames)

    def setup(self) -> None:
        """Create the trainable state (called once, before the class names are known)."""

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self._text_cache = None
        self.build_text(self.classnames)

    def build_text(self, classnames) -> None:
        """Per-class-set state (token layouts, cached frozen features)."""

    def text_features(self) -> torch.Tensor:
        raise NotImplementedError

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cached(self, key, fn):
        """Frozen results computed once per class set (and device), under no_grad."""
        dev = self.backbone.device
        if self._text_cache is None or self._text_cache[0] != (key, dev):
            with torch.no_grad():
                self._text_cache = ((key, dev), fn())
        return self._text_cache[1]

    def forward(self, pixels: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        text = self.text_features() if text is None else text
        img = F.normalize(self.image_features(pixels).float(), dim=-1)
        txt = F.normalize(text.float(), dim=-1)
        return self.backbone.logit_scale.float() * img @ txt.t()

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]  # deduplicated, so shared modules count once

    def state_to_save(self) -> dict:
        """Every tensor of the method that is not the frozen backbone: its parameters and buffers (e.g. a
        low-rank prompt's frozen init). Modules hooked into the backbone are also held by the method, so
        they appear here under the method's own names."""
        out, seen = {}, set()
        named = list(self.named_parameters(remove_duplicate=False)) + list(self.named_buffers(remove_duplicate=False))
        for name, t in sorted(named, key=lambda nt: nt[0].count(".")):  # shortest name of a shared tensor
            if not name.startswith("backbone.") and id(t) not in seen:  # frozen ones too (APT's random W1)
                seen.add(id(t))
                out[name] = t.detach()
        return out

    def config(self) -> dict:
        return dict(self.cfg)

    # ---- what an export keeps (engine/bundle.py) --------------------------------------------------------
    def class_features(self) -> torch.Tensor:
        """The (C, E) normalised class features the logits use, in fp32. Every method here computes them
        without the image, so an export stores them and needs no text encoder."""
        return F.normalize(self.text_features().float(), dim=-1)

    def inference_state(self) -> dict:
        """How an export runs the image side: {"kind", "tensors", "info"}. 'plain': CLIP's own image
        encoder, nothing learned on that side (zeroshot, coop, rlp)."""
        return {"kind": "plain", "tensors": {}, "info": {}}


class TextPromptMethod(PromptMethod):
    """A method whose context tokens (`self.ctx_ids`) go into CoOp's text layout: per class set it keeps
    the layout and the frozen token embeddings of every class's sequence."""

    def build_text(self, classnames):
        self.layout = text_layout(self.backbone, classnames, self.ctx_ids)
        with torch.no_grad():
            self.embeds = self.backbone.token_embedding(self.layout.ids)


class TemplatePromptMethod(PromptMethod):
    """A method whose class features are the frozen zero-shot ones of its `template` option (zeroshot, vpt,
    apt): computed once per class set."""

    def text_features(self):
        return self.cached("template", lambda: template_features(self.backbone, self.classnames,
                                                                  self.cfg["template"]))
