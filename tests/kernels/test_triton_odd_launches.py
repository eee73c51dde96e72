"""Every Triton launcher compiled for sm_90 at degenerate and odd shapes, as a GPU launch binds them.

On a GPU, Triton's JIT turns an integer argument equal to 1 into a compile-time constant (a Python int in
the kernel body), so `N.to(...)` on a size that is 1 fails to compile there while the interpreter, which
passes every size as a tensor, runs it happily: the first GPU run found exactly that in the gated fusion's
fold kernel (M = D = d = 1). The static gate compiles the benchmark shapes only; this compiles the shapes
the tests' odd-shape cases use, for every launcher, in fp32 and bf16.
"""
import pytest
import torch

tc = pytest.importorskip("triton_compile")

APT = "ladder_kernels.backends.triton.apt_diffusion"
GATED = "ladder_kernels.backends.triton.gated_fusion"


meta = tc.meta


def gated_calls(M, D, d, dtype):
    acc = torch.float32
    side, tap, weight, vec = meta((M, d), dtype), meta((M, D), dtype), meta((d, D), dtype), meta((d,), acc)
    return [(GATED, "forward", [side, tap, weight, meta((d,), dtype), vec, True]),
            (GATED, "grad_rows", [side, side, vec, True]),
            (GATED, "grad_weight", [side, tap, None]),
            (GATED, "grad_weight", [side, tap, None, vec, dtype])]  # the (1 - mu)-scaled, cast fold


def apt_calls(M, D, p, dtype):
    acc = torch.float32
    h, pr, ls, seed = meta((M, D), dtype), meta((p, D), dtype), meta((1,), acc), meta((1,), torch.int64)
    return [(APT, "forward", [h, h, pr, pr, ls, seed, 0.3]),
            (APT, "backward", [h, h, h, pr, pr, ls, meta((M,), acc), seed, 0.3, True, True, True, True, True])]


SHAPES = [(1, 1, 1), (13, 29, 5), (67, 97, 131), (2, 1, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_odd_launches_compile_for_sm90(shape, dtype):
    a, b, c = shape
    rows = []
    for module, call, args in gated_calls(a, b, c, dtype) + apt_calls(a, b, max(c, 1), dtype):
        rows += tc.compile_launches(module, call, args, 90)
    assert rows, "no launch was compiled"
    assert all(r["regs"] > 0 for r in rows)
