"""What autograd keeps for backward: the measure behind every memory contract of this package.

    with lk.SavedTensors() as saved:
        loss = model(x)
    saved.bytes      # each storage once; storages of `exclude` (e.g. parameters, alive anyway) left out

The tests, the benchmarks, the demo and the pipeline's training log all count with this one class, so
their "saved for backward" figures mean the same thing.
"""
import contextlib
from typing import Iterable, List

import torch
from torch import Tensor


def _storage_key(t: Tensor):
    """(address, bytes) of t's storage, or None for tensors without one (some subclasses, fake tensors)."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class SavedTensors(contextlib.AbstractContextManager):
    """Records the tensors autograd saves for backward inside the `with` block.

    bytes:   the saved storages' sizes, each storage counted once (views of one buffer share it) and
             storages of `exclude` left out.
    tensors: everything that was saved, in order (only with keep=True: keeping them keeps them alive).
    """

    def __init__(self, exclude: Iterable[Tensor] = (), keep: bool = False):
        self._excluded = {k[0] for k in map(_storage_key, exclude) if k is not None and k[1] > 0}
        self._seen = set()
        self.keep = keep
        self.tensors: List[Tensor] = []
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        if self.keep:
            self.tensors.append(t)
        key = _storage_key(t)
        if key is not None and key not in self._seen and key[0] not in self._excluded:
            self._seen.add(key)
            self.bytes += key[1]
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)
