"""CLIP tokenizers built in code (no downloads).

`byte_level_tokenizer()`, for the random `tiny` model, is a genuine transformers CLIPTokenizer whose
vocabulary is the 256 byte symbols of CLIP's byte-level BPE, each also in its end-of-word form, plus the
start and end tokens, and no merges: every word is spelled out byte by byte. It saves and loads with
save_pretrained / AutoTokenizer like any CLIP tokenizer.

`bpe_tokenizer(file)` is CLIP's own 49408-token BPE, made from the merges file OpenAI's `clip` and
open_clip ship (`find_clip_merges()` looks for it in those packages, without importing them).
"""
import gzip
import importlib.util
import os
from typing import Optional

from transformers import CLIPTokenizer

from ..base.errors import UserError

MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # how many of the file's merges OpenAI's simple_tokenizer uses


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


def bpe_tokenizer(merges_file: str) -> CLIPTokenizer:
    """The tokenizer OpenAI's simple_tokenizer builds from `merges_file` (.txt or .txt.gz): ids are the 256
    byte symbols, the same with "</w>", one token per merge in file order, then <|startoftext|>,
    <|endoftext|> (49406, 49407 with the full file). Raises ValueError on a malformed file."""
    opener = gzip.open if merges_file.endswith(".gz") else open
    with opener(merges_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:N_MERGES + 1]  # the first line is a version header
    merges = [tuple(line.split()) for line in lines if line.strip()]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None or not merges:
        raise ValueError(f"{merges_file}: expected lines of two symbols (a BPE merges file), got "
                         f"{' '.join(merges[bad]) if merges else 'no merges'!r}")
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def find_clip_merges() -> Optional[str]:
    """CLIP's merges file inside an installed open_clip or clip package, or None. find_spec locates a
    top-level package without importing it (importing either would pull in torchvision and more)."""
    for package in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(folder, MERGES_FILE)
            if os.path.isfile(path):
                return path
    return None


def load_tokenizer(path: str, model_folder: bool = False) -> CLIPTokenizer:
    """The one tokenizer loader: `path` is a tokenizer folder (save_pretrained files) or CLIP's merges file
    (.txt / .txt.gz), as --tokenizer gives it; with `model_folder`, the tokenizer files saved in a --model
    folder."""
    from transformers import AutoTokenizer

    if model_folder:
        has = lambda f: os.path.isfile(os.path.join(path, f))  # noqa: E731
        if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
            raise UserError(f"--model {path!r}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
                            "save the tokenizer with save_pretrained into the same folder")
        failed, cut = f"--model {path!r}: cannot load its tokenizer files", None
    else:
        if os.path.isfile(path):
            try:
                return bpe_tokenizer(path)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise UserError(f"--tokenizer {path!r}: not a CLIP merges file ({str(exc).splitlines()[0][:200]})")
        if not os.path.isdir(path):
            raise UserError(f"--tokenizer {path!r}: no such file or folder (expected a folder with tokenizer.json "
                            "or vocab.json + merges.txt, or CLIP's bpe_simple_vocab_16e6.txt.gz)")
        failed, cut = f"--tokenizer {path!r}: cannot load a tokenizer from it", 200
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types; one line is what the user needs
        raise UserError(f"{failed} ({str(exc).splitlines()[0][:cut]})")
