"""RLP: the prompt 'a photo of a' re-parameterised as a frozen init plus a rank-r trainable term
(lk.nn.LowRankPrompt, assembled into every class sequence by lk.assemble_prompts)."""
import torch

import ladder_kernels as lk

from .prompts import TEMPLATE_INIT, init_tokens
from .base import TextPromptMethod
from .options import MAX_TOKENS, Choice, Float, Int, Text


class RLP(TextPromptMethod):
    name = "rlp"
    defaults = {"ctx_init": TEMPLATE_INIT, "rank": 1, "scale": 1.0, "dropout": 0.0, "init_mode": "zero"}
    options = {"ctx_init": Text(), "rank": Int(1, MAX_TOKENS), "scale": Float(-1e6, 1e6),
               "dropout": Float(0.0, 1.0, high_open=True), "init_mode": Choice(("zero", "svd"))}
    sized_by = (("prompt.lowrank_a", 1, "rank"), ("prompt.lowrank_b", 0, "rank"))

    def setup(self):
        b = self.backbone
        self.ctx_ids = init_tokens(b, self.cfg["ctx_init"], 4)
        with torch.no_grad():
            init = b.token_embedding(torch.tensor(self.ctx_ids, device=b.device)).float().clone()
        self.prompt = lk.nn.LowRankPrompt(init, rank=self.cfg["rank"], scale=self.cfg["scale"],
                                          dropout=self.cfg["dropout"], init_mode=self.cfg["init_mode"])

    def text_features(self):
        b, lay = self.backbone, self.layout
        prefix, _, suffix = lay.split(self.embeds)
        x = self.prompt(prefix, suffix, pos=b.text_pos[: lay.ids.shape[1]])
        return b.encode_text_embeds(x, lay.eot, add_pos=False)

    def image_features(self, pixels):
        with torch.no_grad():
            return self.backbone.encode_image(pixels)

    def class_features(self):
        """The prompt merged (LowRankPrompt.merge: P0 + scale A B) into one dense prompt, as inference uses it."""
        b, lay = self.backbone, self.layout
        prefix, _, suffix = lay.split(self.embeds)
        merged = self.prompt.merge().to(prefix.dtype)
        x = lk.assemble_prompts(prefix, suffix, merged, pos=b.text_pos[: lay.ids.shape[1]])
        return torch.nn.functional.normalize(b.encode_text_embeds(x, lay.eot, add_pos=False).float(), dim=-1)
