"""CoOp: n learned context vectors shared by all classes, backprop through the frozen text encoder."""
import torch
from torch import nn

from ..prompts import assemble, init_tokens
from .base import TextPromptMethod
from .options import MAX_TOKENS, Int, Text


class CoOp(TextPromptMethod):
    name = "coop"
    defaults = {"n_ctx": 16, "ctx_init": ""}
    options = {"n_ctx": Int(1, MAX_TOKENS), "ctx_init": Text()}
    sized_by = (("ctx", 0, "n_ctx"),)

    @classmethod
    def expected_size(cls, cfg, option, backbone):
        return None if cfg["ctx_init"] else cfg[option]  # an init's token count sets ctx instead

    def setup(self):
        b = self.backbone
        self.ctx_ids = init_tokens(b, self.cfg["ctx_init"], self.cfg["n_ctx"])
        if self.cfg["ctx_init"]:
            with torch.no_grad():
                init = b.token_embedding(torch.tensor(self.ctx_ids, device=b.device)).clone()
        else:
            init = torch.randn(len(self.ctx_ids), b.text_width, device=b.device) * 0.02
        self.ctx = nn.Parameter(init.float())

    def text_features(self):
        b, lay = self.backbone, self.layout
        x = assemble(lay, self.embeds, self.ctx, pos=b.text_pos[: lay.ids.shape[1]])
        return b.encode_text_embeds(x, lay.eot, add_pos=False)

    def image_features(self, pixels):
        with torch.no_grad():
            return self.backbone.encode_image(pixels)
