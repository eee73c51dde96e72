"""VPT-deep: p learned visual tokens after the class token in every vision layer (replaced at each layer's
input), backprop through the frozen image encoder; class features are the frozen zero-shot ones."""
import math

import torch
from torch import nn

import ladder_kernels as lk

from .base import TemplatePromptMethod
from .options import MAX_BLOCKS, MAX_TOKENS, Int, Template


def insert_prompts(h: torch.Tensor, prompt: torch.Tensor, replace: int = 0) -> torch.Tensor:
    """[CLS, prompt, patches] from h = [CLS, (old prompts of length `replace`), patches] via the fused op."""
    return lk.assemble_prompts(h[:, :1], h[:, 1 + replace:], prompt.to(h.dtype))


class VPT(TemplatePromptMethod):
    name = "vpt"
    defaults = {"n_prompts": 8, "depth": 0, "template": "a photo of a {}."}   # depth 0: every layer
    options = {"n_prompts": Int(1, MAX_TOKENS), "depth": Int(0, MAX_BLOCKS), "template": Template()}
    sized_by = (("prompts", 1, "n_prompts"), ("prompts", 0, "depth"))

    @classmethod
    def expected_size(cls, cfg, option, backbone):
        return cfg[option] or None  # depth 0: every layer

    def setup(self):
        b = self.backbone
        depth = self.cfg["depth"] or b.vision_layers
        if not 1 <= depth <= b.vision_layers:
            raise ValueError(f"vpt: depth must be in 1..{b.vision_layers}, got {depth}")
        patch = b.clip.config.vision_config.patch_size
        bound = math.sqrt(6.0 / (3 * patch * patch + b.vision_width))  # VPT's xavier-uniform bound
        init = torch.empty(depth, self.cfg["n_prompts"], b.vision_width, device=b.device).uniform_(-bound, bound)
        self.prompts = nn.Parameter(init)

    def image_features(self, pixels):
        n, depth = self.prompts.shape[1], self.prompts.shape[0]

        def hook(i, h):
            return insert_prompts(h, self.prompts[i], n) if 0 < i < depth else h

        return self.backbone.encode_image(pixels, hook=hook, insert=lambda h: insert_prompts(h, self.prompts[0]))

    def inference_state(self):
        # layer 0's prompts go in after the embeddings, layers 1..depth-1 replace them (image_features)
        return {"kind": "deep_prompts", "tensors": {"prompts": self.prompts.detach()}, "info": {}}
