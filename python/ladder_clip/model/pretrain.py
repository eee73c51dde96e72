"""`--model tiny-pretrained`: the tiny CLIP, pretrained contrastively in seconds on generated image-caption
pairs, so that prompt tuning on it starts from a zero-shot model that means something (the random `tiny`
one scores at chance, and nothing learned on it can be told apart from noise).

The pretraining set is every colour x shape of synthetic.py except the four "diagonal" pairs (red circle,
green square, blue triangle, yellow cross: the demo's classes), captioned "<prefix><colour> <shape>."
with a prefix of PREFIXES; each colour and each shape is seen, never those four pairings. Zero-shot on them is therefore
compositional transfer to unseen classes (tests/pipeline/test_pipeline_pretrain.py asserts it is clearly above
chance). The model is saved with save_pretrained in a cache folder (LADDER_CLIP_CACHE, else
~/.cache/ladder_clip) under a name with the recipe's version, written under a temporary name and renamed,
and rebuilt when missing.
"""
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import warnings

import torch
from torch.nn import functional as F

from ..base.errors import UserError
from ..data.synthetic import COLOURS, SHAPES, draw_shape
from ..data.transforms import Preprocess
from .backbone import CLIPBackbone, preprocess_config, tiny_clip

MANIFEST = "ladder_clip_manifest.json"  # the sha256 of every file of the cached folder, written last
LEGACY_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
VERSION = "tiny-pretrained-v2"  # bump when the recipe changes: caches keyed by it are rebuilt
UNSEEN = [f"{c} {s}" for c, s in zip(COLOURS, SHAPES)]
SEEN = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in UNSEEN]
STEPS, BATCH, PER_CLASS, LR = 200, 64, 32, 2e-3
LOGIT_SCALE = 100.0  # OpenAI CLIP's learned scale ends at its clamp, 100; prompt tuning's gradients scale with it
GRAD_CLIP = 1.0
# The few-shot set of the demo and tests/pipeline/test_pipeline_learning.py: the unseen classes on a lighter
# background than pretraining's (0, 90), a domain shift as CLIP meets on specialised datasets. On the
# pretraining's own background zero-shot already tells the four apart (by colour or shape), leaving nothing
# to learn; here it does not, while a linear probe of the frozen image features still does
# (tests/pipeline/test_pipeline_learning.py asserts both).
SHIFTED_BACKGROUND = (60, 150)
# Caption wordings of different lengths, one drawn per class and step: a web-trained CLIP has read class
# names after prefixes of every length, so a prompt method's context (CoOp's 16 learned tokens) does not
# push the name to positions its text encoder never read one at.
PREFIXES = ("", "a ", "the ", "itap of a ", "a photo of a ", "a good photo of the ", "a close-up photo of a ",
            "a low resolution photo of the ", "there is a picture here of a ")


def cache_dir() -> str:
    return os.environ.get("LADDER_CLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ladder_clip")


def images(names, per_class: int, seed: int, preprocess) -> torch.Tensor:
    """(len(names) * per_class, 3, S, S) preprocessed generated images, class-major."""
    rng = random.Random(seed)
    out = []
    for name in names:
        colour, shape = name.split()
        for _ in range(per_class):
            out.append(preprocess(draw_shape(rng, COLOURS[colour], shape, 40)))
    return torch.stack(out)


def captions(names, prefix: str = "a photo of a "):
    return [f"{prefix}{n}." for n in names]


def pretrain(seed: int = 0, steps: int = STEPS):
    """(CLIPModel, tokenizer) trained with the symmetric CLIP loss on SEEN; seconds on a CPU.

    On one thread, with clipped gradients and a logit scale ramped (not learned) from CLIP's initial 1/0.07
    to 100: a learned scale on all threads made the unseen-class zero-shot vary wildly between runs of one
    seed; this recipe gives the same model on every run."""

    model, tok = tiny_clip(seed)
    b = CLIPBackbone(model, tok, "tiny", preprocess_config(None, model.config.vision_config.image_size))
    pre = Preprocess(b.preprocess)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a thread count changes float sums, and the model would differ by machine
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = images(SEEN, PER_CLASS, seed, pre)
            labels = torch.arange(len(SEEN)).repeat_interleave(PER_CLASS)
            model.train()
            for p in model.parameters():
                p.requires_grad_(True)
            start = model.logit_scale.item()
            model.logit_scale.requires_grad_(False)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps, pct_start=0.1)
            for step in range(steps):
                with torch.no_grad():  # a ramp: at 100 from the start a random CLIP learns nothing (chance)
                    model.logit_scale.fill_(start + (math.log(LOGIT_SCALE) - start) * step / max(1, steps - 1))
                pick = torch.randint(0, len(x), (BATCH,))
                img = x[pick]
                flip = torch.rand(BATCH) < 0.5  # shapes are mirror-symmetric; the flip is cheap variety
                img = torch.where(flip[:, None, None, None], img.flip(-1), img)
                fi = F.normalize(b.encode_image(img), dim=-1)
                which = torch.randint(0, len(PREFIXES), (len(SEEN),)).tolist()
                ids = b.tokenize([f"{PREFIXES[w]}{n}." for w, n in zip(which, SEEN)])
                ft = F.normalize(b.encode_text(ids), dim=-1)
                logits = model.logit_scale.exp() * fi @ ft.t()  # every caption: duplicates are one class
                y = labels[pick]
                # image -> caption, and caption -> its images (the other direction of CLIP's loss)
                loss = F.cross_entropy(logits, y) + F.cross_entropy(logits.t()[y.unique()], _targets(y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                opt.step()
                sched.step()
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
    finally:
        torch.set_num_threads(threads)
    return model, tok


def _targets(y: torch.Tensor) -> torch.Tensor:
    """For each caption present in the batch, a soft target spread over its images."""
    present = y.unique()
    t = (y[None, :] == present[:, None]).float()
    return t / t.sum(1, keepdim=True)


def _cache_root() -> str:
    """The cache folder, checked writable before seconds of pretraining are spent; errors name it."""
    root = cache_dir()
    name = f"LADDER_CLIP_CACHE={root!r}" if os.environ.get("LADDER_CLIP_CACHE") else \
        f"the cache folder {root!r} (set LADDER_CLIP_CACHE to use another)"
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"--model tiny-pretrained: {name} is a file, not a folder")
    try:
        os.makedirs(root, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=root)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UserError(f"--model tiny-pretrained: cannot write in {name} ({exc.strerror or exc})")
    return root


def _sums(folder: str) -> dict:
    return {n: _sha256(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n != MANIFEST}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _intact(path: str) -> bool:
    """Whether the cached folder holds what was written: its manifest (written last) lists every file as
    it is; a folder from before the manifest must at least hold every file save_pretrained writes."""
    try:
        has = lambda n: os.path.isfile(os.path.join(path, n))  # noqa: E731
        if not has(MANIFEST):
            return all(map(has, LEGACY_FILES)) and (has("tokenizer.json") or (has("vocab.json") and has("merges.txt")))
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            return json.load(f) == _sums(path)
    except (OSError, ValueError):
        return False


def pretrained_tiny() -> str:
    """The cached folder of the pretrained tiny CLIP (save_pretrained layout), built when missing, and
    rebuilt when damaged (a file missing or changed: the manifest does not match)."""
    path = os.path.join(cache_dir(), VERSION)
    if _intact(path):
        return path
    root = _cache_root()
    if os.path.exists(path):
        warnings.warn(f"the cached tiny-pretrained model {path!r} is damaged or incomplete; rebuilding it")
    model, tok = pretrain()
    tmp = tempfile.mkdtemp(prefix=f".tmp-{VERSION}-", dir=root)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(_sums(tmp), f)
        if os.path.exists(path) and not _intact(path):  # the damaged one (another process may have fixed it)
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first: its folder is the same model
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
