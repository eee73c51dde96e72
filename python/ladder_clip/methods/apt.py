"""APT: approximated prompt attention (docs/design.md, section 3) in the frozen image encoder's attention layers,
through lk.nn.attach_apt (forward hooks on HF's CLIPAttention calling lk.apt_diffusion); backprop through
the image encoder; class features are the frozen zero-shot ones."""
from torch import nn

import ladder_kernels as lk

from .base import TemplatePromptMethod
from .options import MAX_TOKENS, Float, Int, Template


def attach(module, num_prompts, rank, dropout):
    return nn.ModuleList(lk.nn.attach_apt(module, num_prompts=num_prompts, rank=rank, dropout=dropout))


class APT(TemplatePromptMethod):
    name = "apt"
    defaults = {"num_prompts": 50, "rank": 4, "dropout": 0.0, "template": "a photo of a {}."}
    options = {"num_prompts": Int(1, MAX_TOKENS), "rank": Int(1, MAX_TOKENS),
               "dropout": Float(0.0, 1.0, high_open=True), "template": Template()}
    sized_by = (("apt.0.prompts", 0, "num_prompts"), ("apt.0.w1", 0, "rank"))

    def setup(self):
        self.apt = attach(self.backbone.clip.vision_model, self.cfg["num_prompts"], self.cfg["rank"],
                          self.cfg["dropout"])
        self.apt.to(self.backbone.device)

    def image_features(self, pixels):
        return self.backbone.encode_image(pixels)

    def inference_state(self):
        """One APTPrompt beside each image-encoder layer's attention, in layer order ("<layer>.<tensor>")."""
        tensors = {k[len("apt."):]: v for k, v in self.state_to_save().items() if k.startswith("apt.")}
        return {"kind": "apt", "tensors": tensors,
                "info": {"num_prompts": self.cfg["num_prompts"], "rank": self.cfg["rank"]}}
