"""The counter-based dropout streams of the ops: the Python mirror of csrc/hash.h (which the C++ and CUDA
kernels include, and the Triton kernels restate). A mask is a pure function of (seed, element index),
so the backward regenerates it instead of storing it, and every backend draws the same mask.

    fmix32            MurmurHash3's 32-bit finaliser
    keep             (hash >> 8) >= threshold(p),  threshold(p) = floor(p 2^24 + 0.5)
    row-col stream   hash(m, j) = fmix32(fmix32(m * 0x9E3779B1 ^ seed) ^ (j * 0x85EBCA77))   (APT's A)
    flat stream      hash(i) = fmix32(fmix32(i ^ key) + key),  key = fmix32(seed ^ 0x9E3779B9)  (RLP's A B)

All arithmetic is mod 2^32; on int64 tensors it is done without overflowing int64.
"""
import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
ROW_KEY, COL_KEY, SEED_KEY = 0x9E3779B1, 0x85EBCA77, 0x9E3779B9


def threshold(p: float) -> int:
    """An element is kept when the top 24 bits of its hash are >= this, so P(drop) = threshold / 2^24."""
    return int(p * 16777216.0 + 0.5)  # p < 1, so at most 2^24


def mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32): c split into 16-bit halves so int64 never overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def fmix32(h):
    """MurmurHash3's 32-bit finaliser, on Python ints and int64 tensors alike."""
    h = h ^ (h >> 16)
    h = mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_col_keep(seed: Tensor, row0: int, rows: int, cols: int, p: float) -> Tensor:
    """(rows, cols) bool: which elements (m, j), m = row0.., survive dropout p under `seed` (a tensor)."""
    dev = seed.device
    r = (torch.arange(row0, row0 + rows, device=dev, dtype=torch.int64) & _M32)[:, None]
    c = torch.arange(cols, device=dev, dtype=torch.int64)[None, :]
    h = fmix32(fmix32(mul32(r, ROW_KEY) ^ (seed.reshape(()) & _M32)) ^ mul32(c, COL_KEY))
    return (h >> 8) >= threshold(p)


def flat_keep(shape, seed, p: float, device=None) -> Tensor:
    """Bool mask of `shape`: which elements, by flat index, survive dropout p under `seed`: an int, or a
    one-element int64 tensor, on any device (the op's seed lives on its tensors' device, so that a CUDA graph
    replays a fresh draw; no .item(), no sync), batched under vmap(randomness="different") (one mask per
    sample). An int and a tensor of the same value give the same mask."""
    seed = seed.reshape(()).to(device=device, dtype=torch.int64) if isinstance(seed, Tensor) else int(seed)
    key = fmix32((seed ^ SEED_KEY) & _M32)
    n = 1
    for s in shape:
        n *= int(s)
    h = fmix32(torch.arange(n, dtype=torch.int64, device=device) ^ key)
    h = fmix32((h + key) & _M32)
    return ((h >> 8) >= threshold(p)).reshape(shape)


_NO_SEEDS: dict = {}


def no_seed(device="cpu") -> Tensor:
    """The seed of a call without dropout (any seed does): one zero tensor per device, shared and never
    written, because making a fresh one costs a torch call per op call; a fresh one while torch.compile
    traces (no module state in the graph)."""
    if torch.compiler.is_compiling():
        return torch.zeros(1, dtype=torch.int64, device=device)
    seed = _NO_SEEDS.get(device)
    if seed is None:
        # a normal tensor even when the first call is under inference_mode: an inference tensor could not
        # be saved for backward by a later training call (APT saves its seed)
        with torch.inference_mode(False):
            seed = _NO_SEEDS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return seed
