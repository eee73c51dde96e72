"""Memory figures: the process or CUDA peak, and the bytes autograd saves for backward in one step."""
import contextlib
import resource
import sys

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """CUDA: max_memory_allocated. CPU: the process's peak resident set (never resets)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class SavedTensors(contextlib.AbstractContextManager):
    """Records every tensor autograd saves for backward (saved_tensors_hooks). `bytes` counts each storage
    once and leaves out parameters (alive anyway); `tensors` keeps what was saved, for tests."""

    def __init__(self, params=(), keep: bool = False):
        self._param_ptrs = {p.data_ptr() for p in params}
        self.keep, self.tensors, self._seen, self.bytes = keep, [], set(), 0

    def _pack(self, t):
        if self.keep:
            self.tensors.append(t)
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return t
        if key not in self._seen and t.data_ptr() not in self._param_ptrs:
            self._seen.add(key)
            self.bytes += key[1]
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
