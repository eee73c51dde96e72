"""Launch-side helpers shared by the Triton kernel modules (the accumulation dtype itself is
ladder_kernels._common.acc_dtype)."""
import functools
import os
import struct

import torch
import triton
import triton.language as tl


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# Read once: this module is imported on the Triton backend's first use, after TRITON_INTERPRET has decided
# whether kernels compile or are interpreted (ladder_kernels.backends.triton's docstring), and Triton
# itself does not change modes within a process.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_bf16(dtype: torch.dtype) -> bool:
    # Triton 3.6's interpreter multiplies bf16 dot operands as raw integers; widening them to fp32
    # first is exact (a bf16 x bf16 product fits in fp32), so the CPU tests check the same maths.
    return _INTERPRET and dtype == torch.bfloat16


def block(n: int, lo: int = 16, hi: int = 128) -> int:
    """A power-of-two tile size covering n, clamped to [lo, hi] (tl.dot needs at least 16)."""
    return max(lo, min(hi, triton.next_power_of_2(n)))


@functools.lru_cache(maxsize=None)
def _gpu(index: int):
    """(SM count, sm_XY as XY) of CUDA device `index`, asked of the driver once: get_device_properties
    costs microseconds, more than a small launch's own host path."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, 10 * props.major + props.minor


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_programs_target(device: torch.device, waves: int = 2) -> int:
    """How many programs fill the device: `waves` waves of its SMs on a GPU; a few under the interpreter,
    which keeps the CPU tests quick (and still makes the launchers take their small-grid paths)."""
    if device.type == "cuda":
        return waves * _gpu(_index(device))[0]
    return 4


def device_arch(device: torch.device) -> int:
    """sm_XY as XY for a CUDA device; 90 under the interpreter (the tiles are then the Hopper ones, so
    the CPU tests run the configurations an H100 launches)."""
    if device.type == "cuda":
        return _gpu(_index(device))[1]
    return 90


def rows_per_program(M: int, block_m: int, programs: int) -> int:
    """Rows one program owns: a whole BLOCK_M tile when that gives `programs` programs or more; else
    fewer (a multiple of 16, the tile's other rows masked), so that a one-wave grid still reaches every
    SM. Why: wgmma needs 64-row tiles, and M = 32 x 197 = 6304 makes only 99 tiles of 64 for 132 SMs;
    48-row programs make 132. The masked rows cost tensor-core work, which these kernels have to spare,
    and no memory traffic."""
    want = triton.cdiv(triton.cdiv(max(M, 1), programs), 16) * 16
    return max(16, min(block_m, want))


def dropout_args(dropout: float):
    """(threshold, hi, lo) of the dropout stream (ladder_kernels._dropout): 1 / (1 - p) = hi + lo with hi
    its fp32 rounding, since a Python float reaches a kernel as fp32 and an fp64 kernel must not round it
    there; (0, 1, 0) without dropout."""
    from ..._dropout import threshold

    if dropout <= 0:
        return 0, 1.0, 0.0
    scale = 1.0 / (1.0 - dropout)
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return threshold(dropout), hi, scale - hi
