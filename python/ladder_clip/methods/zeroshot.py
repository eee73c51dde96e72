"""Zero-shot CLIP: 'a photo of a {class}.' and no training."""
import torch

from ..prompts import template_features
from .base import PromptMethod
from .options import Template


class ZeroShot(PromptMethod):
    name = "zeroshot"
    defaults = {"template": "a photo of a {}."}
    options = {"template": Template()}

    def text_features(self):
        return self.cached("template", lambda: template_features(self.backbone, self.classnames,
                                                                  self.cfg["template"]))

    def image_features(self, pixels):
        with torch.no_grad():
            return self.backbone.encode_image(pixels)
