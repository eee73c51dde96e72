"""Zero-shot CLIP: 'a photo of a {class}.' and no training."""
import torch

from .base import TemplatePromptMethod
from .options import Template


class ZeroShot(TemplatePromptMethod):
    name = "zeroshot"
    defaults = {"template": "a photo of a {}."}
    options = {"template": Template()}

    def image_features(self, pixels):
        with torch.no_grad():
            return self.backbone.encode_image(pixels)
