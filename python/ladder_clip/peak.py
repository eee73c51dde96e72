"""The training run's peak memory figure for metrics.json: the process or CUDA peak (the bytes kept for
backward come from ladder_kernels.SavedTensors). Named apart from ladder_kernels' memory.py on purpose."""
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
