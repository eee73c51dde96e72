"""Prompt-only checkpoints: the method's own tensors (never the frozen CLIP) plus the JSON needed to
rebuild it, in one safetensors file written atomically (temp file + fsync + rename)."""
import json
import os
import tempfile
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError

FORMAT = "ladder_clip/1"


def atomic_write(path: str, write) -> None:
    """write(tmp_path) then rename over `path`: a killed run leaves the old file or the new one, whole."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str, method, meta: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in method.state_to_save().items()}
    header = {"format": FORMAT, "method": method.name, "config": method.config(),
              "backbone": method.backbone.signature(), "classnames": method.classnames, **meta}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"ladder_clip": json.dumps(header)}))


def read_checkpoint(path: str):
    """(header dict, {name: tensor}); a clear UserError for a missing, corrupt or foreign file."""
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
    header = json.loads(meta["ladder_clip"])
    if header.get("format") != FORMAT:
        raise UserError(f"checkpoint {path!r} has format {header.get('format')!r}, expected {FORMAT!r}")
    return header, tensors


def check_compatible(header: dict, path: str, backbone, method_name: Optional[str] = None) -> None:
    if method_name is not None and header["method"] != method_name:
        raise UserError(f"checkpoint {path!r} is for method {header['method']!r}, not {method_name!r}")
    if header["backbone"] != backbone.signature():
        raise UserError(f"checkpoint {path!r} was trained on another model than {backbone.name!r} "
                        f"(its backbone: {header['backbone']})")


def load_into(method, tensors: dict, path: str) -> None:
    expected = method.state_to_save()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"checkpoint {path!r} does not fit method {method.name!r} "
                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    own = dict(method.named_parameters(remove_duplicate=False))
    own.update(dict(method.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for k, v in tensors.items():
            if own[k].shape != v.shape:
                raise UserError(f"checkpoint {path!r}: {k} has shape {tuple(v.shape)}, the method "
                                f"{method.name!r} with this model needs {tuple(own[k].shape)}")
            own[k].copy_(v)
