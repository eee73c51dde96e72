"""Prompt-only checkpoints: the method's own tensors (never the frozen CLIP) plus the JSON needed to
rebuild it, in one safetensors file written atomically (temp file + fsync + rename). A header is checked
field by field when read, and its method config against the method's declared options, so a crafted
file gives one clear error and never builds anything large."""
import json
import os
import warnings
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..base import files
from ..base.errors import UserError

FORMAT = "ladder_clip/1"
MAX_CLASSES = 100000
FULL_HASH = "frozen_weights"  # backbone.signature()'s hash of every weight; older checkpoints lack it


def checkpoint_contents(method, meta: dict):
    """(tensors, header) of the method's checkpoint."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in method.state_to_save().items()}
    header = {"format": FORMAT, "method": method.name, "config": method.config(),
              "backbone": method.backbone.signature(), "classnames": method.classnames, **meta}
    return tensors, header


def save_checkpoint(path: str, method, meta: dict) -> None:
    tensors, header = checkpoint_contents(method, meta)
    files.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"ladder_clip": json.dumps(header)}))


def _check_header(header, path: str) -> dict:
    from ..methods import METHODS

    where = f"checkpoint {path!r}"
    if not isinstance(header, dict):
        raise UserError(f"{where}: its ladder_clip metadata must be a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        raise UserError(f"{where} has format {header.get('format')!r}, expected {FORMAT!r}")
    for key, kind in (("method", str), ("backbone", dict), ("config", dict), ("classnames", list)):
        if not isinstance(header.get(key), kind):
            raise UserError(f"{where}: metadata field {key!r} must be a {kind.__name__}, got "
                            f"{type(header.get(key)).__name__ if key in header else 'nothing'}")
    if header["method"] not in METHODS:
        raise UserError(f"{where}: unknown method {header['method']!r} (known: {', '.join(METHODS)})")
    names = header["classnames"]
    if not 0 < len(names) <= MAX_CLASSES or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{where}: metadata field 'classnames' must list 1..{MAX_CLASSES} class names")
    epoch = header.get("epoch", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise UserError(f"{where}: metadata field 'epoch' must be an integer >= 0, got {epoch!r}")
    try:  # the method's own option types and ranges: nothing is built from an unchecked config
        header["config"] = METHODS[header["method"]].check_options(header["config"], where=f"{where}: config")
    except ValueError as exc:
        raise UserError(str(exc))
    return header


def read_checkpoint(path: str):
    """(header dict, {name: tensor}); a clear UserError for a missing, corrupt or foreign file."""
    if os.path.isdir(path):
        inside = os.path.join(path, "prompt.safetensors")
        hint = f"; pass {inside!r}" if os.path.isfile(inside) else " (expected a .safetensors file)"
        raise UserError(f"checkpoint {path!r} is a folder{hint}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"checkpoint {path!r} is not a readable safetensors file ({exc})")
    if "ladder_clip" not in meta:
        raise UserError(f"checkpoint {path!r} was not written by ladder-clip (no ladder_clip metadata)")
    try:
        header = json.loads(meta["ladder_clip"])
    except ValueError as exc:
        raise UserError(f"checkpoint {path!r}: its ladder_clip metadata is not valid JSON ({exc})")
    except RecursionError:
        raise UserError(f"checkpoint {path!r}: its ladder_clip metadata is JSON nested too deeply") from None
    header = _check_header(header, path)
    check_sizes(header, tensors, path)
    return header, tensors


def check_sizes(header: dict, tensors: dict, path: str) -> None:
    """The config against the tensors the file holds, before anything is built from the config."""
    from ..methods import METHODS

    cls = METHODS[header["method"]]
    for name, dim, option in cls.sized_by:
        want = cls.expected_size(header["config"], option, header["backbone"])
        t = tensors.get(name)
        if want is not None and (t is None or t.dim() <= dim or t.shape[dim] != want):
            got = "no such tensor" if t is None else f"{name} has shape {tuple(t.shape)}"
            raise UserError(f"checkpoint {path!r}: its config {option}={header['config'][option]!r} needs "
                            f"{name} of size {want} in dim {dim}, but {got}")


def check_compatible(header: dict, path: str, backbone, method_name: Optional[str] = None) -> None:
    if method_name is not None and header["method"] != method_name:
        raise UserError(f"checkpoint {path!r} is for method {header['method']!r}, not {method_name!r}")
    theirs, mine = header["backbone"], backbone.signature()
    keys = set(mine) if FULL_HASH in theirs else set(mine) - {FULL_HASH}
    differ = sorted(k for k in keys if theirs.get(k) != mine[k])
    if differ:
        raise UserError(f"checkpoint {path!r} was trained on another model than {backbone.name!r} "
                        f"({', '.join(f'{k}: {theirs.get(k)!r} here {mine[k]!r}' for k in differ[:3])})")
    if FULL_HASH not in theirs:
        warnings.warn(f"checkpoint {path!r} was written by an older ladder-clip, which recorded a hash of the "
                      "text projection only: the rest of the model could not be checked against it")


def load_into(method, tensors: dict, path: str) -> None:
    expected = method.state_to_save()
    missing = sorted(set(expected) - set(tensors) - set(method.added_later))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"checkpoint {path!r} does not fit method {method.name!r} "
                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    own = dict(method.named_parameters(remove_duplicate=False))
    own.update(dict(method.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for k, v in tensors.items():
            if own[k].shape != v.shape or own[k].dtype != v.dtype:
                raise UserError(f"checkpoint {path!r}: {k} is {v.dtype} {tuple(v.shape)}, the method "
                                f"{method.name!r} with this model needs {own[k].dtype} {tuple(own[k].shape)}")
            if v.is_floating_point() and not torch.isfinite(v.float()).all():
                raise UserError(f"checkpoint {path!r}: {k} holds non-finite values")
            own[k].copy_(v)
