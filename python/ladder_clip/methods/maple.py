"""MaPLe: deep text prompts in the first J text layers, and visual prompts coupled to them through one
linear map (text width -> vision width) per layer; both encoders are backpropagated."""
import torch
from torch import nn

from ..prompts import TEMPLATE_INIT, assemble, init_tokens
from .base import TextPromptMethod
from .options import MAX_BLOCKS, Int, Text
from .vpt import insert_prompts


class MaPLe(TextPromptMethod):
    name = "maple"
    defaults = {"ctx_init": TEMPLATE_INIT, "depth": 9}
    options = {"ctx_init": Text(), "depth": Int(1, MAX_BLOCKS)}  # depth above the layer count: every layer

    def setup(self):
        b = self.backbone
        self.depth = max(1, min(self.cfg["depth"], b.text_layers, b.vision_layers))
        self.ctx_ids = init_tokens(b, self.cfg["ctx_init"], 2)
        n = len(self.ctx_ids)
        with torch.no_grad():
            init = b.token_embedding(torch.tensor(self.ctx_ids, device=b.device)).float().clone()
        self.ctx = nn.Parameter(init)
        self.deep_text = nn.Parameter(torch.randn(self.depth - 1, n, b.text_width, device=b.device) * 0.02)
        self.couple = nn.ModuleList(nn.Linear(b.text_width, b.vision_width, device=b.device)
                                    for _ in range(self.depth))

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
