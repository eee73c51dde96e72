"""Device functions shared by the Triton kernels (the host-side helpers are in _launch.py)."""
import triton
import triton.language as tl


@triton.jit
def rows64(rm, stride):
    """rm * stride in int64: (M x D) offsets pass 2^31 at M = 2.8 M rows of D = 768."""
    return rm.to(tl.int64) * stride


@triton.jit
def mma(a, b, acc, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with IEEE fp32 (no TF32); bf16 widened first under the interpreter (see upcast_bf16)."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)


@triton.jit
def fmix32(x):
    """MurmurHash3's 32-bit finaliser (csrc/hash.h, ladder_kernels/_dropout.py)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def row_col_keep(seed, rm, rp, thresh):
    """The row-col dropout stream: keep[m, j] = (fmix32(fmix32(m 0x9E3779B1 ^ seed) ^ j 0x85EBCA77) >> 8) >= thresh."""
    row = fmix32((rm.to(tl.uint32) * 0x9E3779B1) ^ seed)
    h = fmix32(row[:, None] ^ (rp.to(tl.uint32) * 0x85EBCA77)[None, :])
    return (h >> 8).to(tl.int32) >= thresh
