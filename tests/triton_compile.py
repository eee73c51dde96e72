"""Compile Triton kernels for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter checks a kernel's maths on CPU tensors but not that it compiles: layouts, dot shapes and
dtypes the GPU backend rejects pass the interpreter silently. triton.compile needs no GPU (ptxas ships
with Triton), so CI builds every kernel to a cubin here as well.

The compiler runs in a worker process without TRITON_INTERPRET: with the interpreter switched on,
Triton 3.6's front end mis-builds some kernels (seen: "'ir.value' object has no attribute 'dtype'" for
a BLOCK_N=128 GEMM that compiles fine without it). One worker serves the whole test session.

Two ways in:
  * compile_for_gpu(kernel, signature, constexprs, arch): a kernel with types given by hand (no
    alignment or stride-1 attributes: a generic binary, the smoke check);
  * compile_launches(module, call, args, arch, programs): runs a launcher of ladder_kernels' Triton
    backend on meta tensors (no memory, no GPU) with every `kernel[grid](...)` intercepted, and
    compiles each launch exactly as JITFunction.run would on a GPU: the same binder, so the same
    specialisation (pointers aligned to 16 -> tt.divisibility 16, integers divisible by 16, integers
    equal to 1 -> constexpr), at the tiles the launcher picks for that shape and a device of `programs`
    SMs. Each launch comes back as a row: kernel, grid, registers, spill bytes, shared memory, the
    tensor-core instruction the PTX uses. static_rows() builds the table of the benchmark shapes
    (tests/test_triton_static.py gates on it; benchmarks/static_gate.py prints it).
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
    reply = _ask(request, f"{fn.__name__} does not compile for sm_{arch}")
    return SimpleNamespace(asm={"ptx": reply["ptx"]})


def _ask(request: dict, failure: str) -> dict:
    """One request to the compile worker and its reply; an error reply fails with `failure`: the reason."""
    worker = _start_worker()
    worker.stdin.write(json.dumps(request) + "\n")
    worker.stdin.flush()
    reply = json.loads(worker.stdout.readline() or '{"error": "the compile worker died"}')
    if "error" in reply:
        raise AssertionError(f"{failure}: {reply['error']}")
    return reply


SMEM_LIMIT = {90: 228 * 1024, 80: 164 * 1024}  # bytes of shared memory one block may use


def meta(shape, dtype, stride=None):
    """A tensor argument for compile_launches: built as a meta tensor in the worker (no memory)."""
    return {"tensor": list(shape), "dtype": str(dtype).replace("torch.", ""),
            "stride": list(stride) if stride is not None else None}


def compile_launches(module: str, call: str, args: list, arch: int, programs: int = 132) -> list:
    """Run `module.call(*args)` with tensors on the meta device, compile every Triton launch it makes for
    sm_`arch` with the JIT's own specialisation, and return one dict per launch: kernel, grid, regs,
    spills (bytes of stack frame and local memory in the cubin, cuobjdump -res-usage: where ptxas puts
    spilled registers; these kernels have no local arrays), smem (bytes), mma ("wgmma", "mma.sync" or
    "none"), dots (whether the kernel has tl.dot at all), constexprs."""
    args = [{"torch_dtype": str(a).replace("torch.", "")} if isinstance(a, torch.dtype) else a for a in args]
    request = {"launches": {"module": module, "call": call, "args": args, "programs": programs}, "arch": arch}
    return _ask(request, f"{module}.{call} does not compile for sm_{arch}")["rows"]


# The benchmark shapes the static gate compiles for (benchmarks/bench_apt_diffusion.py,
# benchmarks/bench_gated_fusion.py): ViT-B/16 (B=32, N=197, D=768) for APT; the ladder's vision tap
# (M = 32 x 197, D = 768, d = 96) and text tap (M = 1000 x 77, D = 512, d = 64) for the gated fusion.
APT_SHAPES = {f"vit_b16 M=6304 D=768 p={p}": (6304, 768, p) for p in (10, 50, 200)}
GATED_SHAPES = {"vision M=6304 D=768 d=96": (6304, 768, 96), "text M=77000 D=512 d=64": (77000, 512, 64)}
GATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
H100_SMS = 132  # H100 SXM and H200 alike


def gate_calls(dtype):
    """(op, shape name, module, call, args) of every launcher the gate compiles, at the benchmark shapes.
    APT with dropout on (the training path: the dropout hash makes the heavier binary) and off (the
    benchmarks' case)."""
    apt = "ladder_kernels.backends.triton.apt_diffusion"
    gated = "ladder_kernels.backends.triton.gated_fusion"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    calls = []
    for name, (M, D, p) in APT_SHAPES.items():
        h, pr, ls, seed = meta((M, D), dtype), meta((p, D), dtype), meta((1,), acc), meta((1,), torch.int64)
        for drop in (0.1, 0.0):
            case = f"{name} dropout={drop:g}"
            calls.append(("apt_diffusion", case, apt, "forward", [h, h, pr, pr, ls, seed, drop]))
            calls.append(("apt_diffusion", case, apt, "backward",
                          [h, h, h, pr, pr, ls, meta((M,), acc), seed, drop, True, True, True, True, True]))
    for name, (M, D, d) in GATED_SHAPES.items():
        side, tap, weight, vec = meta((M, d), dtype), meta((M, D), dtype), meta((d, D), dtype), meta((d,), acc)
        calls.append(("gated_fusion", name, gated, "forward", [side, tap, weight, meta((d,), dtype), vec, True]))
        calls.append(("gated_fusion", name, gated, "grad_rows", [side, side, vec, True]))
        calls.append(("gated_fusion", name, gated, "grad_weight", [side, tap, None]))
    return calls


def static_rows(archs=ARCHS, dtypes=GATE_DTYPES, programs=H100_SMS):
    """The static gate's table: one dict per (launch, shape, dtype, arch) with kernel, shape, dtype,
    arch, grid, regs, spills, smem, mma and the verdict `problems` (empty when it passes)."""
    rows = []
    for arch in archs:
        for dtype in dtypes:
            for op, shape, module, call, args in gate_calls(dtype):
                for r in compile_launches(module, call, args, arch, programs):
                    r.update(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), arch=f"sm_{arch}",
                             problems=problems(r, dtype, arch))
                    rows.append(r)
    return rows


def problems(row, dtype, arch) -> list:
    """Why a compiled launch fails the gate: spills, shared memory over the limit, or a bf16/fp16 dot
    that is not on wgmma on sm_90."""
    found = []
    if row["spills"] > 0:
        found.append(f"spills {row['spills']} B")
    if row["smem"] > SMEM_LIMIT[arch]:
        found.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[arch]} B")
    if arch == 90 and dtype in (torch.bfloat16, torch.float16) and row["dots"] and row["mma"] != "wgmma":
        found.append(f"{row['mma']} instead of wgmma")
    return found


def markdown(rows) -> str:
    """The table as Markdown (benchmarks/static_gate.py, the benchmark report)."""
    lines = ["| kernel | shape | dtype | arch | grid | regs | spills (B) | smem (KB) | tensor cores | gate |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        verdict = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        tensor_cores = r["mma"] if r["dots"] else "-"
        lines.append(f"| {r.get('op', '?')}.{r['kernel'].strip('_')} | {r['shape']} | {r['dtype']} | {r['arch']} | "
                     f"{r['grid']} | {r['regs']} | {r['spills']} | {r['smem'] / 1024:.1f} | {tensor_cores} | {verdict} |")
    return "\n".join(lines) + "\n"


def _resources(cubin: bytes, kernel: str) -> dict:
    """Registers and local memory of the cubin's kernel, from cuobjdump (shipped with Triton)."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}
    return {"regs": found.get("REG", -1), "stack": found.get("STACK", 0) + found.get("LOCAL", 0)}


def _signature(ttir: str) -> str:
    return next((line for line in ttir.splitlines() if "tt.func public" in line), "")


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none"


def _compile_launch(jit_fn, args, kwargs, arch):
    """What JITFunction.run does on a GPU up to the compile, for a target given by hand."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound_args, specialization,
                                                              options)
    src = ASTSource(jit_fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__), constexprs


def _launch_rows(req, arch):
    arch = int(arch)
    import importlib

    import triton.runtime.jit as jit

    torch_dtype = lambda name: getattr(torch, name)  # noqa: E731

    def build(a):
        if isinstance(a, dict) and "tensor" in a:
            t = torch.empty(a["tensor"], dtype=torch_dtype(a["dtype"]), device="meta")
            return t.as_strided(a["tensor"], a["stride"]) if a["stride"] is not None else t
        if isinstance(a, dict) and "torch_dtype" in a:
            return torch_dtype(a["torch_dtype"])
        return a

    mod = importlib.import_module(req["module"])
    programs = req["programs"]
    # The launchers ask how many programs fill the device; answer for the GPU being compiled for.
    if hasattr(mod, "num_programs_target"):
        mod.num_programs_target = lambda device, waves=2: waves * programs
    if hasattr(mod, "device_arch"):
        mod.device_arch = lambda device: arch
    launches = []
    original = jit.JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, grid))

    jit.JITFunction.run = record
    try:
        getattr(mod, req["call"])(*[build(a) for a in req["args"]])
    finally:
        jit.JITFunction.run = original
    rows = []
    for fn, args, kwargs, grid in launches:
        compiled, constexprs = _compile_launch(fn, args, kwargs, arch)
        res = _resources(compiled.asm["cubin"], fn.__name__)
        ptx = compiled.asm["ptx"]
        programs_ = 1
        for g in (grid if isinstance(grid, tuple) else (grid,)):
            programs_ *= g
        names = fn.arg_names
        consts = {names[k[0]]: v for k, v in constexprs.items()
                  if isinstance(v, (int, bool)) and names[k[0]].isupper()}
        rows.append({"kernel": fn.__name__, "grid": programs_, "regs": res["regs"], "spills": res["stack"],
                     "smem": int(compiled.metadata.shared), "mma": _mma_kind(ptx), "dots": "tt.dot" in
                     compiled.asm["ttir"], "num_warps": compiled.metadata.num_warps, "constexprs": consts,
                     # how many arguments the binder specialised as 16-divisible (pointers and integers)
                     "divisible_args": _signature(compiled.asm["ttir"]).count("tt.divisibility = 16")})
    return rows


def _serve():
    import importlib
    import traceback

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for line in sys.stdin:
        req = json.loads(line)
        if "launches" in req:
            try:
                reply = {"rows": _launch_rows(req["launches"], req["arch"])}
            except Exception as exc:  # reported to the test, which fails with it
                reply = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
            continue
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
    # The worker imports the kernel modules by name: from the checkout, installed or not.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _serve()
