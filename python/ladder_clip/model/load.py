"""The one `load_backbone`: "tiny", "tiny-pretrained" (pretrain.py), a save_pretrained folder, offline, or an
OpenAI / open_clip ViT checkpoint file, converted (openai_clip.py)."""
import os
from typing import Optional

from ..base.errors import UserError
from . import openai_clip, pretrain
from .backbone import CLIPBackbone, preprocess_config, tiny_clip
from .tokenizer import load_tokenizer


def load_backbone(spec: str, device="cpu", tokenizer: Optional[str] = None,
                  activation: Optional[str] = None) -> "CLIPBackbone":
    """`spec` is "tiny", "tiny-pretrained", a local directory written by CLIPModel.save_pretrained +
    tokenizer.save_pretrained, or a checkpoint file of a ViT CLIP in OpenAI's layout: OpenAI's `clip`
    download (a TorchScript archive, read without running it), or a state dict as open_clip saves it
    (.pt / .pth / .bin, weights only; .safetensors). A file gets OpenAI's preprocessing and the tokenizer
    `tokenizer` (a folder or CLIP's merges file), else CLIP's BPE from an installed open_clip / clip.
    `tokenizer` also replaces a folder's own tokenizer. `activation` ("quick_gelu", the default, or "gelu")
    is a file's MLP activation, which its weights do not record (a folder's config.json has it)."""
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is for our progress bars and our one-line errors
    hf_logging.set_verbosity_error()

    if activation is not None and not os.path.isfile(spec):
        raise UserError(f"--activation: only for a --model checkpoint file (a folder's config.json or the "
                        f"tiny models set their own); drop --activation {activation!r}")
    if spec == "tiny-pretrained":  # built in a cache folder on first use (pretrain.py), then a folder
        spec = pretrain.pretrained_tiny()
    if spec == "tiny":
        if tokenizer is not None:
            raise UserError(f"--tokenizer: the tiny model has its own tokenizer; drop --tokenizer {tokenizer!r}")
        model, tok = tiny_clip()
        pp = preprocess_config(None, model.config.vision_config.image_size)
        return CLIPBackbone(model, tok, "tiny", pp).to(device)
    if os.path.isfile(spec):
        model, tok = openai_clip.load_clip_file(spec, tokenizer, hidden_act=activation or "quick_gelu")
        pp = preprocess_config(None, model.config.vision_config.image_size)  # OpenAI's: bicubic, crop, mean/std
        return CLIPBackbone(model, tok, os.path.abspath(spec), pp).to(device)
    if not os.path.isdir(spec):
        raise UserError(f"--model {spec!r}: not a directory or a file (give 'tiny', a folder written by "
                        "save_pretrained, or an OpenAI / open_clip CLIP checkpoint file)")
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise UserError(f"--model {spec!r}: no config.json in it; is it a save_pretrained folder?")
    try:
        model = CLIPModel.from_pretrained(spec, local_files_only=True)
    except Exception as exc:  # transformers raises many types; one line is what the user needs
        raise UserError(f"--model {spec!r}: cannot load a CLIPModel from it ({str(exc).splitlines()[0]})")
    tok = load_tokenizer(tokenizer) if tokenizer is not None else load_tokenizer(spec, model_folder=True)
    pp = preprocess_config(spec, model.config.vision_config.image_size)
    return CLIPBackbone(model, tok, os.path.abspath(spec), pp).to(device)
