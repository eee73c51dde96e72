"""Compile Triton kernels for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter checks a kernel's maths on CPU tensors but not that it compiles: layouts, dot shapes and
dtypes the GPU backend rejects pass the interpreter silently. triton.compile needs no GPU (ptxas ships
with Triton), so CI builds every kernel to a cubin here as well."""
import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ARCHS = (80, 90)
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
       torch.float8_e4m3fn: "*fp8e4nv", torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64"}


def compile_for_gpu(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 3):
    """Compile `kernel` to a cubin for sm_`arch`; every non-constexpr argument's type is in `signature`
    ("*bf16", "i32", "fp32", ...). Returns the compiled kernel (its .asm holds ttgir, ptx, cubin)."""
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)  # interpreter wraps the jit
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    missing = [a for a in fn.arg_names if a not in full]
    assert not missing, f"no type for {missing}"
    src = ASTSource(fn=fn, signature={a: full[a] for a in fn.arg_names}, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.asm.get("cubin"), "no cubin produced"
    return compiled
