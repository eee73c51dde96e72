"""Hugging Face CLIP behind a small adapter: per-layer taps of both encoders, a text forward from input
embeddings (HF's text model only takes ids), and a hook before every layer for deep prompts.

`tiny_clip()` builds a small random CLIP with a byte-level tokenizer made in code; load.py's
`load_backbone` turns any --model (tiny, tiny-pretrained, a folder, a checkpoint file) into a CLIPBackbone.
"""
import hashlib
import json
import os
import warnings
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from .tokenizer import byte_level_tokenizer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LayerHook = Optional[Callable[[int, torch.Tensor], torch.Tensor]]


def tiny_clip(seed: int = 0):
    """A random CLIP small enough for CPU tests and the demo, with its byte-level tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    tok = byte_level_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model, tok


def preprocess_config(path: Optional[str], image_size: int) -> dict:
    cfg = {"size": image_size, "crop": image_size, "mean": OPENAI_MEAN, "std": OPENAI_STD}
    file = os.path.join(path, "preprocessor_config.json") if path else None
    if file and os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            pp = json.load(f)
        size, crop = pp.get("size", image_size), pp.get("crop_size", image_size)
        cfg["size"] = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else size
        cfg["crop"] = crop.get("height", image_size) if isinstance(crop, dict) else crop
        cfg["mean"] = tuple(pp.get("image_mean", OPENAI_MEAN))
        cfg["std"] = tuple(pp.get("image_std", OPENAI_STD))
    if cfg["crop"] != image_size:  # the vision embeddings only accept their own image size
        cfg["crop"] = image_size
        cfg["size"] = max(cfg["size"], image_size) if cfg["size"] else image_size
    return cfg


def _weight_hashes(clip) -> dict:
    """{"weights": the text projection's (older checkpoints), "frozen_weights": every tensor's, by name}."""
    w = clip.text_projection.weight.detach().float().cpu().numpy().tobytes()
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(clip.state_dict().items()):
        h.update(f"{name} {tuple(t.shape)} {t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return {"weights": hashlib.sha1(w).hexdigest()[:16], "frozen_weights": h.hexdigest()}


def _run_layers(layers, h: torch.Tensor, mask, hook: LayerHook, taps):
    """h through `layers` (hook(i, h) before layer i) -> (last h, taps): with `taps` True every layer's
    input 0 and output i + 1, with a list of such indices only those, in its order (the rest are freed
    as the encoder goes), with False none."""
    keep = set(range(len(layers) + 1)) if taps is True else set(taps or ())
    outs = {0: h} if 0 in keep else {}
    for i, layer in enumerate(layers):
        if hook is not None:
            h = hook(i, h)
        h = layer(h, mask)
        if i + 1 in keep:
            outs[i + 1] = h
    return h, [outs[i] for i in (sorted(outs) if isinstance(taps, bool) else taps)]


class CLIPBackbone(nn.Module):
    """A frozen CLIPModel with the forwards the prompt methods need. All its parameters are frozen."""

    def __init__(self, clip, tokenizer, name: str, preprocess: dict):
        super().__init__()
        self.clip = clip.eval()
        self.clip.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.preprocess = preprocess
        tc, vc = clip.config.text_config, clip.config.vision_config
        self.text_width, self.vision_width = tc.hidden_size, vc.hidden_size
        self.text_layers, self.vision_layers = tc.num_hidden_layers, vc.num_hidden_layers
        self.embed_dim = clip.config.projection_dim
        self.context_length = tc.max_position_embeddings
        self.eos_token_id = tc.eos_token_id
        self._hashes = _weight_hashes(clip)
        if self.eos_token_id != 2 and tokenizer.eos_token_id != self.eos_token_id:
            # HF would pool at position 0 of every sequence; the tokenizer's end token is what we append
            warnings.warn(f"model {name!r}: config eos_token_id {self.eos_token_id} is not the tokenizer's end "
                          f"token {tokenizer.eos_token_id}; pooling at the tokenizer's end token")
            self.eos_token_id = tokenizer.eos_token_id

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen: CLIP's own dropout never switches on
        return self

    def signature(self) -> dict:
        """What a checkpoint must match: the architecture, a hash of every frozen weight ("frozen_weights",
        taken when the model was loaded, so an int8 or offloaded backbone keeps it), and the hash of the
        text projection alone ("weights") that older checkpoints carry."""
        c = self.clip.config
        arch = dict(text_width=self.text_width, vision_width=self.vision_width, text_layers=self.text_layers,
                    vision_layers=self.vision_layers, embed_dim=self.embed_dim,
                    vocab=c.text_config.vocab_size, image_size=c.vision_config.image_size,
                    patch=c.vision_config.patch_size)
        return {**arch, **self._hashes}

    # ---- text -------------------------------------------------------------------------------------------
    def token_ids(self, text: str) -> List[int]:
        """Token ids of `text` without start/end tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def build_ids(self, middle: Sequence[Sequence[int]]) -> torch.Tensor:
        """[start] + middle[c] + [end], padded with the end token and truncated to the context length."""
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        rows = [[bos] + list(m)[: self.context_length - 2] + [eos] for m in middle]
        length = max(len(r) for r in rows)
        return torch.tensor([r + [eos] * (length - len(r)) for r in rows], device=self.device)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.build_ids([self.token_ids(t) for t in texts])

    def eot_index(self, ids: torch.Tensor) -> torch.Tensor:
        """The pooling position, exactly as HF's CLIPTextModel picks it."""
        if self.eos_token_id == 2:  # legacy configs: the end token is the highest id
            return ids.to(torch.int).argmax(-1)
        return (ids.to(torch.int) == self.eos_token_id).int().argmax(-1)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.text_model.embeddings.token_embedding(ids)

    @property
    def text_pos(self) -> torch.Tensor:
        return self.clip.text_model.embeddings.position_embedding.weight

    @property
    def device(self):
        return self.clip.text_projection.weight.device

    def causal_mask(self, length: int, like: torch.Tensor) -> torch.Tensor:
        dtype = like.dtype
        if torch.is_autocast_enabled(like.device.type):
            dtype = torch.get_autocast_dtype(like.device.type)
        mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=like.device)
        return mask.triu(1)[None, None]

    def encode_text_embeds(self, embeds: torch.Tensor, eot: torch.Tensor, add_pos: bool = True,
                           hook: LayerHook = None, taps: Union[bool, Sequence[int]] = False,
                           pool: bool = True):
        """embeds (C, L, D) token embeddings -> (C, E) projected features [, taps: the input of layer 0
        and the output of every layer, layers + 1 tensors of (C, L, D); or, with `taps` a list of
        indices into those, only them, in that order (the others are freed as the encoder goes)].

        The same computation as CLIPModel.get_text_features on ids: position embeddings, the encoder with
        a causal mask, the final LayerNorm, pooling at the end token, the projection. `hook(i, h)` runs
        before layer i (deep prompts replace tokens there).
        """
        tm = self.clip.text_model
        h = embeds + self.text_pos[: embeds.shape[1]].to(embeds.dtype) if add_pos else embeds
        h, outs = _run_layers(tm.encoder.layers, h, self.causal_mask(h.shape[1], h), hook, taps)
        if not pool:
            return h, outs
        h = tm.final_layer_norm(h)
        feats = self.clip.text_projection(h[torch.arange(h.shape[0], device=h.device), eot])
        return (feats, outs) if taps else feats

    def encode_text(self, ids: torch.Tensor, taps: Union[bool, Sequence[int]] = False):
        return self.encode_text_embeds(self.token_embedding(ids), self.eot_index(ids), taps=taps)

    # ---- image ------------------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor, hook: LayerHook = None, taps: Union[bool, Sequence[int]] = False,
                     insert: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """pixels (B, 3, H, W) -> (B, E) projected features [, taps: layer 0's input, every layer's output,
        or only those listed as in encode_text_embeds].
        `insert(h)` may add prompt tokens after the embeddings (before the pre-LayerNorm), as VPT does."""
        vm = self.clip.vision_model
        h = vm.embeddings(pixels)
        if insert is not None:
            h = insert(h)
        h, outs = _run_layers(vm.encoder.layers, vm.pre_layrnorm(h), None, hook, taps)
        feats = self.clip.visual_projection(vm.post_layernorm(h[:, 0]))
        return (feats, outs) if taps else feats

    def embed_image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        vm = self.clip.vision_model
        return vm.pre_layrnorm(vm.embeddings(pixels))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()
