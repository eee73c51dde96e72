"""A small byte-level CLIP tokenizer built in code (no downloads), for the random `tiny` model.

It is a genuine transformers CLIPTokenizer whose vocabulary is the 256 byte symbols of CLIP's byte-level
BPE, each also in its end-of-word form, plus the start and end tokens, and no merges: every word is spelled
out byte by byte. It saves and loads with save_pretrained / AutoTokenizer like any CLIP tokenizer.
"""
from transformers import CLIPTokenizer


def _bytes_to_unicode():
    # CLIP's (and GPT-2's) reversible byte -> printable character map.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def byte_level_tokenizer() -> CLIPTokenizer:
    """514 tokens: 256 byte symbols, 256 end-of-word byte symbols, <|startoftext|> 512, <|endoftext|> 513."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[])
