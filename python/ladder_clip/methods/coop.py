"""CoOp: n learned context vectors shared by all classes, or one set per class (class-specific context,
option csc), with the class name at the end, the middle or the front of the prompt (CoOp's
CLASS_TOKEN_POSITION); backprop through the frozen text encoder."""
import torch
from torch import nn

from .prompts import assemble, init_tokens, place, text_layout
from .base import TextPromptMethod
from .options import MAX_TOKENS, Bool, Choice, Int, Text


class CoOp(TextPromptMethod):
    name = "coop"
    defaults = {"n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end"}
    options = {"n_ctx": Int(1, MAX_TOKENS), "ctx_init": Text(), "csc": Bool(),
               "class_token_position": Choice(("end", "middle", "front"))}
    sized_by = (("ctx", 0, "n_ctx"),)

    @classmethod
    def expected_size(cls, cfg, option, backbone):
        # an init's token count sets ctx instead; with csc, dim 0 is the class count
        return None if cfg["ctx_init"] or cfg.get("csc") else cfg[option]

    def setup(self):
        b = self.backbone
        self.ctx_ids = init_tokens(b, self.cfg["ctx_init"], self.cfg["n_ctx"])
        if self.cfg["ctx_init"]:
            with torch.no_grad():
                self._init = b.token_embedding(torch.tensor(self.ctx_ids, device=b.device)).float().clone()
        else:
            self._init = None
        if not self.cfg["csc"]:
            self.ctx = nn.Parameter(self._make(()))

    def _make(self, lead):
        """The context's initial value: the init words' embeddings, or N(0, 0.02) as CoOp."""
        b = self.backbone
        if self._init is not None:
            return self._init.expand(*lead, *self._init.shape).clone()
        return torch.randn(*lead, len(self.ctx_ids), b.text_width, device=b.device) * 0.02

    def build_text(self, classnames):
        if self.cfg["csc"]:  # one context per class: created with the class set, never moved to another
            if not hasattr(self, "ctx"):
                self.ctx = nn.Parameter(self._make((len(classnames),)).float())
            elif self.ctx.shape[0] != len(classnames):
                raise ValueError(f"coop: a class-specific context (csc) is learned for {self.ctx.shape[0]} "
                                 f"classes; it cannot score {len(classnames)} other ones")
        self.layout = text_layout(self.backbone, classnames, self.ctx_ids, self.cfg["class_token_position"])
        with torch.no_grad():
            self.embeds = self.backbone.token_embedding(self.layout.ids)

    def text_features(self):
        b, lay = self.backbone, self.layout
        if lay.ctx_pos is not None:
            return b.encode_text_embeds(place(lay, self.embeds, self.ctx), lay.eot)
        x = assemble(lay, self.embeds, self.ctx, pos=b.text_pos[: lay.ids.shape[1]])
        return b.encode_text_embeds(x, lay.eot, add_pos=False)

    def image_features(self, pixels):
        with torch.no_grad():
            return self.backbone.encode_image(pixels)
