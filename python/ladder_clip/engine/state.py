"""The epoch commit: everything a run needs to continue after epoch k becomes visible at once, or not at all.

    OUT/state/epoch-000003/   prompt.safetensors   the method's tensors (the checkpoint format)
                              train_state.pt       optimizer, scheduler, grad scaler, RNG states
                              fewshot.json         the few-shot selection, paths relative to --data
                              history.json         loss curve, images, train time, the run's settings
                              manifest.json        the sha256 of each file above (damage is detected)

Epoch k is written into OUT/state/.tmp-epoch-k, every file and the folder fsynced, then renamed to
OUT/state/epoch-00000k in one step, and the state folder fsynced: the newest `epoch-*` folder is the
run's state. Only then are the older epoch folders deleted and OUT/prompt.safetensors (and, after the
final evaluation, OUT/metrics.json) rewritten: those are derived copies that the next run re-creates.
A kill at any instant leaves the old commit or the new one; temp folders and files are removed at the
next start. tests/pipeline/test_pipeline_resume.py kills runs at every file operation and compares weights.
"""
import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
from safetensors.torch import save_file

from ..base import files
from ..base.errors import UserError
from . import checkpoint as ckpt

STATE = "state"
PREFIX = "epoch-"
DERIVED = ("prompt.safetensors", "metrics.json")
FILES = ("prompt.safetensors", "train_state.pt", "fewshot.json", "history.json")
MANIFEST = "manifest.json"


@dataclass
class History:
    """What metrics.json reports over the whole run, carried across resumes."""
    settings: dict
    epoch: int = 0
    loss_curve: List[float] = field(default_factory=list)
    images: int = 0
    train_time: float = 0.0
    saved_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None  # training steps' peak above the resident set (peak.PeakMeter)
    tap_cache_seconds: float = 0.0  # building the frozen-tap cache (tapcache.py), over the run's builds
    epoch_seconds: List[float] = field(default_factory=list)  # each epoch's wall time, as its summary line


@dataclass
class Commit:
    """A committed epoch, read back and checked."""
    path: str
    header: dict
    tensors: dict
    train_state: dict
    fewshot: str
    history: History


def state_dir(out: str) -> str:
    return os.path.join(out, STATE)


def committed(out: str) -> List[str]:
    """The committed epoch folders, oldest first (`epoch-` + digits; anything else is not ours)."""
    sdir = state_dir(out)
    if not os.path.isdir(sdir):
        return []
    names = [n for n in os.listdir(sdir) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    return [os.path.join(sdir, n) for n in sorted(names, key=lambda n: int(n[len(PREFIX):]))]


def clean(out: str, fresh: bool) -> None:
    """Removes what a killed run left (temp files and folders, epochs older than the newest); a fresh run
    (no --resume) also removes the old run's derived files, then its commits, the newest last. In that
    order a kill never leaves a derived prompt.safetensors without a commit (which --resume refuses as an
    older version's folder); a kill before the last commit is gone leaves the old run to resume."""
    files.remove_stale(out)
    files.remove_stale(state_dir(out), folders=True)
    if fresh:
        for name in DERIVED:
            if os.path.isfile(os.path.join(out, name)):
                files.op(f"delete {name}")
                os.remove(os.path.join(out, name))
    epochs = committed(out)
    for path in epochs if fresh else epochs[:-1]:
        files.remove_tree(path)


def rng_state(device: torch.device) -> dict:
    out = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(s: dict, device: torch.device) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def commit(out: str, epoch: int, method, meta: dict, train_state: dict, fewshot: str, history: History) -> None:
    """Makes epoch `epoch` the run's state in one rename, then refreshes the derived files."""
    sdir = state_dir(out)
    if not os.path.isdir(sdir):
        os.mkdir(sdir)
        files.fsync_folder(out)  # the state folder's own entry survives a power cut too
    tmp = os.path.join(sdir, f"{files.TMP_PREFIX}{PREFIX}{epoch}")
    final = os.path.join(sdir, f"{PREFIX}{epoch:06d}")
    if os.path.exists(final):  # clean() removed any newer epoch, and epochs only grow within a run
        raise RuntimeError(f"{final} exists already")
    shutil.rmtree(tmp, ignore_errors=True)
    files.op(f"mkdir {os.path.basename(tmp)}")
    os.mkdir(tmp)
    tensors, header = ckpt.checkpoint_contents(method, {**meta, "epoch": epoch})
    text = json.dumps(asdict(history))
    writers = {"prompt.safetensors": lambda p: save_file(tensors, p, metadata={"ladder_clip": json.dumps(header)}),
               "train_state.pt": lambda p: torch.save(train_state, p),
               "fewshot.json": lambda p: _write_text(p, fewshot),
               "history.json": lambda p: _write_text(p, text)}
    for name, write in writers.items():
        files.write_synced(os.path.join(tmp, name), write)
    manifest = json.dumps({name: _sha256(os.path.join(tmp, name)) for name in writers})
    files.write_synced(os.path.join(tmp, MANIFEST), lambda p: _write_text(p, manifest))
    files.op(f"fsync {os.path.basename(tmp)}")
    files.fsync_folder(tmp)
    files.op(f"commit {os.path.basename(final)}")  # the commit point
    os.rename(tmp, final)
    files.op("fsync state folder")
    files.fsync_folder(sdir)
    for older in committed(out)[:-1]:
        files.remove_tree(older)
    publish(out)


def publish(out: str) -> None:
    """OUT/prompt.safetensors as a copy of the newest commit's (what `eval --checkpoint` is given)."""
    epochs = committed(out)
    if epochs:
        src = os.path.join(epochs[-1], "prompt.safetensors")
        files.atomic_write(os.path.join(out, "prompt.safetensors"), lambda tmp: shutil.copyfile(src, tmp))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_manifest(path: str) -> None:
    """Every file of the commit as written: torch.load and json would accept some damaged files."""
    where = os.path.join(path, MANIFEST)
    try:
        with open(where, encoding="utf-8") as f:
            sums = json.load(f)
        if not isinstance(sums, dict) or set(sums) != set(FILES):
            raise ValueError("it does not list the commit's files")
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"--resume: {where} is damaged ({exc}); train again without --resume")
    for name in FILES:
        p = os.path.join(path, name)
        if not os.path.isfile(p) or _sha256(p) != sums[name]:
            raise UserError(f"--resume: {p} is damaged (missing, or not what was committed); train again "
                            "without --resume")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _history(path: str) -> History:
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    h = History(**raw)  # a TypeError for a missing or unknown key
    ok = isinstance(h.settings, dict) and isinstance(h.epoch, int) and h.epoch >= 0 \
        and isinstance(h.loss_curve, list) and all(isinstance(v, (int, float)) for v in h.loss_curve) \
        and isinstance(h.images, int) and isinstance(h.train_time, (int, float)) \
        and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (h.saved_bytes, h.peak_bytes))
    if not ok:
        raise ValueError("a field has the wrong type")
    return h


def load(out: str, device: torch.device) -> Optional[Commit]:
    """The newest commit of OUT, checked; None when there is none. A damaged file is a UserError."""
    epochs = committed(out)
    if not epochs:
        return None
    path = epochs[-1]
    _check_manifest(path)
    header, tensors = ckpt.read_checkpoint(os.path.join(path, "prompt.safetensors"))
    name = None
    try:
        name = "train_state.pt"
        train_state = torch.load(os.path.join(path, name), map_location=device, weights_only=True)
        if not isinstance(train_state, dict) or "rng" not in train_state:
            raise ValueError("not a training state")
        name = "fewshot.json"
        with open(os.path.join(path, name), encoding="utf-8") as f:
            fewshot = f.read()
        name = "history.json"
        history = _history(os.path.join(path, name))
    except Exception as exc:  # torch.load and json raise many types for a damaged file
        raise UserError(f"--resume: {os.path.join(path, name)} is damaged ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); train again without --resume")
    if history.epoch != header.get("epoch"):
        raise UserError(f"--resume: {path} holds epoch {header.get('epoch')} in prompt.safetensors but "
                        f"{history.epoch} in history.json; train again without --resume")
    return Commit(path, header, tensors, train_state, fewshot, history)
