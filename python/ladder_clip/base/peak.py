"""The training run's peak memory for metrics.json, by the benchmarks' rule (benchmarks/train_step.py):
the peak above what was resident before training, over training steps only (never the evaluation or the
epoch commits). CUDA: max_memory_allocated after reset_peak_memory_stats. CPU (Linux): the process's
VmHWM, reset to the current resident set through /proc/self/clear_refs after malloc_trim hands freed heap
pages back; elsewhere the never-reset getrusage peak (marked so in the kind). The bytes kept for backward
come from ladder_kernels.SavedTensors. Named apart from ladder_kernels' memory.py on purpose."""
import ctypes
import gc
import resource
import sys

import torch


def proc_status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM: Linux). The benchmarks read memory the same way."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def reset_rss_peak() -> bool:
    """Drop freed heap pages, then reset VmHWM to the current RSS (Linux >= 4.0). False where impossible."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        proc_status("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def follow_live_memory() -> bool:
    """Makes glibc mmap every allocation from 64 KiB (mallopt M_MMAP_THRESHOLD), so freed tensors leave
    the resident set at once and VmHWM follows what is alive, as the benchmarks' subprocesses do with
    MALLOC_MMAP_THRESHOLD_=65536; otherwise heap pages kept from an earlier run blur the figure. False
    where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 65536))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class PeakMeter:
    """start() before training (what is resident then is the baseline); reset() before each epoch's
    steps and read() right after them, so commits between epochs are not counted; peak() is the largest
    reading above the baseline."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resident = 0
        self.total = None
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"

    def start(self) -> None:
        self.reset()
        self.resident = self._current()

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not reset_rss_peak():
            self.kind = "process peak RSS (getrusage, never reset: includes everything before training)"

    def _current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        try:
            return proc_status("VmRSS")
        except OSError:
            return 0

    def read(self) -> int:
        """The peak since the last reset (total, not above the baseline); also kept for peak()."""
        if self.device.type == "cuda":
            now = int(torch.cuda.max_memory_allocated(self.device))
        else:
            try:
                now = proc_status("VmHWM")
            except OSError:
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                now = int(rss if sys.platform == "darwin" else rss * 1024)
        self.total = now if self.total is None else max(self.total, now)
        return now

    def peak(self):
        """Peak above the baseline, or None when no training step ran."""
        return None if self.total is None else max(0, self.total - self.resident)
