"""MaPLe: deep text prompts in the first J text layers, and visual prompts coupled to them through one
linear map (text width -> vision width) per layer; both encoders are backpropagated.

As MaPLe's MultiModalPromptLearner: the prompt text is "<ctx_init> <class>." and its first n_ctx tokens
are learned (initialised from the init words), the rest of the init stays frozen text: with "a photo of
a" and n_ctx 2, "a photo" is learned and "of a" is not. Without an init, n_ctx tokens start N(0, 0.02).
The deep prompts (layers 1..J-1) always have n_ctx tokens."""
from dataclasses import replace

import torch
from torch import nn

from .prompts import TEMPLATE_INIT, assemble, init_tokens
from .base import TextPromptMethod
from .options import MAX_BLOCKS, MAX_TOKENS, Int, Text
from .vpt import insert_prompts


class MaPLe(TextPromptMethod):
    name = "maple"
    defaults = {"ctx_init": TEMPLATE_INIT, "n_ctx": 2, "depth": 9}  # MaPLe's N_CTX 2, PROMPT_DEPTH 9
    options = {"ctx_init": Text(), "n_ctx": Int(1, MAX_TOKENS),
               "depth": Int(1, MAX_BLOCKS)}  # depth above the layer count: every layer
    sized_by = (("ctx", 0, "n_ctx"), ("deep_text", 1, "n_ctx"))

    def setup(self):
        b = self.backbone
        self.depth = max(1, min(self.cfg["depth"], b.text_layers, b.vision_layers))
        init_text, n = self.cfg["ctx_init"], self.cfg["n_ctx"]
        self.ctx_ids = init_tokens(b, init_text, n)  # every init token goes into the text; n are learned
        if init_text:
            if n > len(self.ctx_ids):
                raise ValueError(f"n_ctx: maple learns the first n_ctx tokens of ctx_init {init_text!r}, which "
                                 f"has {len(self.ctx_ids)}; got {n} (or pass ctx_init='' for a random init)")
            with torch.no_grad():
                init = b.token_embedding(torch.tensor(self.ctx_ids[:n], device=b.device)).float().clone()
        else:
            init = torch.randn(n, b.text_width, device=b.device) * 0.02
        self.ctx = nn.Parameter(init)
        self.deep_text = nn.Parameter(torch.randn(self.depth - 1, n, b.text_width, device=b.device) * 0.02)
        self.couple = nn.ModuleList(nn.Linear(b.text_width, b.vision_width, device=b.device)
                                    for _ in range(self.depth))

    def build_text(self, classnames):
        super().build_text(classnames)
        self.layout = replace(self.layout, n_ctx=self.cfg["n_ctx"])  # the later init tokens stay text

    def _text_prompt(self, j):
        return self.ctx if j == 0 else self.deep_text[j - 1]

    def text_features(self):
        b, lay = self.backbone, self.layout
        x = assemble(lay, self.embeds, self.ctx, pos=b.text_pos[: lay.ids.shape[1]])

        def hook(i, h):  # replaces the prompt slots 1..n (the CoOp layout) in the first J layers
            if 0 < i < self.depth:
                return assemble(lay, h, self.deep_text[i - 1])
            return h

        return b.encode_text_embeds(x, lay.eot, add_pos=False, hook=hook)

    def image_features(self, pixels):
        n = self.ctx.shape[0]
        vis = [self.couple[j](self._text_prompt(j)) for j in range(self.depth)]

        def hook(i, h):
            return insert_prompts(h, vis[i], n) if 0 < i < self.depth else h

        return self.backbone.encode_image(pixels, hook=hook, insert=lambda h: insert_prompts(h, vis[0]))

    def inference_state(self):
        """The visual prompts are the coupling of the text prompts, constant once trained: stored as VPT's."""
        with torch.no_grad():
            vis = torch.stack([self.couple[j](self._text_prompt(j)) for j in range(self.depth)])
        return {"kind": "deep_prompts", "tensors": {"prompts": vis}, "info": {}}
