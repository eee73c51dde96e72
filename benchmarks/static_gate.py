"""The static GPU gate's table: every Triton launch of the package at the benchmark shapes, at the pipeline's
ViT-B/16 launches and (unless --no-sweep) APT at every prompt width it accepts, compiled for sm_90 and sm_80
in fp32, bf16 and fp16 with the specialisation a real launch binds, and what ptxas made of it (registers,
spill bytes, shared memory, the tensor-core instruction, per dot). No GPU needed.

    python -m benchmarks.static_gate OUT.md [--arch 90 80] [--no-sweep]

Exits with status 1 if a launch fails the gate (a spill, shared memory over the per-block limit, a bf16/fp16
dot that is not a wgmma on sm_90); tests/kernels/test_triton_static.py is the same gate in CI. fp64 is not compiled:
on CUDA it runs the plain-PyTorch backend. The machinery lives in tests/triton_compile.py (static_rows,
markdown).
"""
import argparse
import os
import sys
import time

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def table(archs=(90, 80), sweep=True):
    """(rows, markdown): the gate's rows (dicts with kernel, shape, dtype, arch, grid, regs, spills, smem,
    mma, dot counts, problems) and the Markdown table of them."""
    if _TESTS not in sys.path:
        sys.path.insert(0, _TESTS)
    os.environ.pop("TRITON_INTERPRET", None)  # the compile worker must build for the GPU
    import triton_compile

    calls = (triton_compile.gate_calls, triton_compile.sweep_calls) if sweep else triton_compile.gate_calls
    rows = triton_compile.static_rows(archs=tuple(archs), calls=calls)
    return rows, triton_compile.markdown(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static_gate", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="Markdown file to write")
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="sm_XY as XY (default: 90 80)")
    ap.add_argument("--no-sweep", action="store_true", help="skip APT's every-prompt-width sweep")
    a = ap.parse_args(argv)
    import triton

    start = time.time()
    rows, text = table(a.arch, sweep=not a.no_sweep)
    failed = [r for r in rows if r["problems"]]
    head = (f"# Static GPU gate\n\nTriton {triton.__version__}; {len(rows)} launches compiled in "
            f"{time.time() - start:.0f} s; the benchmark shapes (APT with dropout on and off), the pipeline's "
            f"ViT-B/16 launches{'' if a.no_sweep else ', APT at every prompt width (bf16, fp32; dropout on)'}; "
            f"programs sized for 132 SMs (H100 / H200); fp64 not compiled (plain PyTorch on CUDA). "
            f"Limits: no spills, shared memory <= 227 KB (sm_90) / 163 KB (sm_80) per block, every bf16/fp16 "
            f"dot a wgmma on sm_90. {'All pass.' if not failed else f'{len(failed)} FAIL.'}\n\n")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(head + text)
    print(f"wrote {a.out} ({len(rows)} launches, {len(failed)} failing)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
