"""Compile Triton kernels for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter checks a kernel's maths on CPU tensors but not that it compiles: layouts, dot shapes and
dtypes the GPU backend rejects pass the interpreter silently. triton.compile needs no GPU (ptxas ships
with Triton), so CI builds every kernel to a cubin here as well.

The compiler runs in a worker process without TRITON_INTERPRET: with the interpreter switched on,
Triton 3.6's front end mis-builds some kernels (seen: "'ir.value' object has no attribute 'dtype'" for
a BLOCK_N=128 GEMM that compiles fine without it). One worker serves the whole test session.
"""
import atexit
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

ARCHS = (80, 90)
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
       torch.float8_e4m3fn: "*fp8e4nv", torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64"}
_worker = None


def _encode(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    return value


def _start_worker():
    global _worker
    if _worker is None or _worker.poll() is not None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        _worker = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=env)
        atexit.register(_worker.kill)
    return _worker


def compile_for_gpu(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 3):
    """Compile `kernel` to a cubin for sm_`arch`; every non-constexpr argument's type is in `signature`
    ("*bf16", "i32", "fp32", ...). Returns an object whose .asm["ptx"] holds the PTX."""
    fn = getattr(kernel, "fn", kernel)
    request = {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
               "constexprs": {k: _encode(v) for k, v in constexprs.items()}, "arch": arch,
               "num_warps": num_warps, "num_stages": num_stages}
    worker = _start_worker()
    worker.stdin.write(json.dumps(request) + "\n")
    worker.stdin.flush()
    reply = json.loads(worker.stdout.readline() or '{"error": "the compile worker died"}')
    if "error" in reply:
        raise AssertionError(f"{fn.__name__} does not compile for sm_{arch}: {reply['error']}")
    return SimpleNamespace(asm={"ptx": reply["ptx"]})


def _serve():
    import importlib
    import traceback

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for line in sys.stdin:
        req = json.loads(line)
        try:
            fn = getattr(importlib.import_module(req["module"]), req["kernel"])
            consts = {k: tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v for k, v in req["constexprs"].items()}
            full = {**req["signature"], **{name: "constexpr" for name in consts}}
            missing = [a for a in fn.arg_names if a not in full]
            if missing:
                raise ValueError(f"no type for {missing}")
            src = ASTSource(fn=fn, signature={a: full[a] for a in fn.arg_names}, constexprs=consts)
            out = triton.compile(src, target=GPUTarget("cuda", req["arch"], 32),
                                 options={"num_warps": req["num_warps"], "num_stages": req["num_stages"]})
            if not out.asm.get("cubin"):
                raise RuntimeError("no cubin produced")
            reply = {"ptx": out.asm["ptx"]}
        except Exception as exc:  # reported to the test, which fails with it
            reply = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
