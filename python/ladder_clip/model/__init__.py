"""The model layer: the tokenizer, CLIP behind its adapter (backbone.py), OpenAI / open_clip checkpoint files,
the tiny pretrained CLIP, the one `load_backbone` (load.py) and the int8 backbone; it imports only the base
and data layers."""
