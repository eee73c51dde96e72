"""Whether a file is a bundle (`ladder-clip export`'s), with the standard library only: the CLI decides how
to run `eval` / `predict` before torch is imported, and a safetensors file's JSON header says it."""
import json
import os
import struct
from typing import Optional

META_KEY = "ladder_clip_bundle"  # the bundle's JSON header, in the safetensors metadata
CHECKPOINT_KEY = "ladder_clip"   # a prompt checkpoint's (engine/checkpoint.py)
MAX_HEADER = 100_000_000  # bytes of a safetensors JSON header read to tell what a file is


def safetensors_metadata(path: str) -> Optional[dict]:
    """The `__metadata__` of a safetensors file, or None when it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            n = struct.unpack("<Q", head)[0]
            if not 2 <= n <= MAX_HEADER:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def is_bundle(path) -> bool:
    """A file an export wrote (of any version: another version is then refused by bundle.read_bundle)."""
    return isinstance(path, str) and os.path.isfile(path) and META_KEY in (safetensors_metadata(path) or {})
