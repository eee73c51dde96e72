"""lk.gated_fusion vs the eager reference and torch.compile of it, on CLIP ViT-B/16 and text tap shapes.

Forward alone (the fused GEMM + bias + gate + blend epilogue) and forward + backward of the ladder's
training case (side, W, b and the gate trainable; the tap detached). Run:
    python -m pytest benchmarks/bench_gated_fusion.py --benchmark-json=bench-results/gated_fusion.json
"""
import pytest
import torch

import ladder_kernels as lk
from ladder_kernels import reference

from .conftest import (DEVICES, SMOKE, annotate_floor, compiled, compiled_case, dtype_name, peak_memory, run,
                       saved_bytes, step_of)

# (M, D, d): ViT-B/16 taps of a batch of 32 images; text taps of 1000 classes x 77 tokens.
CASES = {"vit_b16 M=32x197 D=768 d=96": (32 * 197, 768, 96), "text M=1000x77 D=512 d=64": (1000 * 77, 512, 64)}
if SMOKE:
    CASES = {"smoke M=70 D=48 d=16": (70, 48, 16)}
VARIANTS = ["lk", "eager", "compiled", "copy"]
_compiled_ref = compiled(reference.gated_fusion)


def make(M, D, d, dtype, device):
    side = torch.randn(M, d, dtype=dtype, device=device, requires_grad=True)
    tap = torch.randn(M, D, dtype=dtype, device=device)
    weight = (torch.randn(d, D, device=device) / D ** 0.5).to(dtype).requires_grad_()
    bias = torch.zeros(d, dtype=dtype, device=device, requires_grad=True)
    alpha = torch.zeros((), device=device, requires_grad=True)
    return side, tap, weight, bias, alpha


def dtypes(device):
    # bf16 is timed on CUDA only: on CPUs without bf16 units it is a different workload.
    return [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]


DEVICE_DTYPES = [pytest.param(dev, dt, id=f"{dev}-{dtype_name(dt)}") for dev in DEVICES for dt in dtypes(dev)]
# The copy is the bandwidth yardstick of the forward; it has no backward.
MODE_VARIANTS = [(m, v) for m in ("fwd", "fwd+bwd") for v in VARIANTS if not (v == "copy" and m != "fwd")]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode,variant", MODE_VARIANTS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_gated_fusion(benchmark, device, dtype, case, mode, variant):
    if variant == "compiled":
        compiled_case(case, CASES)
    M, D, d = CASES[case]
    side, tap, weight, bias, alpha = make(M, D, d, dtype, device)
    grad_out = torch.randn(M, d, dtype=dtype, device=device)
    fn = {"lk": lambda: lk.gated_fusion(side, tap, weight, bias, gate=alpha, temperature=0.1),
          "eager": lambda: reference.gated_fusion(side, tap, weight, bias, alpha, 0.1),
          "compiled": lambda: _compiled_ref(side, tap, weight, bias, alpha, 0.1),
          "copy": lambda: tap.clone()}[variant]
    elem = tap.element_size()
    # Fewest bytes the forward must move: read X, W, s; write out (the gate's s - Z for backward too).
    bytes_fwd = (M * D + d * D + 2 * M * d) * elem
    if variant == "copy":
        run(benchmark, f"{case} {dtype_name(dtype)} {mode}", "copy", fn, device, bytes_moved=2 * M * D * elem)
        return
    step = step_of(fn, mode, (side, weight, bias, alpha), grad_out)
    info = {"shape (M, D, d)": (M, D, d), "dtype": dtype_name(dtype)}
    if variant == "lk":
        info["backend"] = lk.backend_for("gated_fusion", side.device)
        info["saved MB"] = round(saved_bytes(fn) / 2 ** 20, 2)
    peak = peak_memory(step, device)
    if peak >= 0:
        info["peak MB"] = round(peak / 2 ** 20, 2)
    run(benchmark, f"{case} {dtype_name(dtype)} {mode}", variant, step, device,
        bytes_moved=bytes_fwd if mode == "fwd" else 0, **info)
    if variant == "lk":  # measured / the traffic model's floor (CUDA only)
        annotate_floor(benchmark, f"{case} {dtype_name(dtype)} {mode}", variant, device, "gated_fusion", (M, D, d),
                       dtype, mode)
